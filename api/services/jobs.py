"""Where a job changes status: one keyword-only function per transition, plus progress and events.

Every transition is one conditional UPDATE (`transition_job`) and, when it happened, one event row
in the same transaction; each returns True only if this call made the transition, so concurrent
callers (two workers, a worker and the cancel endpoint) never both win. The caller owns the
transaction: nothing here commits.

Redelivery: `claim_job` moves only `queued` jobs to `running`. A message redelivered for a job
that is already running (its worker alive, or dead with a stale heartbeat) or finished is refused;
bringing a job whose worker died back to a terminal status is the job of a stale-heartbeat sweep.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from api.core.db import dialect_insert
from api.core.models import (
    TERMINAL_STATUSES,
    Adapter,
    Job,
    JobEvent,
    JobMetric,
    JobStatus,
    MetricKind,
    transition_job,
    utcnow,
)

USER_ERROR = "user_error"
INTERNAL_ERROR = "internal_error"

# Event `type`s written here (the API lists them under GET …/jobs/{id}/events).
EVENT_STATUS = "status"
EVENT_MESSAGE = "message"
EVENT_METRICS = "metrics"

NON_TERMINAL_STATUSES: frozenset[JobStatus] = frozenset(set(JobStatus) - TERMINAL_STATUSES)
ACTIVE_STATUSES: frozenset[JobStatus] = frozenset({JobStatus.RUNNING, JobStatus.CANCEL_REQUESTED})
EVAL_COLUMNS = ("eval_loss", "eval_accuracy")


def add_event(
    session: Session,
    *,
    job_id: str,
    message: str,
    level: str = "info",
    type: str = EVENT_MESSAGE,  # the event field is called `type` in the API
    data: dict[str, Any] | None = None,
) -> None:
    """Append one line to a job's event log."""
    add_events(session, job_id=job_id,
               events=[{"message": message, "level": level, "type": type, "data": data}])


def add_events(session: Session, *, job_id: str, events: list[dict[str, Any]]) -> None:
    """Append several lines to a job's event log in one INSERT (each dict: `message`, and
    optionally `level`, `type`, `data`)."""
    session.execute(insert(JobEvent), [
        {"job_id": job_id, "level": "info", "type": EVENT_MESSAGE, "data": None,
         "created_at": utcnow(), **event} for event in events])


def _transition(
    session: Session,
    job_id: str,
    *,
    from_statuses: frozenset[JobStatus] | set[JobStatus],
    to_status: JobStatus,
    message: str,
    level: str = "info",
    data: dict[str, Any] | None = None,
    **fields: Any,
) -> bool:
    """The conditional UPDATE plus its status event, written only when the update happened."""
    changed = transition_job(
        session, job_id, from_statuses=from_statuses, to_status=to_status, **fields
    )
    if changed:
        add_event(session, job_id=job_id, level=level, type=EVENT_STATUS, message=message,
                  data={"status": to_status.value, **(data or {})})
    return changed


def claim_job(session: Session, *, job_id: str, worker: str) -> bool:
    """queued → running for `worker` (sets started_at, heartbeat_at, attempts + 1)."""
    now = utcnow()
    return _transition(
        session, job_id, from_statuses={JobStatus.QUEUED}, to_status=JobStatus.RUNNING,
        message="job started", data={"worker": worker},
        started_at=now, heartbeat_at=now, worker=worker, attempts=Job.attempts + 1,
    )


def request_cancel(session: Session, *, job_id: str) -> bool:
    """validating_files|queued → cancelled at once; running → cancel_requested; else False."""
    if _transition(session, job_id,
                   from_statuses={JobStatus.VALIDATING_FILES, JobStatus.QUEUED},
                   to_status=JobStatus.CANCELLED, message="job cancelled", finished_at=utcnow()):
        return True
    return _transition(session, job_id, from_statuses={JobStatus.RUNNING},
                       to_status=JobStatus.CANCEL_REQUESTED, message="cancellation requested")


def is_cancel_requested(session: Session, *, job_id: str) -> bool:
    """Whether the job's worker should stop: cancel requested, or the job already cancelled."""
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    return status in (JobStatus.CANCEL_REQUESTED, JobStatus.CANCELLED)


def finish_succeeded(
    session: Session,
    *,
    job_id: str,
    adapter_id: str,
    storage_key: str,
    nnz: int,
    density: float,
    metric: str,
    bytes: int,  # the adapter field is called `bytes`
    sha256: str,
    eval: dict[str, Any] | None,  # the adapter field is called `eval`
    trainable_params: int | None = None,
) -> bool:
    """running → succeeded, creating the job's Adapter row in the same transaction."""
    owner = session.execute(select(Job.tenant_id, Job.model).where(Job.id == job_id)).first()
    if owner is None or not _transition(
        session, job_id, from_statuses={JobStatus.RUNNING}, to_status=JobStatus.SUCCEEDED,
        message="job succeeded", data={"adapter_id": adapter_id},
        finished_at=utcnow(), adapter_id=adapter_id, trainable_params=trainable_params,
    ):
        return False
    session.add(Adapter(
        id=adapter_id, tenant_id=owner.tenant_id, job_id=job_id, base_model=owner.model, nnz=nnz,
        density=density, metric=metric, bytes=bytes, sha256=sha256, storage_key=storage_key,
        eval=eval,
    ))
    session.flush()  # adapters.job_id is unique: a second adapter for one job fails here
    return True


def finish_failed(
    session: Session, *, job_id: str, code: str, message: str, param: str | None = None
) -> bool:
    """Any non-terminal status → failed, with the error the API shows."""
    return _transition(
        session, job_id, from_statuses=NON_TERMINAL_STATUSES, to_status=JobStatus.FAILED,
        message=f"job failed: {message}", level="error", data={"code": code, "param": param},
        finished_at=utcnow(), error_code=code, error_message=message, error_param=param,
    )


def finish_cancelled(session: Session, *, job_id: str) -> bool:
    """cancel_requested|running → cancelled."""
    return _transition(session, job_id, from_statuses=ACTIVE_STATUSES,
                       to_status=JobStatus.CANCELLED, message="job cancelled",
                       finished_at=utcnow())


def _upsert_metric(session: Session, *, job_id: str, kind: MetricKind, step: int,
                   values: dict[str, float | None]) -> None:
    """Insert the (job, kind, step) metric row, or overwrite it when a retry reports it again."""
    statement = dialect_insert(session, JobMetric).values(
        job_id=job_id, kind=kind, step=step, created_at=utcnow(), **values
    )
    session.execute(statement.on_conflict_do_update(
        index_elements=["job_id", "kind", "step"], set_=values,
    ))


def record_progress(
    session: Session,
    *,
    job_id: str,
    step: int,
    total: int,
    train_loss: float,
    lr: float,
    grad_norm: float,
) -> bool:
    """Store a training step (progress, heartbeat, one train metric row); False if the job is not active."""
    active = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(ACTIVE_STATUSES))
        .values(progress_step=step, progress_total=total, heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    ).rowcount == 1
    if active:
        _upsert_metric(session, job_id=job_id, kind=MetricKind.TRAIN, step=step,
                       values={"train_loss": train_loss, "lr": lr, "grad_norm": grad_norm})
    return active


def record_eval(session: Session, *, job_id: str, step: int, metrics: dict[str, float]) -> None:
    """Store one evaluation (eval_loss, eval_accuracy) as the eval metric row of `step`, plus an event."""
    values = {name: _float_or_none(metrics.get(name)) for name in EVAL_COLUMNS}
    _upsert_metric(session, job_id=job_id, kind=MetricKind.EVAL, step=step, values=values)
    add_event(session, job_id=job_id, type=EVENT_METRICS, message=f"evaluation at step {step}",
              data={"step": step, **metrics})


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)
