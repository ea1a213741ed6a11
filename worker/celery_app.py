"""The consuming Celery app: `api.core.queue`'s configured app plus the tasks, the reconciler's
beat schedule and the DB pool disposal after fork (children never share sockets)."""
from __future__ import annotations

from celery import Celery
from celery.signals import worker_process_init

from api.core.config import Settings, get_settings
from api.core.queue import RECONCILE_TASK, configured_celery


def create_celery(settings: Settings | None = None) -> Celery:
    """The worker's app: worker.tasks included, the reconciler scheduled (tests pass settings)."""
    settings = settings or get_settings()
    app = configured_celery(settings, include=["worker.tasks"])
    # The reconciler (worker.tasks.reconcile), sent by the beat each worker embeds to the control
    # queue every worker reads; a sweep nobody picked up in time expires instead of piling up.
    app.conf.beat_schedule = {"speft-reconcile": {
        "task": RECONCILE_TASK, "schedule": settings.reconcile_interval_s,
        "options": {"queue": settings.control_queue, "expires": settings.reconcile_interval_s}}}
    return app


@worker_process_init.connect
def _dispose_db_pool_after_fork(**_: object) -> None:
    """A forked worker child must not reuse the parent's database connections."""
    from api.core.db import dispose_engine

    dispose_engine()


app = create_celery()
