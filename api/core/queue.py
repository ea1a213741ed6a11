"""The send side of the job queue: task names, the broker, a configured Celery app, the enqueuer.

api/ never imports worker/: the API and the reconciler send tasks by name through an app made
here (`configured_celery`, no tasks included), and `worker.celery_app` builds the consuming app on
the same factory (tasks, beat schedule, pool disposal after fork). Task names are spelled here
only; the worker's `@app.task(name=...)` decorators use these constants.

Reliability settings (STYLE.md, Sentry/Superset practice): tasks are acknowledged only after
they finish (`acks_late`) and re-queued if the worker process dies (`reject_on_worker_lost`);
each worker reserves one message at a time (prefetch 1); job state lives in the database,
never in a result backend.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy.engine import make_url

from api.core.config import Settings, get_settings

RUN_JOB_TASK = "speft.run_job"  # run_job(job_id): train one job to a terminal status
RECONCILE_TASK = "speft.reconcile"  # reconcile(): one reconciler sweep
DELIVER_WEBHOOK_TASK = "speft.deliver_webhook"  # deliver_webhook(delivery_id): POST one event
WORKER_APP = "worker.celery_app"  # the consuming app, started by name (`celery -A`)
REDIS_VISIBILITY_TIMEOUT_S = 6 * 3600
PARENT_POLL_S = 0.5  # how often a worker process checks that the process that started it runs

log = logging.getLogger(__name__)


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


def configured_celery(settings: Settings | None = None, *, include: Iterable[str] = ()) -> Celery:
    """A Celery app configured from settings (tests pass their own), with the task modules in
    `include` (none for an app that only sends)."""
    settings = settings or get_settings()
    url = broker_url(settings)
    app = Celery("speft", broker=url, include=list(include))
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
    if url.startswith(("redis://", "rediss://")):
        # An unacknowledged job message comes back only after this long: longer than a job.
        app.conf.broker_transport_options = {"visibility_timeout": REDIS_VISIBILITY_TIMEOUT_S}
    return app


def run_worker(argv: list[str]) -> None:
    """Run `celery worker` in this process on the consuming app (`WORKER_APP`) with `argv`."""
    configured_celery().worker_main(["--app", WORKER_APP, *argv])


def exit_with_parent(parent: int, *, what: str,
                     on_gone: Callable[[], None] | None = None) -> threading.Thread:
    """Watch, from a daemon thread, that process `parent` is still this one's parent; once it
    is gone (also after a SIGKILL that let it warn nobody) call `on_gone`, by default exit at
    once (`os._exit`: what this process runs dies with its parent, as on a machine loss)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        log.warning("%s: process %d that started it is gone; exiting", what, parent)
        (on_gone or (lambda: os._exit(1)))()

    thread = threading.Thread(target=watch, name=f"{what}-parent-watch", daemon=True)
    thread.start()
    return thread


class CeleryEnqueuer:
    """`enqueue(job_id, device)` sends `speft.run_job` to the device's queue; `check()` probes the
    broker.

    The Celery app is built on first use, so an app whose enqueue is replaced never builds one.
    """

    def __init__(self, settings: Settings, *, celery: Any = None) -> None:
        self.settings = settings
        if celery is not None:  # a worker sends through its own app
            self.celery = celery

    @functools.cached_property
    def celery(self) -> Any:
        """The send-only Celery app."""
        return configured_celery(self.settings)

    def __call__(self, job_id: str, device: str) -> None:
        """Send one run_job message for `job_id` to the queue of `device`."""
        self.celery.send_task(RUN_JOB_TASK, args=[job_id], queue=self.settings.queue_for(device))

    def deliver_webhook(self, delivery_id: str) -> None:
        """Send one deliver_webhook message to the webhook queue (every control worker reads it)."""
        self.celery.send_task(DELIVER_WEBHOOK_TASK, args=[delivery_id],
                              queue=self.settings.webhook_queue)

    def check(self) -> None:
        """Raise when the broker cannot be reached."""
        with self.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1)
            _ = connection.default_channel
