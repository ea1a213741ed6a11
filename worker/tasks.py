"""The Celery task that runs a fine-tuning job: claim it, train with speft_core, record the outcome.

`run_job(job_id)` takes an id, never an object; all state lives in the database (status changes go
through `api.services.jobs`, one function per transition). A redelivered message for a job that is
already running or finished does nothing (the claim is refused). While a job runs, a heartbeat
thread stamps `heartbeat_at` every SPEFT_HEARTBEAT_INTERVAL_S; every write after the claim is
leased to its attempt number, so a worker presumed dead cannot touch the job again.

Adapters: one adapter id per job (`adapter_id_for`), one object key per attempt
(`attempt_key`). The object is uploaded before the success transition and deleted again when that
transition loses (the job was cancelled, failed or re-queued meanwhile); after a success, the
objects of earlier, killed attempts are deleted. So a job that succeeds leaves exactly one adapter
row and one object, and no adapter row ever points at a missing object.

`reconcile()` is the periodic sweep (`api.services.reconciler`), scheduled by the Celery beat
that every `speft worker` embeds: it re-queues or fails jobs whose worker stopped heart-beating
and re-sends queued jobs whose message was lost.

Storage and the database are built from `get_settings()` once per process (`get_storage()`,
`api.core.db.get_engine()`); tests point them elsewhere by setting `SPEFT_*` and calling
`get_settings.cache_clear()`, `dispose_engine()` and `get_storage.cache_clear()`.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.core.config import get_settings
from api.core.db import get_session_factory
from api.core.models import File, Job
from api.core.storage import Storage, open_storage
from api.services.job_requests import CeleryEnqueuer, job_device
from api.services.jobs import (
    INTERNAL_ERROR,
    USER_ERROR,
    add_event,
    claim_job,
    current_attempt,
    finish_cancelled,
    finish_failed,
    finish_succeeded,
    heartbeat,
    is_cancel_requested,
    record_eval,
    record_progress,
)
from api.services.models import model_reference
from api.services.reconciler import ReconcilePolicy, reconcile_jobs
from speft_core.config import JobSpec
from speft_core.delta import delta_to_bytes
from speft_core.errors import SpeftError, TrainingCancelled
from speft_core.train import StepReport, TrainCallbacks, TrainResult, fine_tune
from worker.celery_app import app

log = logging.getLogger(__name__)

CANCEL_POLL_S = 2.0  # how often a running job rereads its status to notice a cancel request


def adapter_id_for(job_id: str) -> str:
    """The id of the adapter a job makes: the same for every attempt (`ftjob-X` → `adapter-X`)."""
    return f"adapter-{job_id.removeprefix('ftjob-')}"


def attempt_key(adapter_id: str, attempt: int) -> str:
    """The storage key of the delta file uploaded by one attempt of the adapter's job."""
    return f"adapters/{adapter_id}.attempt-{attempt}.safetensors"


def delete_attempt_objects(storage: Storage, adapter_id: str, attempts: range) -> None:
    """Delete the delta files of the given attempts (missing ones are fine)."""
    for attempt in attempts:
        storage.delete(attempt_key(adapter_id, attempt))


@functools.cache
def get_storage() -> Storage:
    """This process's object storage, from SPEFT_STORAGE_URL (clear with get_storage.cache_clear())."""
    settings = get_settings()
    return open_storage(settings)


def worker_name() -> str:
    """host:pid of this worker process, recorded on the job it claims."""
    return f"{socket.gethostname()}:{os.getpid()}"


@app.task(name="speft.run_job")
def run_job(job_id: str) -> None:
    """Run one fine-tuning job to a terminal status; does nothing unless the job is queued."""
    with get_session_factory()() as session:
        worker = worker_name()
        claimed = claim_job(session, job_id=job_id, worker=worker)
        session.commit()
        if not claimed:
            log.info("speft.job not claimed (not queued) job_id=%s worker=%s", job_id, worker)
            return
        attempt = current_attempt(session, job_id=job_id)
        session.commit()
        log.info("speft.job claimed job_id=%s worker=%s attempt=%d", job_id, worker, attempt)
        with _Heartbeat(job_id, attempt, interval_s=get_settings().heartbeat_interval_s):
            _run_claimed(session, job_id, attempt)


def _run_claimed(session: Session, job_id: str, attempt: int) -> None:
    """Train a claimed job and record how it ended (every write leased to `attempt`)."""
    try:
        with _local_spec(session, job_id) as (spec, device):
            result = fine_tune(spec, device=device,
                               callbacks=_JobRecorder(session, job_id, attempt).callbacks())
        _publish(session, job_id, attempt, spec, result)
    except TrainingCancelled:
        session.rollback()
        finish_cancelled(session, job_id=job_id, attempt=attempt)
        session.commit()
        log.info("speft.job cancelled job_id=%s", job_id)
    except SpeftError as err:
        _fail(session, job_id, attempt, USER_ERROR, err.message, err.param)
        log.info("speft.job failed job_id=%s code=%s error=%r", job_id, USER_ERROR, err.message)
    except DeviceUnavailable as err:
        _fail(session, job_id, attempt, INTERNAL_ERROR, str(err), "device")
        log.error("speft.job misrouted job_id=%s worker=%s: %s", job_id, worker_name(), err)
    except Exception as err:
        log.exception("speft.job internal error job_id=%s", job_id)
        _fail(session, job_id, attempt, INTERNAL_ERROR, f"internal error: {type(err).__name__}")


def _fail(session: Session, job_id: str, attempt: int, code: str, message: str,
          param: str | None = None) -> None:
    """Roll back whatever the attempt had begun and fail the job (if still this attempt's)."""
    session.rollback()
    finish_failed(session, job_id=job_id, code=code, message=message, param=param,
                  attempt=attempt)
    session.commit()


class _Heartbeat:
    """A thread that stamps the job's `heartbeat_at` every `interval_s` while the attempt runs,
    with its own database session (training may hold the main one for minutes between steps:
    model download, salience scoring). A failed stamp is logged and retried on the next tick."""

    def __init__(self, job_id: str, attempt: int, *, interval_s: float) -> None:
        self.job_id, self.attempt, self.interval_s = job_id, attempt, interval_s
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}",
                                       daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopped.set()
        self.thread.join()

    def _beat(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                with get_session_factory()() as session:
                    alive = heartbeat(session, job_id=self.job_id, attempt=self.attempt)
                    session.commit()
            except Exception:  # a missed beat is retried on the next tick; the job goes on
                log.warning("speft.job heartbeat failed job_id=%s", self.job_id, exc_info=True)
                continue
            if not alive:  # finished, cancelled or taken over: nothing left to keep alive
                return


@contextlib.contextmanager
def _local_spec(session: Session, job_id: str) -> Iterator[tuple[JobSpec, torch.device]]:
    """The job's stored body as a JobSpec whose files are verified local copies, and the device
    it trains on."""
    job = session.get(Job, job_id)
    if job is None:
        raise LookupError(f"job {job_id} vanished after being claimed")
    storage = get_storage()
    body = dict(job.spec)
    device = _training_device(body.pop("device", "cpu"))
    settings = get_settings()
    body["model"] = model_reference(session, storage=storage, model_id=job.model,
                                    cache_dir=settings.model_cache_dir)
    with contextlib.ExitStack() as stack:
        for field, file_id in (("training_file", job.training_file),
                               ("validation_file", job.validation_file)):
            body[field] = None
            if file_id is not None:
                row = session.get(File, file_id)
                if row is None:
                    raise LookupError(f"{field} {file_id} of job {job_id} not found")
                path: Path = stack.enter_context(storage.open_local(row.storage_key,
                                                                    sha256=row.sha256))
                body[field] = str(path)
        session.commit()  # end the read transaction before training starts
        yield JobSpec.from_dict(body), device


class DeviceUnavailable(RuntimeError):
    """The job names a device kind this worker does not have (it was consumed from the wrong
    queue): an operator's problem, so the job fails as an internal error with this message."""


def _training_device(kind: str) -> torch.device:
    """The torch device for a job's device kind; DeviceUnavailable when this machine lacks it."""
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(
            "the job asked for device 'cuda' but this worker has no CUDA device; run "
            "`speft worker --device cuda` on a GPU machine (it consumes the cuda queue)")
    return torch.device(kind)


def _publish(session: Session, job_id: str, attempt: int, spec: JobSpec,
             result: TrainResult) -> None:
    """Upload the delta and make the job succeeded; the object is deleted unless the job is."""
    storage = get_storage()
    adapter_id = adapter_id_for(job_id)
    key = attempt_key(adapter_id, attempt)
    stored = storage.put(key, delta_to_bytes(result.delta))
    try:
        succeeded = finish_succeeded(
            session, job_id=job_id, adapter_id=adapter_id, storage_key=key,
            nnz=result.delta.nnz, density=float(spec.speft.density), metric=spec.speft.metric,
            bytes=stored.size, sha256=stored.sha256, eval=_json_safe(result.eval),
            trainable_params=result.trainable_params, attempt=attempt,
        )
        session.commit()
    except BaseException:
        session.rollback()
        storage.delete(key)
        raise
    if succeeded:
        delete_attempt_objects(storage, adapter_id, range(1, attempt))  # killed attempts' uploads
        log.info("speft.job succeeded job_id=%s adapter_id=%s", job_id, adapter_id)
        return
    storage.delete(key)
    # A cancel that came after the last step (a no-op when the job was re-queued meanwhile).
    cancelled = finish_cancelled(session, job_id=job_id, attempt=attempt)
    session.commit()
    log.info("speft.job finished elsewhere, adapter discarded job_id=%s cancelled=%s",
             job_id, cancelled)


@app.task(name="speft.reconcile")
def reconcile() -> dict[str, list[str]]:
    """One reconciler sweep: re-queue, fail or cancel jobs whose worker died, re-send queued jobs
    whose message was lost, and delete the uploads of jobs that ended without an adapter."""
    settings = get_settings()
    with get_session_factory()() as session:
        done = reconcile_jobs(session, policy=ReconcilePolicy.from_settings(settings))
        session.commit()
        if not done:
            return {}
        sends = [(job.id, job_device(job)) for job in
                 session.scalars(select(Job).where(Job.id.in_(done.to_send)))]
        given_up = session.execute(select(Job.id, Job.attempts)
                                   .where(Job.id.in_(done.failed + done.cancelled))).all()
        session.commit()
    enqueue = CeleryEnqueuer(settings, celery=app)
    for job_id, device in sends:
        enqueue(job_id, device)
    for job_id, attempts in given_up:
        delete_attempt_objects(get_storage(), adapter_id_for(job_id), range(1, attempts + 1))
    log.warning("speft.reconcile requeued=%s failed=%s cancelled=%s resent=%s",
                done.requeued, done.failed, done.cancelled, done.resent)
    return {"requeued": done.requeued, "failed": done.failed, "cancelled": done.cancelled,
            "resent": done.resent}


class _JobRecorder:
    """Training callbacks that write progress, metrics and events to the job and poll for cancel."""

    def __init__(self, session: Session, job_id: str, attempt: int) -> None:
        self.session, self.job_id, self.attempt = session, job_id, attempt
        self.stop = False
        self.last_poll = float("-inf")

    def callbacks(self) -> TrainCallbacks:
        """The TrainCallbacks to hand to speft_core."""
        return TrainCallbacks(on_step=self.on_step, on_eval=self.on_eval,
                              on_event=self.on_event, should_cancel=self.should_cancel)

    def on_step(self, report: StepReport) -> None:
        """Progress, heartbeat and one train metric row, committed at once."""
        active = record_progress(self.session, job_id=self.job_id, step=report.step,
                                 total=report.total_steps, train_loss=report.train_loss,
                                 lr=report.lr, grad_norm=report.grad_norm,
                                 attempt=self.attempt)
        self.session.commit()
        self.stop = self.stop or not active

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        """One eval metric row and event."""
        record_eval(self.session, job_id=self.job_id, step=step, metrics=_json_safe(metrics))
        self.session.commit()

    def on_event(self, message: str, data: dict[str, Any]) -> None:
        """A free-form training event."""
        add_event(self.session, job_id=self.job_id, message=message, data=_json_safe(data))
        self.session.commit()

    def should_cancel(self) -> bool:
        """True once the job is no longer active or a cancel was requested (read every few seconds)."""
        now = time.monotonic()
        if not self.stop and now - self.last_poll >= CANCEL_POLL_S:
            self.last_poll = now
            self.stop = is_cancel_requested(self.session, job_id=self.job_id)
            self.session.commit()
        return self.stop


def _json_safe(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of `data` that a JSON column accepts (numbers stay numbers, the rest become strings)."""
    return json.loads(json.dumps(data, default=str))
