"""The service's processes: `speft serve` (the REST API), `speft worker` (a training Celery worker
and, beside it, a control worker on threads with the embedded beat) and `speft run` (API and
workers in the foreground, what `make run` starts)."""
from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from typing import TYPE_CHECKING, Annotated

import typer

from api.cli.admin import database_session
from api.cli.console import console, load_settings
from api.core.config import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

SHUTDOWN_GRACE_S = 10.0
# How `speft serve` hands its open-mode decision to the app in each uvicorn worker process.
OPEN_MODE_ENV = "SPEFT_SERVE_OPEN_MODE"


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    open_mode = serves_open(settings)  # decided once, before binding: the guard and the app
    if open_mode:
        if not is_loopback(host):
            console.print(f"[red]error (--host):[/red] open mode binds to 127.0.0.1 only; "
                          f"set SPEFT_API_KEYS or create a key (speft keys create) to listen "
                          f"on {host}")
            raise typer.Exit(code=2)
        console.print("[yellow]open mode:[/yellow] no SPEFT_API_KEYS set and no API key in the "
                      "database; single tenant, no authentication, loopback only")
    os.environ[OPEN_MODE_ENV] = "1" if open_mode else "0"  # for served_app, in every worker
    uvicorn.run(f"{__name__}:served_app", factory=True, host=host, port=port, workers=workers,
                access_log=access_log)


def serves_open(settings: Settings) -> bool:
    """Migrate the database, sync SPEFT_API_KEYS and decide open mode (no configured key, no
    usable stored key): what `speft serve` binds with and hands to the app."""
    from api.services.tenants import decide_open_mode

    with database_session(settings) as session:
        return decide_open_mode(session, settings=settings)


def served_app() -> FastAPI:
    """The app `speft serve` runs (uvicorn factory), in the open mode the launcher decided."""
    from api.main import create_app

    decided = os.environ.get(OPEN_MODE_ENV)
    return create_app(open_mode=None if decided is None else decided == "1")


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


WORKER_ROLES = ("all", "training", "control")
CONTROL_THREADS = 8  # the control worker's default thread count


def worker(
    device: Annotated[str, typer.Option(help="cpu, cuda, auto (cuda when present) or all (cpu "
                                             "and, when present, cuda): the jobs this worker "
                                             "trains, from the queues SPEFT_QUEUE_PREFIX + "
                                             "device")] = "auto",
    queues: Annotated[str | None, typer.Option(help="comma-separated queues, instead of the "
                                                    "device's own")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="training processes (jobs at once)")] = 1,
    pool: Annotated[str | None, typer.Option(help="solo or prefork (default: solo with the "
                                                  "embedded broker, prefork otherwise)")] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level")] = "INFO",
    role: Annotated[str, typer.Option(help="all (a training worker and a control worker side "
                                           "by side), training, or control (the reconciler "
                                           "and webhook deliveries, on threads)")] = "all",
    control_threads: Annotated[int, typer.Option(min=1, help="the control worker's threads "
                                                             "(deliveries and sweeps at "
                                                             "once)")] = CONTROL_THREADS,
) -> None:
    """Run the Celery workers that train jobs and do the service's own work (the reconciler,
    webhook deliveries); configured by SPEFT_* environment variables."""
    settings = load_settings()
    if role not in WORKER_ROLES:
        console.print(f"[red]error (--role):[/red] expected {', '.join(WORKER_ROLES)}; got "
                      f"{role!r}")
        raise typer.Exit(code=2)
    from api.cli.supervision import fork_worker, supervise
    from api.core.queue import run_worker

    # The control worker: its own process and thread pool, so a sweep or a delivery never waits
    # for a training slot. It embeds the group's one beat, which schedules the reconciler
    # (sweeps are idempotent, so one beat per `speft worker` is harmless), keeps its schedule
    # in memory and exits with this worker (worker.celery_app).
    control = ["worker", f"--queues={settings.control_queue},{settings.webhook_queue}",
               "--pool=threads", f"--concurrency={control_threads}", f"--loglevel={loglevel}",
               "--hostname=speft-control@%h", "--beat"]
    if role == "control":
        run_worker(control)
        return
    pool, queues = _training_pool_and_queues(settings, device=device, queues=queues, pool=pool)
    training = ["worker", f"--queues={queues}", f"--concurrency={concurrency}", f"--pool={pool}",
                f"--loglevel={loglevel}", "--hostname=speft-training@%h"]
    if role == "training":
        run_worker(training)
        return
    # all: both, forked from this process (in its process group, so a signal to the group
    # reaches them; each exits when this process is gone).
    children = [fork_worker(training, what="training worker"),
                fork_worker(control, what="control worker")]
    raise typer.Exit(code=supervise(children, what="training and control workers",
                                    grace_s=None))


def _training_pool_and_queues(settings: Settings, *, device: str, queues: str | None,
                              pool: str | None) -> tuple[str, str]:
    """The training worker's pool and queues; a clear message and exit 2 when refused."""
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
    return pool, queues or ",".join(settings.queue_for(kind) for kind in kinds)


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
    from api.cli.supervision import supervise

    raise typer.Exit(code=supervise([p.pid for p in processes], what="API and worker",
                                    grace_s=SHUTDOWN_GRACE_S))
