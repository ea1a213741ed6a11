"""The `speft` command line (console script `speft = "api.cli:app"`, or `python -m api.cli`):
`train` (local, from speft_core), the service's processes (`launcher`), the REST client
sub-commands (`client_commands`) and the server-side administration (`admin`)."""
from __future__ import annotations

import typer

from api.cli.admin import keys_app, models_app
from api.cli.client_commands import adapters_app, files_app, jobs_app, webhooks_app
from api.cli.launcher import run, serve, worker
from speft_core.cli import train

app = typer.Typer(help="speft: salience-aware sparse fine-tuning, as a library and a service.",
                  no_args_is_help=True, add_completion=False)
for command in (train, serve, worker, run):
    app.command()(command)
app.add_typer(files_app, name="files")
app.add_typer(jobs_app, name="jobs")
app.add_typer(adapters_app, name="adapters")
app.add_typer(webhooks_app, name="webhooks")
app.add_typer(models_app, name="models")
app.add_typer(keys_app, name="keys")

__all__ = ["app"]
