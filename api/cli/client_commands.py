"""The REST client sub-commands `speft files`, `speft jobs` and `speft adapters` (DESIGN.md §2),
over `api.client.SpeftClient`."""
from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from api.cli.console import console, out, print_json
from api.client import API_KEY_ENV, BASE_URL_ENV, DEFAULT_BASE_URL, ApiClientError, SpeftClient

files_app = typer.Typer(help="Datasets on the server.", no_args_is_help=True)
jobs_app = typer.Typer(help="Fine-tuning jobs on the server.", no_args_is_help=True)
webhooks_app = typer.Typer(help="Webhook endpoints: signed POSTs when jobs end.",
                           no_args_is_help=True)
adapters_app = typer.Typer(help="Trained adapters (sparse deltas) on the server.",
                           no_args_is_help=True)

TERMINAL_EXIT_CODES = {"succeeded": 0, "failed": 1, "cancelled": 2}
POLL_INTERVAL_S = 1.0
WIDE_TABLE_COLUMNS = 120

BaseUrlOpt = Annotated[str, typer.Option("--base-url", envvar=BASE_URL_ENV,
                                         help="the speft API", show_default=DEFAULT_BASE_URL)]
ApiKeyOpt = Annotated[str | None, typer.Option("--api-key", envvar=API_KEY_ENV,
                                               help="an API key (Bearer)", show_default=False)]


@contextmanager
def api_client(base_url: str, api_key: str | None) -> Iterator[SpeftClient]:
    """A client for the command; API errors are printed in red and exit with code 1."""
    try:
        with SpeftClient(base_url, api_key) as client:
            yield client
    except ApiClientError as err:
        where = f" ({err.param})" if err.param else ""
        console.print(f"[red]error{where}:[/red] {err.message}", highlight=False)
        raise typer.Exit(code=1) from err


@files_app.command("upload")
def files_upload(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True,
                                         help="a JSONL dataset")],
    purpose: Annotated[str, typer.Option(help="the file's purpose")] = "fine-tune",
    base_url: BaseUrlOpt = DEFAULT_BASE_URL, api_key: ApiKeyOpt = None,
) -> None:
    """Upload a JSONL dataset; prints the File object (validated on upload)."""
    with api_client(base_url, api_key) as client:
        print_json(client.upload_file(path, purpose=purpose))


def job_body(spec: Path | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """The job body: SPEC.json (if given) with the flags that were set laid over it."""
    body: dict[str, Any] = {}
    if spec is not None:
        try:
            body = json.loads(spec.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as err:  # also too deep, too many digits
            raise typer.BadParameter(f"cannot read {spec}: {err}", param_hint="--spec") from err
        if not isinstance(body, dict):
            raise typer.BadParameter(f"{spec} is not a JSON object", param_hint="--spec")
    sections = {"metric": ("method", "speft"), "density": ("method", "speft"),
                "n_epochs": ("hyperparameters",), "batch_size": ("hyperparameters",),
                "learning_rate": ("hyperparameters",), "max_length": ("hyperparameters",)}
    for key, value in overrides.items():
        if value is None:
            continue
        target = body
        for section in sections.get(key, ()):
            target = target.setdefault(section, {})
        target[key] = value
    if "method" in body:
        body["method"].setdefault("type", "speft")
    for required in ("model", "training_file"):
        if not body.get(required):
            raise typer.BadParameter(f"give --{required.replace('_', '-')} or put it in --spec",
                                     param_hint=f"--{required.replace('_', '-')}")
    return body


@jobs_app.command("create")
def jobs_create(
    model: Annotated[str | None, typer.Option(help="a base model id (GET /v1/models)")] = None,
    training_file: Annotated[str | None, typer.Option(help="an uploaded file id")] = None,
    validation_file: Annotated[str | None, typer.Option(help="an uploaded file id")] = None,
    metric: Annotated[str | None, typer.Option(help="salience metric, e.g. gradient")] = None,
    density: Annotated[float | None, typer.Option(help="fraction in (0, 1] or a count")] = None,
    epochs: Annotated[int | None, typer.Option(help="n_epochs")] = None,
    batch_size: Annotated[int | None, typer.Option(help="batch size")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="learning rate")] = None,
    max_length: Annotated[int | None, typer.Option(help="max tokens per example")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda: which workers train it "
                                                    "(default: the server's)")] = None,
    spec: Annotated[Path | None, typer.Option(help="a full job body (JSON); flags override",
                                              metavar="SPEC.json")] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="Idempotency-Key header")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="wait for the job to finish")] = False,
    base_url: BaseUrlOpt = DEFAULT_BASE_URL, api_key: ApiKeyOpt = None,
) -> None:
    """Create a fine-tuning job; prints the Job (or waits for it with --wait)."""
    if density is not None and density > 1 and density.is_integer():
        density = int(density)  # an integer > 1 is an absolute count
    body = job_body(spec, {"model": model, "training_file": training_file,
                           "validation_file": validation_file, "metric": metric,
                           "density": density, "n_epochs": epochs, "batch_size": batch_size,
                           "learning_rate": learning_rate, "max_length": max_length,
                           "device": device})
    with api_client(base_url, api_key) as client:
        job = client.create_job(body, idempotency_key=idempotency_key)
        if not wait:
            print_json(job)
            return
        console.print(f"created {job['id']}")
        code = wait_for_job(client, job["id"])
    raise typer.Exit(code=code)


@jobs_app.command("get")
def jobs_get(job_id: Annotated[str, typer.Argument(metavar="ID")],
             base_url: BaseUrlOpt = DEFAULT_BASE_URL, api_key: ApiKeyOpt = None) -> None:
    """Print one job."""
    with api_client(base_url, api_key) as client:
        print_json(client.get_job(job_id))


def _when(timestamp: int | None) -> str:
    """A Unix time as a short UTC string ('' for none)."""
    if timestamp is None:
        return ""
    return datetime.fromtimestamp(timestamp, tz=UTC).strftime("%m-%d %H:%M")


@jobs_app.command("list")
def jobs_list(
    limit: Annotated[int | None, typer.Option(min=1, help="at most this many")] = None,
    status: Annotated[str | None, typer.Option(help="only jobs with this status")] = None,
    base_url: BaseUrlOpt = DEFAULT_BASE_URL, api_key: ApiKeyOpt = None,
) -> None:
    """List jobs, newest first, as a table (times in UTC)."""
    with api_client(base_url, api_key) as client:
        page = client.list_jobs(limit=limit, status=status)
    jobs = page["data"]
    wide = out.width >= WIDE_TABLE_COLUMNS
    table = Table(title=f"{len(jobs)} job(s)" + (" (more)" if page.get("has_more") else ""),
                  box=box.SIMPLE_HEAD)
    # Ids stay whole (they are copied into other commands); on a narrow terminal the adapter
    # column is left out (`speft jobs get ID` shows it).
    table.add_column("id", no_wrap=True)
    for name in ("status", "model", "steps", "created"):
        table.add_column(name)
    if wide:
        table.add_column("adapter", no_wrap=True)
    for job in jobs:
        progress = job.get("progress") or {}
        total = progress.get("total_steps")
        doing = job_phase(job)
        row = [job["id"], job["status"] + (f" ({doing})" if doing else ""), job["model"],
               f"{progress.get('step', 0)}/{total if total is not None else '?'}",
               _when(job.get("created_at"))]
        table.add_row(*row, *([job.get("adapter_id") or ""] if wide else []))
    out.print(table)


@jobs_app.command("cancel")
def jobs_cancel(job_id: Annotated[str, typer.Argument(metavar="ID")],
                base_url: BaseUrlOpt = DEFAULT_BASE_URL, api_key: ApiKeyOpt = None) -> None:
    """Ask a job to stop; prints the Job."""
    with api_client(base_url, api_key) as client:
        print_json(client.cancel_job(job_id))


@jobs_app.command("pause")
def jobs_pause(job_id: Annotated[str, typer.Argument(metavar="ID")],
               base_url: BaseUrlOpt = DEFAULT_BASE_URL, api_key: ApiKeyOpt = None) -> None:
    """Pause a job (a running one checkpoints and stops at its next step); prints the Job."""
    with api_client(base_url, api_key) as client:
        print_json(client.pause_job(job_id))


@jobs_app.command("resume")
def jobs_resume(job_id: Annotated[str, typer.Argument(metavar="ID")],
                base_url: BaseUrlOpt = DEFAULT_BASE_URL, api_key: ApiKeyOpt = None) -> None:
    """Resume a paused job from its newest checkpoint; prints the Job."""
    with api_client(base_url, api_key) as client:
        print_json(client.resume_job(job_id))


@jobs_app.command("checkpoints")
def jobs_checkpoints(job_id: Annotated[str, typer.Argument(metavar="ID")],
                     base_url: BaseUrlOpt = DEFAULT_BASE_URL,
                     api_key: ApiKeyOpt = None) -> None:
    """List a job's checkpoints, newest first, as a table (serve one by its id)."""
    with api_client(base_url, api_key) as client:
        rows = client.job_checkpoints(job_id)

    def cells(row: dict[str, Any]) -> list[str]:
        metrics = row.get("metrics") or {}
        accuracy = metrics.get("valid_accuracy", metrics.get("valid_mean_token_accuracy"))
        return [row["id"], str(row["step_number"]), _number(metrics.get("train_loss")),
                _number(metrics.get("valid_loss")), _number(accuracy), _when(row.get("created_at"))]

    _print_table(f"{len(rows)} checkpoint(s) of {job_id}",
                 ("id", "step", "train loss", "valid loss", "valid acc", "created"),
                 [cells(row) for row in rows])


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A simple table of strings on the console."""
    table = Table(title=title, box=box.SIMPLE_HEAD)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    out.print(table)


def _latest_loss(client: SpeftClient, job_id: str) -> str:
    """'loss X' from the job's latest step metric, or ''."""
    losses = [row["train_loss"] for row in client.job_metrics(job_id)
              if row.get("train_loss") is not None]
    return f"loss {losses[-1]:.4f}" if losses else ""


def job_phase(job: dict[str, Any], *, counts: bool = True) -> str:
    """What a running job is doing: its phase (with `counts`, the phase's own progress:
    'scoring_salience 128/512'), or that its worker has gone silent; '' when no worker runs it."""
    progress = job.get("progress") or {}
    if progress.get("stale"):
        return f"no word from its worker since {_when(progress.get('heartbeat_at'))} UTC"
    phase, total = progress.get("phase"), progress.get("phase_total")
    if not phase:
        return ""
    return f"{phase} {progress.get('phase_step', 0)}/{total}" if total and counts else phase


def wait_for_job(client: SpeftClient, job_id: str) -> int:
    """Poll a job with a progress bar until it ends (the bar follows the phase: examples scored,
    steps trained, …; each new phase is also printed); the exit code for its terminal status."""
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[loss]}"), TimeElapsedColumn(),
                  console=console) as progress:
        bar = progress.add_task(job_id, total=None, loss="")
        shown_phase = None
        while True:
            job = client.get_job(job_id)
            report = job.get("progress") or {}
            if report.get("phase") and report["phase"] != shown_phase:
                progress.console.print(f"{job_id}: {report['phase']}", highlight=False)
            shown_phase = report.get("phase")
            completed, total = ((report.get("phase_step", 0), report["phase_total"])
                                if report.get("phase_total") else
                                (report.get("step", 0), report.get("total_steps")))
            loss = _latest_loss(client, job_id) if job["status"] != "queued" else ""
            doing = job_phase(job, counts=False)  # the bar counts the phase's progress
            progress.update(bar, description=f"{job_id} {job['status']}"
                            + (f" · {doing}" if doing else ""),
                            completed=completed, total=total, loss=loss)
            if job["status"] in TERMINAL_EXIT_CODES:
                break
            time.sleep(POLL_INTERVAL_S)
    status = job["status"]
    if status == "succeeded":
        console.print(f"[green]succeeded[/green]: adapter {job.get('adapter_id')}")
    elif status == "failed":
        error = job.get("error") or {}
        where = f" ({error['param']})" if error.get("param") else ""
        console.print(f"[red]failed: {error.get('code', 'unknown')}{where}:[/red] "
                      f"{error.get('message', '')}", highlight=False)
    else:
        console.print(f"[yellow]{status}[/yellow]")
    return TERMINAL_EXIT_CODES[status]


@jobs_app.command("wait")
def jobs_wait(job_id: Annotated[str, typer.Argument(metavar="ID")],
              base_url: BaseUrlOpt = DEFAULT_BASE_URL, api_key: ApiKeyOpt = None) -> None:
    """Wait for a job with a progress bar; exit 0 succeeded, 1 failed, 2 cancelled."""
    with api_client(base_url, api_key) as client:
        code = wait_for_job(client, job_id)
    raise typer.Exit(code=code)


@adapters_app.command("download")
def adapters_download(
    adapter_id: Annotated[str, typer.Argument(metavar="ID")],
    out_path: Annotated[Path, typer.Option("--out", "-o", dir_okay=False,
                                           help="where to write the .safetensors delta")],
    base_url: BaseUrlOpt = DEFAULT_BASE_URL, api_key: ApiKeyOpt = None,
) -> None:
    """Download an adapter's delta file."""
    with api_client(base_url, api_key) as client:
        written = client.download_adapter(adapter_id, out_path)
    typer.echo(json.dumps({"id": adapter_id, "out": str(out_path), "bytes": written}))


@webhooks_app.command("create")
def webhooks_create(
    url: Annotated[str, typer.Argument(help="http(s) URL of the receiver")],
    event: Annotated[list[str] | None, typer.Option(
        help="an event type to send (repeat; default: job succeeded, failed, cancelled)")] = None,
    base_url: BaseUrlOpt = DEFAULT_BASE_URL, api_key: ApiKeyOpt = None,
) -> None:
    """Register an endpoint; prints it with its signing secret (shown this once)."""
    with api_client(base_url, api_key) as client:
        print_json(client.create_webhook(url, event or None))


@webhooks_app.command("list")
def webhooks_list(base_url: BaseUrlOpt = DEFAULT_BASE_URL, api_key: ApiKeyOpt = None) -> None:
    """List the endpoints (JSON, newest first)."""
    with api_client(base_url, api_key) as client:
        print_json({"object": "list", "data": client.list_webhooks()})


@webhooks_app.command("delete")
def webhooks_delete(endpoint_id: Annotated[str, typer.Argument(metavar="ID")],
                    base_url: BaseUrlOpt = DEFAULT_BASE_URL, api_key: ApiKeyOpt = None) -> None:
    """Delete an endpoint."""
    with api_client(base_url, api_key) as client:
        print_json(client.delete_webhook(endpoint_id))


@webhooks_app.command("deliveries")
def webhooks_deliveries(endpoint_id: Annotated[str, typer.Argument(metavar="ID")],
                        base_url: BaseUrlOpt = DEFAULT_BASE_URL,
                        api_key: ApiKeyOpt = None) -> None:
    """An endpoint's latest deliveries and every attempt, as a table."""
    with api_client(base_url, api_key) as client:
        rows = client.webhook_deliveries(endpoint_id)

    def cells(row: dict[str, Any]) -> list[str]:
        last = row["attempts"][-1] if row["attempts"] else {}
        return [row["id"], row["event_type"], row["status"], str(len(row["attempts"])),
                str(last.get("status_code") or last.get("error") or ""),
                _when(row.get("created_at"))]

    _print_table(f"{len(rows)} deliveries to {endpoint_id}",
                 ("id", "event", "status", "attempts", "last answer", "created"),
                 [cells(row) for row in rows])
