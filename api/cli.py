"""The `speft` command line: `train` (local, from speft_core), `serve`, `worker`, `run`, the
REST client sub-commands `files`, `jobs` and `adapters` (DESIGN.md §2), and the server-side
administration of `models` and `keys` (these write the database directly)."""
from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from api.client import API_KEY_ENV, BASE_URL_ENV, DEFAULT_BASE_URL, ApiClientError, SpeftClient
from api.core.config import Settings
from speft_core.cli import train

app = typer.Typer(help="speft: salience-aware sparse fine-tuning, as a library and a service.",
                  no_args_is_help=True, add_completion=False)
files_app = typer.Typer(help="Datasets on the server.", no_args_is_help=True)
jobs_app = typer.Typer(help="Fine-tuning jobs on the server.", no_args_is_help=True)
adapters_app = typer.Typer(help="Trained adapters (sparse deltas) on the server.",
                           no_args_is_help=True)
app.command()(train)
app.add_typer(files_app, name="files")
app.add_typer(jobs_app, name="jobs")
app.add_typer(adapters_app, name="adapters")
models_app = typer.Typer(help="Base models (server-side administration).", no_args_is_help=True)
app.add_typer(models_app, name="models")
keys_app = typer.Typer(help="API keys and tenants (server-side administration).",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")

console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

TERMINAL_EXIT_CODES = {"succeeded": 0, "failed": 1, "cancelled": 2}
POLL_INTERVAL_S = 1.0
SHUTDOWN_GRACE_S = 10.0
WIDE_TABLE_COLUMNS = 120
ID_COLUMN_WIDTH = 28  # `key-` and 24 hex digits

BaseUrlOpt = Annotated[str, typer.Option("--base-url", envvar=BASE_URL_ENV,
                                         help="the speft API", show_default=DEFAULT_BASE_URL)]
ApiKeyOpt = Annotated[str | None, typer.Option("--api-key", envvar=API_KEY_ENV,
                                               help="an API key (Bearer)", show_default=False)]


def load_settings() -> Settings:
    """Settings from the environment; a clear message and exit 2 when they are invalid."""
    try:
        return Settings()
    except ValidationError as err:
        for problem in err.errors():
            console.print(f"[red]configuration error:[/red] {problem['msg']}")
        raise typer.Exit(code=2) from err


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- server processes --------------------------------------------------------------------------
@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="bind address (default SPEFT_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default SPEFT_PORT)")] = None,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes")] = 1,
    access_log: Annotated[bool, typer.Option(help="log one line per request")] = True,
) -> None:
    """Run the REST API (uvicorn); configured by SPEFT_* environment variables."""
    import uvicorn

    settings = load_settings()
    host = host or settings.host
    port = port or settings.port
    if serves_open(settings):
        if not is_loopback(host):
            console.print(f"[red]error (--host):[/red] open mode binds to 127.0.0.1 only; "
                          f"set SPEFT_API_KEYS or create a key (speft keys create) to listen "
                          f"on {host}")
            raise typer.Exit(code=2)
        console.print("[yellow]open mode:[/yellow] no SPEFT_API_KEYS set and no API key in the "
                      "database; single tenant, no authentication, loopback only")
    uvicorn.run("api.main:create_app", factory=True, host=host, port=port, workers=workers,
                access_log=access_log)


def worker_devices(device: str, *, cuda_available: bool) -> list[str]:
    """The device kinds a worker serves: `cpu`, `cuda`, `auto` (cuda when this machine has one,
    else cpu) or `all` (cpu, and cuda when present). Each job trains on its own kind."""
    if device == "auto":
        return ["cuda" if cuda_available else "cpu"]
    if device == "all":
        return ["cpu", "cuda"] if cuda_available else ["cpu"]
    if device not in ("cpu", "cuda"):
        raise ValueError(f"expected cpu, cuda, auto or all; got {device!r}")
    if device == "cuda" and not cuda_available:
        raise ValueError("no CUDA device is visible to this worker")
    return [device]


@app.command()
def worker(
    device: Annotated[str, typer.Option(help="cpu, cuda, auto (cuda when present) or all (cpu "
                                             "and, when present, cuda): the jobs this worker "
                                             "trains, from the queues SPEFT_QUEUE_PREFIX + "
                                             "device")] = "auto",
    queues: Annotated[str | None, typer.Option(help="comma-separated queues, instead of the "
                                                    "device's own")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="worker processes")] = 1,
    pool: Annotated[str | None, typer.Option(help="solo or prefork (default: solo with the "
                                                  "embedded broker, prefork otherwise)")] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level")] = "INFO",
) -> None:
    """Run the Celery worker that trains jobs; configured by SPEFT_* environment variables."""
    settings = load_settings()
    pool = pool or ("solo" if settings.embedded_broker else "prefork")
    if pool not in ("solo", "prefork"):
        console.print(f"[red]error (--pool):[/red] expected solo or prefork; got {pool!r}")
        raise typer.Exit(code=2)
    import torch

    try:
        kinds = worker_devices(device, cuda_available=torch.cuda.is_available())
    except ValueError as err:
        console.print(f"[red]error (--device):[/red] {err}")
        raise typer.Exit(code=2) from err
    queues = queues or ",".join(settings.queue_for(kind) for kind in kinds)
    from worker.celery_app import app as celery_app

    # Every worker also consumes the control queue and embeds a beat that schedules the
    # reconciler there (sweeps are idempotent, so one per worker is harmless).
    queues = f"{queues},{settings.control_queue}"
    schedule = Path(tempfile.gettempdir()) / f"speft-beat-{os.getpid()}"
    celery_app.worker_main(["worker", f"--queues={queues}",
                            f"--concurrency={concurrency}", f"--pool={pool}",
                            f"--loglevel={loglevel}", "--beat", f"--schedule={schedule}"])


def _stop(processes: list[subprocess.Popen[bytes]], sig: int) -> None:
    """Send `sig` to every process still running."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(sig)


@app.command()
def run(
    host: Annotated[str | None, typer.Option(help="bind address (default SPEFT_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default SPEFT_PORT)")] = None,
) -> None:
    """API and worker together in the foreground (what `make run` starts); Ctrl-C stops both."""
    load_settings()  # fail here, once, on a bad configuration
    base = [sys.executable, "-m", "api.cli"]
    serve_args = ["serve"] + (["--host", host] if host else []) + (
        ["--port", str(port)] if port else [])
    # Own sessions: only this launcher gets the terminal's Ctrl-C, and forwards exactly one signal.
    processes = [subprocess.Popen(base + ["worker", "--device", "all"], start_new_session=True),
                 subprocess.Popen(base + serve_args, start_new_session=True)]
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        if stopping:  # a second Ctrl-C: do not wait for a running job
            _stop(processes, signal.SIGKILL)
            return
        stopping = True
        console.print("stopping API and worker (Ctrl-C again to force)")
        _stop(processes, signal.SIGTERM)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while all(p.poll() is None for p in processes) and not stopping:
        time.sleep(0.2)
    if not stopping:  # one of them exited by itself: stop the other
        stopping = True
        _stop(processes, signal.SIGTERM)
    deadline = time.monotonic() + SHUTDOWN_GRACE_S
    while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    _stop(processes, signal.SIGKILL)
    codes = [p.wait() for p in processes]
    raise typer.Exit(code=0 if all(code == 0 for code in codes) else 1)


# -- client ----------------------------------------------------------------------------------------
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


def print_json(value: Any) -> None:
    """Print an API object as indented JSON on stdout."""
    out.print_json(json.dumps(value))


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
        row = [job["id"], job["status"], job["model"],
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


def _latest_loss(client: SpeftClient, job_id: str) -> str:
    """'loss X' from the job's latest step metric, or ''."""
    losses = [row["train_loss"] for row in client.job_metrics(job_id)
              if row.get("train_loss") is not None]
    return f"loss {losses[-1]:.4f}" if losses else ""


def wait_for_job(client: SpeftClient, job_id: str) -> int:
    """Poll a job with a progress bar until it ends; the exit code for its terminal status."""
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[loss]}"), TimeElapsedColumn(),
                  console=console) as progress:
        bar = progress.add_task(job_id, total=None, loss="")
        while True:
            job = client.get_job(job_id)
            step = (job.get("progress") or {}).get("step", 0)
            total = (job.get("progress") or {}).get("total_steps")
            loss = _latest_loss(client, job_id) if job["status"] != "queued" else ""
            progress.update(bar, description=f"{job_id} {job['status']}", completed=step,
                            total=total, loss=loss)
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


# -- server administration (writes the database directly) ---------------------------------------
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


def serves_open(settings: Settings) -> bool:
    """Whether the API would start in open mode: no SPEFT_API_KEYS and no unrevoked stored key."""
    if not settings.open_mode:
        return False
    from api.services.tenants import is_open_mode

    with database_session(settings) as session:
        return is_open_mode(session, settings=settings)


@models_app.command("register")
def models_register(
    model_id: Annotated[str, typer.Argument(metavar="NAME", help="the model id users will name")],
    path: Annotated[Path | None, typer.Option(
        help="HF model folder, inside SPEFT_MODELS_DIR")] = None,
    storage_key: Annotated[str | None, typer.Option(
        help="key of a tar archive of a HF model folder in SPEFT_STORAGE_URL")] = None,
    task: Annotated[str, typer.Option(help="classification or causal_lm")] = "classification",
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
                storage = open_storage(settings.storage_url,
                                       s3_endpoint_url=settings.s3_endpoint_url)
                row = register_stored_model(session, storage=storage, model_id=model_id,
                                            task=task, storage_key=storage_key,
                                            cache_dir=settings.model_cache_dir)
            else:
                row = register_local_model(session, model_id=model_id, task=task, path=path,
                                           models_dir=settings.models_dir)
            typer.echo(json.dumps({"id": row.id, "object": "model", "task": row.task,
                                   "params": row.params, "path": row.local_path,
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
    """List stored API keys (ids and prefixes, never the keys), oldest first; times in UTC."""
    from api.core.models import API_KEY_PREFIX_LENGTH
    from api.services.tenants import list_api_keys

    with database_session(load_settings()) as session:
        keys = list_api_keys(session, tenant_name=tenant)
    table = Table(title=f"{len(keys)} key(s)", box=box.SIMPLE_HEAD)
    # Id and prefix stay whole (they are what `speft keys revoke` takes); the rest may wrap.
    table.add_column("id", no_wrap=True, min_width=ID_COLUMN_WIDTH)
    table.add_column("prefix", no_wrap=True, min_width=API_KEY_PREFIX_LENGTH)
    for name in ("tenant", "created", "revoked"):
        table.add_column(name)
    for row, tenant_name in keys:
        table.add_row(row.id, row.prefix, tenant_name, _timestamp(row.created_at),
                      _timestamp(row.revoked_at))
    out.print(table)


if __name__ == "__main__":
    app()
