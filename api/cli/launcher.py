"""The service's processes: `speft serve` (the REST API), `speft worker` (the Celery worker with
its embedded beat) and `speft run` (both in the foreground, what `make run` starts)."""
from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
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
    from api.core.queue import run_worker

    # Every worker also consumes the control queue and embeds a beat that schedules the
    # reconciler there (sweeps are idempotent, so one per worker is harmless); the beat keeps
    # its schedule in memory and exits with the worker (worker.celery_app).
    queues = f"{queues},{settings.control_queue}"
    run_worker(["worker", f"--queues={queues}", f"--concurrency={concurrency}",
                f"--pool={pool}", f"--loglevel={loglevel}", "--beat"])


def _stop(processes: list[subprocess.Popen[bytes]], sig: int) -> None:
    """Send `sig` to every process still running."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(sig)


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
