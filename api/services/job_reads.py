"""A tenant's fine-tuning jobs: reads (one, a page), cancel, events and metrics, and whether a
file is in use by an unfinished job (a delete's check).

Every function is scoped by tenant: another tenant's job is NotFound, exactly like a missing one.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from api.core.models import (
    TERMINAL_STATUSES,
    File,
    Job,
    JobEvent,
    JobMetric,
    JobStatus,
    MetricKind,
)
from api.errors import Conflict, InvalidRequest, NotFound
from api.schemas.jobs import JobMetric as JobMetricObject
from api.services import jobs


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


def pause_job(session: Session, *, tenant_id: str, job_id: str) -> Job:
    """Pause the tenant's job: at once when queued, else `pause_requested` (its worker saves a
    checkpoint and stops at the next step); Conflict unless it is queued or running."""
    job = get_job(session, tenant_id=tenant_id, job_id=job_id)
    if job.status in (JobStatus.PAUSED, JobStatus.PAUSE_REQUESTED):
        return job
    if not jobs.request_pause(session, job_id=job_id):
        session.refresh(job)
        raise Conflict(f"job {job_id} is {job.status.value}; only a queued or running job can "
                       "be paused", param="job_id")
    session.refresh(job)
    return job


def resume_job(session: Session, *, tenant_id: str, job_id: str) -> tuple[Job, bool]:
    """Resume the tenant's paused job (queued again: send it after the commit; it continues
    from its newest checkpoint) or withdraw a pending pause; (job, whether to send it).
    Conflict when it is neither paused nor pausing."""
    job = get_job(session, tenant_id=tenant_id, job_id=job_id)
    if not jobs.request_resume(session, job_id=job_id):
        session.refresh(job)
        raise Conflict(f"job {job_id} is {job.status.value}; only a paused job can be resumed",
                       param="job_id")
    session.refresh(job)  # what this transaction made it: its worker may have paused it meanwhile
    return job, job.status == JobStatus.QUEUED


def list_events(session: Session, *, tenant_id: str, job_id: str) -> list[JobEvent]:
    """The tenant's job's events, oldest first."""
    get_job(session, tenant_id=tenant_id, job_id=job_id)
    return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)
                                .order_by(JobEvent.id)))


def list_metrics(session: Session, *, tenant_id: str, job_id: str) -> list[JobMetricObject]:
    """The tenant's job's train and eval rows merged into one row per step, by step."""
    get_job(session, tenant_id=tenant_id, job_id=job_id)
    return merged_metrics(session, job_id=job_id)


def merged_metrics(session: Session, *, job_id: str) -> list[JobMetricObject]:
    """A job's train and eval rows merged into one row per step, by step."""
    merged: dict[int, dict[str, Any]] = {}
    for row in session.scalars(select(JobMetric).where(JobMetric.job_id == job_id)
                               .order_by(JobMetric.step, JobMetric.kind)):
        values = merged.setdefault(row.step, {"step": row.step})
        columns = (("train_loss", "lr", "grad_norm") if row.kind == MetricKind.TRAIN
                   else jobs.EVAL_COLUMNS)
        values.update({name: getattr(row, name) for name in columns})
    return [JobMetricObject(**merged[step]) for step in sorted(merged)]


def refuse_if_file_in_use(session: Session, *, tenant_id: str, file_id: str) -> None:
    """Conflict naming the job when an unfinished job (validating_files, queued, running,
    cancel_requested) of the tenant trains on or validates with file `file_id`.

    The file's row is locked first (`SELECT … FOR UPDATE`; a no-op on SQLite, whose writers are
    serialised anyway), as job creation locks the files it checks: a job created while the file
    is being deleted either commits first and is seen here, or waits and finds the file gone."""
    session.execute(select(File.id).where(File.id == file_id, File.tenant_id == tenant_id)
                    .with_for_update())
    user = session.execute(
        select(Job.id, Job.status)
        .where(Job.tenant_id == tenant_id, Job.status.in_(jobs.NON_TERMINAL_STATUSES),
               or_(Job.training_file == file_id, Job.validation_file == file_id))
        .order_by(Job.created_at).limit(1)
    ).first()
    if user is not None:
        raise Conflict(f"file {file_id} is in use by job {user.id} ({user.status.value}); "
                       "cancel the job or wait until it finishes, then delete the file",
                       param="file_id")
