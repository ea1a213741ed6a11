"""The Celery app: Redis in production, an embedded SQLite-backed transport by default.

Reliability settings (STYLE.md, Sentry/Superset practice): tasks are acknowledged only after
they finish (`acks_late`) and re-queued if the worker process dies (`reject_on_worker_lost`);
each worker reserves one message at a time (prefetch 1); job state lives in the database,
never in a result backend; the DB pool is disposed after fork so children never share sockets.
The beat a worker embeds (`--beat`) keeps its schedule in memory (no file) and exits as soon as
its worker's main process is gone, also after a SIGKILL that gave the worker no time to stop it.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from celery import Celery
from celery.signals import beat_embedded_init, worker_init, worker_process_init
from sqlalchemy.engine import make_url

from api.core.config import Settings, get_settings

log = logging.getLogger(__name__)

REDIS_VISIBILITY_TIMEOUT_S = 6 * 3600
# The reconciler's schedule is an interval; nothing about it is worth a file between starts.
IN_MEMORY_BEAT_SCHEDULER = "celery.beat:Scheduler"
PARENT_POLL_S = 0.5  # how often an embedded beat checks that its worker still runs
_worker_pid: int | None = None  # the worker's main process, remembered before beat forks


def embedded_broker_url(settings: Settings) -> str:
    """kombu's SQLAlchemy transport on a SQLite file beside the database (or in ./var)."""
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        folder = Path(url.database).expanduser().resolve().parent
    else:
        folder = Path("var").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqla+sqlite:///{folder / 'broker.sqlite'}"


def broker_url(settings: Settings) -> str:
    """SPEFT_BROKER_URL, or the embedded transport when it is unset."""
    return settings.broker_url or embedded_broker_url(settings)


def create_celery(settings: Settings | None = None) -> Celery:
    """A Celery app configured from settings (tests pass their own)."""
    settings = settings or get_settings()
    url = broker_url(settings)
    app = Celery("speft", broker=url, include=["worker.tasks"])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.queue_for(settings.default_device),
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    # The reconciler (worker.tasks.reconcile), sent by the beat each worker embeds to the control
    # queue every worker reads; a sweep nobody picked up in time expires instead of piling up.
    app.conf.beat_scheduler = IN_MEMORY_BEAT_SCHEDULER
    app.conf.beat_schedule = {"speft-reconcile": {
        "task": "speft.reconcile", "schedule": settings.reconcile_interval_s,
        "options": {"queue": settings.control_queue, "expires": settings.reconcile_interval_s}}}
    if url.startswith(("redis://", "rediss://")):
        # An unacknowledged job message comes back only after this long: longer than a job.
        app.conf.broker_transport_options = {"visibility_timeout": REDIS_VISIBILITY_TIMEOUT_S}
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
    """In an embedded beat process: exit as soon as the worker that forked it is gone."""
    parent = _worker_pid or os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        log.warning("beat: worker %d is gone; exiting", parent)
        os._exit(0)  # no state to save: the schedule lives in memory

    threading.Thread(target=watch, name="beat-parent-watch", daemon=True).start()


app = create_celery()
