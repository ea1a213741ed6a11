"""Server-side administration that writes the database directly: `speft models register` and
`speft keys create|revoke|list`."""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from api.cli.console import console, load_settings, out
from api.core.config import Settings

models_app = typer.Typer(help="Base models (server-side administration).", no_args_is_help=True)
keys_app = typer.Typer(help="API keys and tenants (server-side administration).",
                       no_args_is_help=True)

ID_COLUMN_WIDTH = 28  # `key-` and 24 hex digits


@contextmanager
def database_session(settings: Settings) -> Iterator[Session]:
    """A session on SPEFT_DATABASE_URL, migrated to head first (so a fresh database works);
    committed when the block succeeds. An unreachable database exits with code 1."""
    from api.core.db import make_engine, session_factory, upgrade_database

    engine = make_engine(settings.database_url)
    try:
        upgrade_database(settings.database_url)
        with session_factory(engine).begin() as session:
            yield session
    except OperationalError as err:
        console.print(f"[red]database error:[/red] {err.orig or err}", highlight=False)
        raise typer.Exit(code=1) from err
    finally:
        engine.dispose()


@contextmanager
def admin_errors() -> Iterator[None]:
    """A refused administration request printed in red, naming its parameter; exit code 2."""
    from api.errors import ApiError

    try:
        yield
    except ApiError as err:
        console.print(f"[red]error ({err.param}):[/red] {err.message}", highlight=False)
        raise typer.Exit(code=2) from err


@models_app.command("register")
def models_register(
    model_id: Annotated[str, typer.Argument(metavar="NAME", help="the model id users will name")],
    path: Annotated[Path | None, typer.Option(
        help="HF model folder, inside SPEFT_MODELS_DIR")] = None,
    storage_key: Annotated[str | None, typer.Option(
        help="key of a tar archive of a HF model folder in SPEFT_STORAGE_URL")] = None,
    task: Annotated[str, typer.Option(help="classification or causal_lm")] = "classification",
    dtype: Annotated[str, typer.Option(
        help="weights' dtype for jobs saying 'auto' and for serving: auto (the checkpoint's), "
             "bfloat16, float16 or float32")] = "auto",
) -> None:
    """Register a server-side model folder or a stored model archive (writes the database)."""
    from api.core.storage import StorageError, open_storage
    from api.errors import InvalidRequest
    from api.services.models import register_local_model, register_stored_model

    settings = load_settings()
    try:
        with admin_errors(), database_session(settings) as session:
            if (path is None) == (storage_key is None):
                raise InvalidRequest("give exactly one of --path and --storage-key", param="path")
            if storage_key is not None:
                storage = open_storage(settings)
                row = register_stored_model(session, storage=storage, model_id=model_id,
                                            task=task, storage_key=storage_key, dtype=dtype,
                                            cache_dir=settings.model_cache_dir)
            else:
                row = register_local_model(session, model_id=model_id, task=task, path=path,
                                           models_dir=settings.models_dir, dtype=dtype)
            typer.echo(json.dumps({"id": row.id, "object": "model", "task": row.task,
                                   "params": row.params, "dtype": row.dtype,
                                   "path": row.local_path,
                                   "storage_key": row.storage_key, "sha256": row.sha256}))
    except StorageError as err:
        console.print(f"[red]storage error:[/red] {err.message}")
        raise typer.Exit(code=1) from err


def _timestamp(value: datetime | None) -> str:
    """A stored time as a short UTC string ('' for none)."""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M") if value is not None else ""


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="the tenant the key acts as (created if missing)")],
) -> None:
    """Make a new API key for a tenant; the key is printed this once (only its hash is stored)."""
    from api.services.tenants import create_api_key, is_open_mode

    settings = load_settings()
    with admin_errors(), database_session(settings) as session:
        first = is_open_mode(session, settings=settings)
        row, key = create_api_key(session, tenant_name=tenant)
    console.print(f"created {row.id} (prefix {row.prefix}) for tenant {tenant}; the key is "
                  "shown only now: store it", highlight=False)
    if first:
        console.print("[yellow]first API key:[/yellow] an API already running in open mode "
                      "stays open until restarted", highlight=False)
    out.print(key, highlight=False)


@keys_app.command("revoke")
def keys_revoke(
    id_or_prefix: Annotated[str, typer.Argument(metavar="ID_OR_PREFIX",
                                                help="a key's id or display prefix")],
) -> None:
    """Revoke an API key: from the next request on, it is refused (401)."""
    from api.services.tenants import revoke_api_key

    with admin_errors(), database_session(load_settings()) as session:
        row = revoke_api_key(session, id_or_prefix=id_or_prefix)
    console.print(f"revoked {row.id} (prefix {row.prefix}) at {_timestamp(row.revoked_at)} UTC",
                  highlight=False)


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Option(help="only this tenant's keys")] = None,
) -> None:
    """List stored API keys (ids and prefixes, never the keys), oldest first; times in UTC.
    `unconfigured`: a SPEFT_API_KEYS key missing from the configuration since then."""
    from api.core.models import API_KEY_PREFIX_LENGTH
    from api.services.tenants import list_api_keys

    with database_session(load_settings()) as session:
        keys = list_api_keys(session, tenant_name=tenant)
    table = Table(title=f"{len(keys)} key(s)", box=box.SIMPLE_HEAD)
    # Id and prefix stay whole (they are what `speft keys revoke` takes); the rest may wrap.
    table.add_column("id", no_wrap=True, min_width=ID_COLUMN_WIDTH)
    table.add_column("prefix", no_wrap=True, min_width=API_KEY_PREFIX_LENGTH)
    for name in ("tenant", "created", "revoked", "unconfigured"):
        table.add_column(name)
    for row, tenant_name in keys:
        table.add_row(row.id, row.prefix, tenant_name, _timestamp(row.created_at),
                      _timestamp(row.revoked_at), _timestamp(row.unconfigured_at))
    out.print(table)
