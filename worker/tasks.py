"""The Celery tasks: `run_job` (claim → train → publish or fail) and the `reconcile` sweep.

`run_job(job_id)` takes an id, never an object; all state lives in the database (status changes go
through `api.services.jobs`, one function per transition; a run's inputs and its adapter through
`api.services.job_runs`). A redelivered message for a job that is already running or finished does
nothing (the claim is refused). While a job runs, a heartbeat thread (`worker.heartbeat`) stamps
`heartbeat_at` every SPEFT_HEARTBEAT_INTERVAL_S; every write after the claim is leased to its
attempt number, so a worker presumed dead cannot touch the job again.

`reconcile()` is the periodic sweep (`api.services.reconciler`), scheduled by the Celery beat
that every `speft worker` embeds: it re-queues or fails jobs whose worker stopped heart-beating
and re-sends queued jobs whose message was lost.

Storage and the database are built from `get_settings()` once per process (`get_storage()`,
`api.core.db.get_engine()`); tests point them elsewhere by setting `SPEFT_*` and calling
`get_settings.cache_clear()`, `dispose_engine()` and `get_storage.cache_clear()`.
"""
from __future__ import annotations

import functools
import logging
import os
import socket
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.core.config import get_settings
from api.core.db import get_session_factory
from api.core.models import Job, JobStatus, utcnow
from api.core.queue import RECONCILE_TASK, RUN_JOB_TASK, CeleryEnqueuer
from api.core.storage import (
    RetryingStorage,
    Storage,
    StorageUnavailable,
    open_storage,
    retry_while_unavailable,
)
from api.core.unit_of_work import rollback_and_undo, unit_of_work
from api.services import checkpoints, job_runs, webhooks
from api.services.job_stops import release_job, retry_or_fail
from api.services.jobs import (
    INTERNAL_ERROR,
    USER_ERROR,
    claim_job,
    current_attempt,
    finish_cancelled,
    finish_failed,
)
from api.services.reconciler import ReconcilePolicy, reconcile_jobs, sweep_orphan_objects
from speft_core.errors import SpeftError, TrainingCancelled, TrainingPaused
from speft_core.progress import SAVING, PhaseReport
from speft_core.train import fine_tune
from worker.celery_app import app
from worker.heartbeat import Heartbeat, ProgressClock
from worker.recorder import JobRecorder

log = logging.getLogger(__name__)


@functools.cache
def get_storage() -> Storage:
    """This process's object storage, from SPEFT_STORAGE_URL (clear with get_storage.cache_clear())."""
    settings = get_settings()
    return open_storage(settings)


def worker_name() -> str:
    """host:pid of this worker process, recorded on the job it claims."""
    return f"{socket.gethostname()}:{os.getpid()}"


@app.task(name=RUN_JOB_TASK)
def run_job(job_id: str) -> None:
    """Run one fine-tuning job to a terminal status; does nothing unless the job is queued."""
    with get_session_factory()() as session:
        worker = worker_name()
        with unit_of_work(session):
            claimed = claim_job(session, job_id=job_id, worker=worker)
        if not claimed:
            log.info("speft.job not claimed (not queued) job_id=%s worker=%s", job_id, worker)
            return
        with unit_of_work(session):
            attempt = current_attempt(session, job_id=job_id)
        log.info("speft.job claimed job_id=%s worker=%s attempt=%d", job_id, worker, attempt)
        settings = get_settings()
        with Heartbeat(job_id, attempt, interval_s=settings.heartbeat_interval_s,
                       stall_timeout_s=settings.stall_timeout_s) as beat:
            _run_claimed(session, job_id, attempt, beat.progress)
        send_webhooks(session, job_id=job_id)


def send_webhooks(session: Session, *, job_id: str | None = None,
                  sent_before: datetime | None = None) -> list[str]:
    """Send the deliver task of each pending delivery not yet sent (of `job_id`; or also those
    last sent before `sent_before`), marking them sent first (committed); their ids. A broker
    that fails here leaves them to the reconciler's next sweep."""
    try:
        with unit_of_work(session):
            ids = webhooks.take_unsent(session, job_id=job_id, sent_before=sent_before)
        enqueue = CeleryEnqueuer(get_settings(), celery=app)
        for delivery_id in ids:
            enqueue.deliver_webhook(delivery_id)
    except Exception:
        log.exception("speft.webhook sending deliveries failed (the sweep retries)")
        return []
    return ids


def _run_claimed(session: Session, job_id: str, attempt: int, progress: ProgressClock) -> None:
    """Train a claimed job and record how it ended (every write leased to `attempt`). Its
    storage calls are retried for SPEFT_STORAGE_RETRY_S; storage still refusing after that
    re-queues the job (or fails it, out of attempts)."""
    try:
        retry_s = get_settings().storage_retry_s
        storage = RetryingStorage(retry_while_unavailable(get_storage, timeout_s=retry_s,
                                                          what="opening the storage"),
                                  timeout_s=retry_s)
        with job_runs.local_inputs(session, storage=storage, job_id=job_id,
                                   cache_dir=get_settings().model_cache_dir) as (spec, device):
            resume = checkpoints.latest_state(session, storage=storage, job_id=job_id)
            session.commit()
            recorder = JobRecorder(session, job_id, attempt, progress, storage=storage,
                                   keep_checkpoints=spec.hyperparameters.keep_checkpoints,
                                   after_checkpoint=lambda: send_webhooks(session, job_id=job_id))
            result = fine_tune(spec, device=device, callbacks=recorder.callbacks(),
                               resume=resume)
        recorder.on_phase(PhaseReport(SAVING))
        job_runs.publish_adapter(session, storage=storage, job_id=job_id, attempt=attempt,
                                 spec=spec, result=result)
    except TrainingPaused as err:
        rollback_and_undo(session)
        with unit_of_work(session):
            status = release_job(
                session, job_id=job_id, attempt=attempt, voluntary=True, step=err.step,
                reason=f"the pause was withdrawn after its worker had stopped at step "
                       f"{err.step}; it goes on from that step's checkpoint")
        _after_release(session, job_id, status)
        log.info("speft.job stopped on a pause request job_id=%s status=%s: %s", job_id,
                 status, err.message)
    except TrainingCancelled:
        rollback_and_undo(session)
        with unit_of_work(session):
            finish_cancelled(session, job_id=job_id, attempt=attempt)
        log.info("speft.job cancelled job_id=%s", job_id)
    except SpeftError as err:
        _fail(session, job_id, attempt, USER_ERROR, err.message, err.param)
        log.info("speft.job failed job_id=%s code=%s error=%r", job_id, USER_ERROR, err.message)
    except job_runs.DeviceUnavailable as err:
        _fail(session, job_id, attempt, INTERNAL_ERROR, str(err), "device")
        log.error("speft.job misrouted job_id=%s worker=%s: %s", job_id, worker_name(), err)
    except StorageUnavailable as err:
        log.error("speft.job storage still unavailable after retries job_id=%s: %s", job_id,
                  err.message)
        rollback_and_undo(session)
        with unit_of_work(session):
            status = retry_or_fail(session, job_id=job_id, attempt=attempt,
                                   max_attempts=get_settings().max_attempts,
                                   reason=f"object storage unavailable: {err.message}")
        _after_release(session, job_id, status)
    except Exception as err:
        log.exception("speft.job internal error job_id=%s", job_id)
        _fail(session, job_id, attempt, INTERNAL_ERROR, f"internal error: {type(err).__name__}")


def _after_release(session: Session, job_id: str, status: JobStatus | None) -> None:
    """Send a job the attempt re-queued (its status is committed); a broker that fails leaves
    it to the reconciler, which re-sends a queued job not claimed within SPEFT_REQUEUE_AFTER_S."""
    if status != JobStatus.QUEUED:
        return
    try:
        with unit_of_work(session):
            device = session.get(Job, job_id).device
        CeleryEnqueuer(get_settings(), celery=app)(job_id, device)
    except Exception:
        log.exception("speft.job re-queued but not sent job_id=%s (the reconciler re-sends it)",
                      job_id)


def _fail(session: Session, job_id: str, attempt: int, code: str, message: str,
          param: str | None = None) -> None:
    """Roll back whatever the attempt had begun and fail the job (if still this attempt's)."""
    rollback_and_undo(session)
    with unit_of_work(session):
        finish_failed(session, job_id=job_id, code=code, message=message, param=param,
                      attempt=attempt)


@app.task(name=RECONCILE_TASK)
def reconcile() -> dict[str, list[str]]:
    """One reconciler sweep: re-queue, fail or cancel jobs whose worker died, re-send queued jobs
    whose message was lost, delete the uploads of jobs that ended without an adapter, and remove
    the orphan objects of deleted files and adapters."""
    settings = get_settings()
    with get_session_factory()() as session:
        with unit_of_work(session):
            done = reconcile_jobs(session, policy=ReconcilePolicy.from_settings(settings))
        purged = _sweep_orphans(session)
        send_webhooks(session, sent_before=utcnow() - webhooks.RESEND_AFTER)
        if not done:
            return {"purged": purged} if purged else {}
        with unit_of_work(session):
            sends = [(job.id, job.device) for job in
                     session.scalars(select(Job).where(Job.id.in_(done.to_send)))]
            given_up = session.execute(select(Job.id, Job.attempts)
                                       .where(Job.id.in_(done.failed + done.cancelled))).all()
    enqueue = CeleryEnqueuer(settings, celery=app)
    for job_id, device in sends:
        enqueue(job_id, device)
    for job_id, attempts in given_up:
        job_runs.discard_attempts(get_storage(), job_id=job_id, attempts=attempts)
    log.warning("speft.reconcile requeued=%s failed=%s cancelled=%s resent=%s purged=%s",
                done.requeued, done.failed, done.cancelled, done.resent, purged)
    return {"requeued": done.requeued, "failed": done.failed, "cancelled": done.cancelled,
            "resent": done.resent, "purged": purged}


def _sweep_orphans(session: Session) -> list[str]:
    """Remove orphan objects (committed); a storage or database failure is logged and left to
    the next sweep (purging is idempotent)."""
    try:
        with unit_of_work(session):
            purged = sweep_orphan_objects(session, storage=get_storage())
    except Exception:
        log.exception("speft.reconcile orphan sweep failed")
        return []
    if purged:
        log.warning("speft.reconcile purged orphan objects %s", purged)
    return purged
