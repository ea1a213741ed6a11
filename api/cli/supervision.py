"""The launcher's child processes: Celery workers forked from it, and the loop that supervises
children until they exit.

A forked worker shares what the launcher has already imported (torch above all), so `speft
worker` starts its training and control workers in about the time one took; each exits with
the launcher, also after a SIGKILL of it (`exit_with_parent`).
"""
from __future__ import annotations

import os
import signal
import sys
import time
import traceback

from api.cli.console import console
from api.core.queue import exit_with_parent, run_worker

POLL_S = 0.2


def fork_worker(argv: list[str], *, what: str) -> int:
    """Fork a child that runs `celery worker` with `argv` and exits with its status (and as soon
    as this process is gone); the child's pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        exit_with_parent(parent, what=what)
        run_worker(argv)
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def supervise(pids: list[int], *, what: str, grace_s: float | None) -> int:
    """Wait while every child runs. A SIGINT or SIGTERM here, or one of them exiting, sends
    SIGTERM to the others; they get `grace_s` (None: as long as they take) to exit, then
    SIGKILL, as at once on a second signal. 0 when every one exited with 0, else 1."""
    codes: dict[int, int] = {}
    stopping = False

    def running() -> list[int]:
        return [pid for pid in pids if pid not in codes]

    def reap() -> None:
        for pid in running():
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)

    def send(sig: int) -> None:
        for pid in running():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        if stopping:  # a second Ctrl-C: do not wait for a running job
            send(signal.SIGKILL)
            return
        stopping = True
        console.print(f"stopping {what} (Ctrl-C again to force)")
        send(signal.SIGTERM)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while len(running()) == len(pids) and not stopping:
        time.sleep(POLL_S)
        reap()
    if not stopping:  # one of them exited by itself: stop the others
        stopping = True
        send(signal.SIGTERM)
    deadline = None if grace_s is None else time.monotonic() + grace_s
    while running() and (deadline is None or time.monotonic() < deadline):
        time.sleep(POLL_S)
        reap()
    send(signal.SIGKILL)
    for pid in running():
        codes[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return 0 if all(code == 0 for code in codes.values()) else 1
