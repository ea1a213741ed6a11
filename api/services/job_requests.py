"""Fine-tuning job requests: create (validated, idempotent), tenant-scoped reads, cancel, views.

The state machine lives in `api.services.jobs`; this module decides what a request may create
and how a job reads back. Creation never commits: the route commits, then enqueues (polar's
"enqueue after commit"), so a worker never looks for a row that is not there yet.

Idempotency: `Idempotency-Key` is unique per tenant (a constraint on `jobs`). The request hash is
the sha256 of the canonical JSON of the body with defaults filled in, so `{}` and the explicit
defaults are the same body. The insert is `ON CONFLICT DO NOTHING` on (tenant_id,
idempotency_key): of two racing requests one inserts, the other re-reads the winner's row.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from api.core.config import Settings
from api.core.db import dialect_insert
from api.core.models import (
    TERMINAL_STATUSES,
    File,
    Job,
    JobEvent,
    JobMetric,
    JobStatus,
    MetricKind,
    RegisteredModel,
    new_id,
    utcnow,
)
from api.errors import Conflict, InvalidRequest, NotFound
from api.schemas import JobCreate, JobError, JobObject, JobProgress
from api.schemas import JobEvent as JobEventObject
from api.schemas import JobMetric as JobMetricObject
from api.services import jobs, stored_objects

log = logging.getLogger(__name__)

IDEMPOTENCY_PARAM = "Idempotency-Key"
EnqueueJob = Callable[[str, str], None]  # (job id, device)


def request_hash(body: JobCreate) -> str:
    """sha256 of the body's canonical JSON (defaults filled in, keys sorted)."""
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _job_for_key(session: Session, *, tenant_id: str, key: str, body_hash: str) -> Job | None:
    """The tenant's job made with `key`, if any; Conflict when it was made from another body."""
    job = session.scalar(select(Job).where(Job.tenant_id == tenant_id,
                                           Job.idempotency_key == key))
    if job is not None and job.request_hash != body_hash:
        raise Conflict(f"Idempotency-Key {key!r} was already used with a different request body",
                       param=IDEMPOTENCY_PARAM)
    return job


def _base_model(session: Session, *, model_id: str) -> RegisteredModel:
    """The registered base model; 400 naming the valid ids otherwise."""
    row = session.get(RegisteredModel, model_id)
    if row is None:
        valid = ", ".join(session.scalars(select(RegisteredModel.id).order_by(RegisteredModel.id)))
        raise InvalidRequest(f"unknown model {model_id!r}; valid models: {valid}", param="model")
    return row


def _datasets(session: Session, *, tenant_id: str, task: str,
              file_ids: dict[str, str]) -> None:
    """Check in one query that each `{field: file_id}` is the tenant's live file written for
    `task`; 400 naming the first bad field otherwise."""
    rows = stored_objects.live_by_id(session, File, tenant_id=tenant_id,
                                     object_ids=file_ids.values())
    for field, file_id in file_ids.items():
        row = rows.get(file_id)
        if row is None:
            raise InvalidRequest(f"no such file: {file_id}", param=field)
        if row.task is not None and row.task != task:
            raise InvalidRequest(f"file {file_id} is {row.task} data; the job's task is {task}",
                                 param=field)


def create_job(session: Session, *, tenant_id: str, body: JobCreate, idempotency_key: str | None,
               default_device: str = "cpu") -> tuple[Job, bool]:
    """Validate and insert a queued job; (job, True), or (the earlier job, False) on a key replay.

    Model, files and spec are checked here, in the request (files were validated at upload), so
    the job is inserted straight as `queued`; its event log still shows both steps. Four
    statements: the model, the files, the job (INSERT … RETURNING), its two events.
    """
    body_hash = request_hash(body)
    if idempotency_key is not None:
        earlier = _job_for_key(session, tenant_id=tenant_id, key=idempotency_key,
                               body_hash=body_hash)
        if earlier is not None:
            return earlier, False
    model = _base_model(session, model_id=body.model)
    task = body.task or model.task
    file_ids = {"training_file": body.training_file}
    if body.validation_file is not None:
        file_ids["validation_file"] = body.validation_file
    _datasets(session, tenant_id=tenant_id, task=task, file_ids=file_ids)
    body.to_spec(task=task, training_file=body.training_file,
                 validation_file=body.validation_file)  # the core's own checks (ConfigError: 400)
    job = session.scalar(
        dialect_insert(session, Job).values(
            id=new_id("ftjob"), tenant_id=tenant_id, model=model.id, status=JobStatus.QUEUED,
            spec=body.stored_body(task, body.device or default_device), training_file=body.training_file,
            validation_file=body.validation_file, created_at=utcnow(), attempts=0,
            progress_step=0, idempotency_key=idempotency_key, request_hash=body_hash,
        ).on_conflict_do_nothing(index_elements=["tenant_id", "idempotency_key"])
        .returning(Job)  # None when a concurrent request with the same key won the race
    )
    if job is None:
        assert idempotency_key is not None  # NULL keys never conflict
        winner = _job_for_key(session, tenant_id=tenant_id, key=idempotency_key,
                              body_hash=body_hash)
        if winner is None:
            raise LookupError(f"job with Idempotency-Key {idempotency_key!r} vanished")
        return winner, False
    jobs.add_events(session, job_id=job.id, events=[
        {"type": jobs.EVENT_STATUS, "message": "job created",
         "data": {"status": JobStatus.VALIDATING_FILES.value}},
        {"type": jobs.EVENT_STATUS, "message": "job queued",
         "data": {"status": JobStatus.QUEUED.value}},
    ])
    return job, True


def enqueue_created_job(session: Session, *, enqueue: EnqueueJob, job: Job) -> bool:
    """Send the committed job to its device's queue; on failure log and record an event, return
    False.

    The job stays queued either way (a 2xx means the job exists); a reconciler re-enqueues
    queued jobs whose message was lost.
    """
    job_id, device = job.id, job_device(job)
    try:
        enqueue(job_id, device)
    except Exception as err:
        log.exception("speft.job enqueue failed job_id=%s", job_id)
        session.rollback()
        jobs.add_event(session, job_id=job_id, level="warning", message="enqueue failed",
                       data={"error": f"{type(err).__name__}: {err}"})
        session.commit()
        return False
    log.info("speft.job enqueued job_id=%s device=%s", job_id, device)
    return True


def job_device(job: Job) -> str:
    """The device kind a job trains on (jobs stored before devices existed ran on the CPU)."""
    return job.spec.get("device", "cpu")


def get_job(session: Session, *, tenant_id: str, job_id: str) -> Job:
    """The tenant's job `job_id`; NotFound for missing and other tenants' jobs."""
    row = session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))
    if row is None:
        raise NotFound(f"no such job: {job_id}", param="job_id")
    return row


def list_jobs(session: Session, *, tenant_id: str, limit: int, after: str | None = None,
              status: JobStatus | None = None) -> tuple[list[Job], bool]:
    """A page of the tenant's jobs, newest first, strictly after job `after`; (jobs, has_more)."""
    query = select(Job).where(Job.tenant_id == tenant_id)
    if after is not None:
        try:
            cursor = get_job(session, tenant_id=tenant_id, job_id=after)
        except NotFound:
            raise InvalidRequest(f"unknown cursor: no such job {after}", param="after") from None
        query = query.where(or_(Job.created_at < cursor.created_at,
                                and_(Job.created_at == cursor.created_at, Job.id < cursor.id)))
    if status is not None:
        query = query.where(Job.status == status)
    rows = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc())
                                .limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def cancel_job(session: Session, *, tenant_id: str, job_id: str) -> Job:
    """Cancel the tenant's job (at once when not started); Conflict when it already finished."""
    job = get_job(session, tenant_id=tenant_id, job_id=job_id)
    if job.status not in TERMINAL_STATUSES:
        jobs.request_cancel(session, job_id=job_id)
        session.refresh(job)  # a worker may have finished it meanwhile
        if job.status == JobStatus.CANCELLED:
            return job
    if job.status in TERMINAL_STATUSES:
        raise Conflict(f"job {job_id} is already {job.status.value}; it cannot be cancelled",
                       param="job_id")
    return job


def list_events(session: Session, *, tenant_id: str, job_id: str) -> list[JobEvent]:
    """The tenant's job's events, oldest first."""
    get_job(session, tenant_id=tenant_id, job_id=job_id)
    return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)
                                .order_by(JobEvent.id)))


def list_metrics(session: Session, *, tenant_id: str, job_id: str) -> list[JobMetricObject]:
    """The tenant's job's train and eval rows merged into one row per step, by step."""
    get_job(session, tenant_id=tenant_id, job_id=job_id)
    merged: dict[int, dict[str, Any]] = {}
    for row in session.scalars(select(JobMetric).where(JobMetric.job_id == job_id)
                               .order_by(JobMetric.step, JobMetric.kind)):
        values = merged.setdefault(row.step, {"step": row.step})
        columns = (("train_loss", "lr", "grad_norm") if row.kind == MetricKind.TRAIN
                   else jobs.EVAL_COLUMNS)
        values.update({name: getattr(row, name) for name in columns})
    return [JobMetricObject(**merged[step]) for step in sorted(merged)]


def _unix(value: Any) -> int | None:
    return None if value is None else int(value.timestamp())


def job_object(job: Job) -> JobObject:
    """The public view of a job (method and hyperparameters from its stored body)."""
    spec = job.spec
    error = (JobError(code=job.error_code, message=job.error_message or "", param=job.error_param)
             if job.status == JobStatus.FAILED and job.error_code else None)
    return JobObject(
        id=job.id, model=job.model, status=job.status.value, created_at=int(job.created_at.timestamp()),
        started_at=_unix(job.started_at), finished_at=_unix(job.finished_at),
        training_file=job.training_file, validation_file=job.validation_file,
        task=spec.get("task", "classification"), device=job_device(job), method=spec.get("method", {}),
        hyperparameters=spec.get("hyperparameters", {}), trainable_params=job.trainable_params,
        adapter_id=job.adapter_id, error=error,
        progress=JobProgress(step=job.progress_step, total_steps=job.progress_total),
        suffix=spec.get("suffix"), metadata=spec.get("metadata") or {},
    )


def event_object(event: JobEvent) -> JobEventObject:
    """The public view of a job event."""
    return JobEventObject(level=event.level, type=event.type, message=event.message,
                          data=event.data, created_at=int(event.created_at.timestamp()))


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
        """The Celery app (the API only sends; the worker package is imported on first use)."""
        from worker.celery_app import create_celery

        return create_celery(self.settings)

    def __call__(self, job_id: str, device: str) -> None:
        """Send one run_job message for `job_id` to the queue of `device`."""
        self.celery.send_task("speft.run_job", args=[job_id],
                              queue=self.settings.queue_for(device))

    def check(self) -> None:
        """Raise when the broker cannot be reached."""
        with self.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1)
            _ = connection.default_channel
