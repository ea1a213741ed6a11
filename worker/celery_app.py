"""The consuming Celery app: `api.core.queue`'s configured app plus the tasks, the reconciler's
beat schedule and the DB pool disposal after fork (children never share sockets).

The beat a worker embeds (`--beat`) keeps its schedule in memory (no file) and exits as soon as
its worker's main process is gone, also after a SIGKILL that gave the worker no time to stop it.
"""
from __future__ import annotations

import os

from celery import Celery
from celery.signals import beat_embedded_init, worker_init, worker_process_init

from api.core.config import Settings, get_settings
from api.core.queue import RECONCILE_TASK, configured_celery, exit_with_parent

# The reconciler's schedule is an interval; nothing about it is worth a file between starts.
IN_MEMORY_BEAT_SCHEDULER = "celery.beat:Scheduler"
_worker_pid: int | None = None  # the worker's main process, remembered before beat forks


def create_celery(settings: Settings | None = None) -> Celery:
    """The worker's app: worker.tasks included, the reconciler scheduled (tests pass settings)."""
    settings = settings or get_settings()
    app = configured_celery(settings, include=["worker.tasks", "worker.webhooks"])
    # The reconciler (worker.tasks.reconcile), sent by the beat each control worker embeds to
    # the control queue its threads read; a sweep nobody picked up in time expires.
    app.conf.beat_scheduler = IN_MEMORY_BEAT_SCHEDULER
    app.conf.beat_schedule = {"speft-reconcile": {
        "task": RECONCILE_TASK, "schedule": settings.reconcile_interval_s,
        "options": {"queue": settings.control_queue, "expires": settings.reconcile_interval_s}}}
    return app


@worker_process_init.connect
def _dispose_db_pool_after_fork(**_: object) -> None:
    """A forked worker child must not reuse the parent's database connections."""
    from api.core.db import dispose_engine

    dispose_engine()


@worker_init.connect
def _remember_worker_pid(**_: object) -> None:
    """Note the worker's main process (its embedded beat is forked from it later)."""
    global _worker_pid
    _worker_pid = os.getpid()


@beat_embedded_init.connect
def _exit_with_the_worker(**_: object) -> None:
    """In an embedded beat process: exit as soon as the worker that forked it is gone (no state
    to save: the schedule lives in memory)."""
    exit_with_parent(_worker_pid or os.getppid(), what="beat", on_gone=lambda: os._exit(0))


app = create_celery()
