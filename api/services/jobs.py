"""Where a job changes status: one keyword-only function per transition, plus progress and events.

Every transition is one conditional UPDATE (`transition_job`) and, when it happened, one event row
in the same transaction; each returns True only if this call made the transition, so concurrent
callers (two workers, a worker and the cancel endpoint) never both win. The caller owns the
transaction: nothing here commits.

Redelivery: `claim_job` moves only `queued` jobs to `running`. A message redelivered for a job
that is already running (its worker alive, or dead with a stale heartbeat) or finished is refused;
a job whose worker died is brought back by the reconciler (`api.services.reconciler`) through
`requeue_stale_job`, `fail_stale_job` and `cancel_stale_job`, each conditional on the heartbeat
still being stale.

Leases: the claim increments `attempts`; the worker passes that number as `attempt` to every later
write (`heartbeat`, `record_progress`, `finish_*`), which then apply only while the job is still on
that attempt. A worker presumed dead that comes back (a long pause, a partition) can no longer
touch a job that was re-queued and claimed again. An attempt its worker stops before the end (a
pause it took, a fault it may retry) is released by `api.services.job_stops`, which also keeps the
failure budget: attempts that failed, not claims.
"""
from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, func, insert, or_, select, update
from sqlalchemy.orm import Session

from api.core.db import dialect_insert
from api.core.models import (
    ACTIVE_STATUSES,
    TERMINAL_STATUSES,
    Adapter,
    Job,
    JobEvent,
    JobMetric,
    JobStatus,
    MetricKind,
    utcnow,
)
from api.services import webhooks
from speft_core.progress import LOADING

USER_ERROR = "user_error"
INTERNAL_ERROR = "internal_error"

# Event `type`s written here (the API lists them under GET …/jobs/{id}/events).
EVENT_STATUS = "status"
EVENT_MESSAGE = "message"
EVENT_METRICS = "metrics"

NON_TERMINAL_STATUSES: frozenset[JobStatus] = frozenset(set(JobStatus) - TERMINAL_STATUSES)
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


def transition_job(
    session: Session,
    job_id: str,
    *,
    from_statuses: Iterable[JobStatus],
    to_status: JobStatus,
    when: Iterable[ColumnElement[bool]] = (),
    **fields: Any,
) -> bool:
    """Move a job to `to_status` only if it is in one of `from_statuses` (and every condition in
    `when` holds); True if this call did.

    One conditional `UPDATE jobs SET status=:to, <fields> WHERE id=:id AND status IN (:from…)`:
    the database serialises concurrent callers, so of two workers claiming one queued job exactly
    one sees True. `fields` are further columns to set in the same statement (values or SQL
    expressions, e.g. `attempts=Job.attempts + 1`). The caller commits; a loaded `Job` object is
    expired so it rereads the row.
    """
    allowed = [JobStatus(status) for status in from_statuses]
    if not allowed:
        raise ValueError("from_statuses must name at least one status")
    if "status" in fields:
        raise TypeError("pass the new status as to_status, not as a field")
    unknown = sorted(set(fields) - set(Job.__table__.columns.keys()))
    if unknown:
        raise TypeError(f"jobs has no column {unknown[0]!r}")
    statement = (
        update(Job)
        .where(Job.id == job_id, Job.status.in_(allowed), *when)
        .values(status=JobStatus(to_status), **fields)
        .execution_options(synchronize_session=False)
    )
    changed = session.execute(statement).rowcount == 1
    loaded = session.identity_map.get(session.identity_key(Job, job_id))  # type: ignore[arg-type]
    if loaded is not None:
        session.expire(loaded)
    return changed


def _lease(attempt: int | None) -> list[ColumnElement[bool]]:
    """The condition that the job is still on `attempt` (none when no attempt is given)."""
    return [] if attempt is None else [Job.attempts == attempt]


# When a job's message was last sent: by the reconciler (`enqueued_at`), else at creation.
LAST_SENT_AT = func.coalesce(Job.enqueued_at, Job.created_at)


def stale_condition(stale_before: datetime) -> ColumnElement[bool]:
    """The condition that the job's worker has not heart-beaten since `stale_before`."""
    return or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale_before)


def _transition(
    session: Session,
    job_id: str,
    *,
    from_statuses: frozenset[JobStatus] | set[JobStatus],
    to_status: JobStatus,
    message: str,
    level: str = "info",
    data: dict[str, Any] | None = None,
    when: list[ColumnElement[bool]] | None = None,
    **fields: Any,
) -> bool:
    """The conditional UPDATE plus its status event, written only when the update happened; a
    terminal status also records its webhook deliveries (sent after the commit)."""
    changed = transition_job(
        session, job_id, from_statuses=from_statuses, to_status=to_status, when=when or (),
        **fields
    )
    if changed:
        add_event(session, job_id=job_id, level=level, type=EVENT_STATUS, message=message,
                  data={"status": to_status.value, **(data or {})})
        if to_status.is_terminal:
            webhooks.record_job_event(session, job_id=job_id, status=to_status)
    return changed


def claim_job(session: Session, *, job_id: str, worker: str) -> bool:
    """queued → running for `worker` (sets started_at, heartbeat_at, attempts + 1; progress
    starts again from step 0, in the loading phase, with no estimate yet)."""
    now = utcnow()
    return _transition(
        session, job_id, from_statuses={JobStatus.QUEUED}, to_status=JobStatus.RUNNING,
        message="job started", data={"worker": worker},
        started_at=now, heartbeat_at=now, worker=worker, attempts=Job.attempts + 1,
        progress_step=0, estimated_finish=None, progress_phase=LOADING, phase_step=0,
        phase_total=None, phase_estimated_finish=None,
    )


def current_attempt(session: Session, *, job_id: str) -> int:
    """The job's attempt number (1 after its first claim): the lease a worker writes under."""
    return session.scalar(select(Job.attempts).where(Job.id == job_id)) or 0


def heartbeat(session: Session, *, job_id: str, attempt: int) -> bool:
    """Record that the worker of `attempt` is alive; False once the job is no longer its own."""
    return session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(ACTIVE_STATUSES), *_lease(attempt))
        .values(heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    ).rowcount == 1


def requeue_stale_job(session: Session, *, job_id: str, stale_before: datetime,
                      reason: str) -> bool:
    """running → queued when its worker has not heart-beaten since `stale_before` (it died); the
    caller sends the job again after committing."""
    return _transition(
        session, job_id, from_statuses={JobStatus.RUNNING}, to_status=JobStatus.QUEUED,
        message=f"job re-queued: {reason}", level="warning", when=[stale_condition(stale_before)],
        worker=None, heartbeat_at=None, enqueued_at=utcnow(),
    )


def fail_stale_job(session: Session, *, job_id: str, stale_before: datetime,
                   reason: str) -> bool:
    """running → failed (internal_error) when its worker stopped heart-beating and the job has
    used all its attempts."""
    return _transition(
        session, job_id, from_statuses={JobStatus.RUNNING}, to_status=JobStatus.FAILED,
        message=f"job failed: {reason}", level="error",
        data={"code": INTERNAL_ERROR, "param": None}, when=[stale_condition(stale_before)],
        finished_at=utcnow(), error_code=INTERNAL_ERROR, error_message=reason, error_param=None,
    )


def cancel_stale_job(session: Session, *, job_id: str, stale_before: datetime) -> bool:
    """cancel_requested → cancelled when its worker died before it could stop."""
    return _transition(
        session, job_id, from_statuses={JobStatus.CANCEL_REQUESTED},
        to_status=JobStatus.CANCELLED, message="job cancelled (its worker stopped)",
        when=[stale_condition(stale_before)], finished_at=utcnow(),
    )


def mark_resent(session: Session, *, job_id: str, sent_before: datetime) -> bool:
    """Take the right to send a queued job again: True when it is still queued and was last sent
    (or created) before `sent_before`; its `enqueued_at` becomes now, and an event says why."""
    taken = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED,
               LAST_SENT_AT < sent_before)
        .values(enqueued_at=utcnow())
        .execution_options(synchronize_session=False)
    ).rowcount == 1
    if taken:
        add_event(session, job_id=job_id, level="warning",
                  message="job sent again: no worker claimed it (its message was presumed lost)")
    return taken


def request_cancel(session: Session, *, job_id: str) -> bool:
    """validating_files|queued|paused → cancelled at once; running|pause_requested →
    cancel_requested; else False."""
    if _transition(session, job_id,
                   from_statuses={JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.PAUSED},
                   to_status=JobStatus.CANCELLED, message="job cancelled", finished_at=utcnow()):
        return True
    return _transition(session, job_id,
                       from_statuses={JobStatus.RUNNING, JobStatus.PAUSE_REQUESTED},
                       to_status=JobStatus.CANCEL_REQUESTED, message="cancellation requested")


def request_pause(session: Session, *, job_id: str) -> bool:
    """queued → paused at once; running → pause_requested (its worker checkpoints and stops
    at the next step, then `job_stops.release_job` pauses it); else False."""
    if _transition(session, job_id, from_statuses={JobStatus.QUEUED}, to_status=JobStatus.PAUSED,
                   message="job paused"):
        return True
    return _transition(session, job_id, from_statuses={JobStatus.RUNNING},
                       to_status=JobStatus.PAUSE_REQUESTED, message="pause requested")


def request_resume(session: Session, *, job_id: str) -> bool:
    """paused → queued (the caller sends it after the commit; it resumes from its newest
    checkpoint); pause_requested → running (the pause is withdrawn; a worker that had already
    taken it re-queues the job, which goes on from the checkpoint it stored); else False."""
    if _transition(session, job_id, from_statuses={JobStatus.PAUSED}, to_status=JobStatus.QUEUED,
                   message="job resumed: queued", enqueued_at=utcnow()):
        return True
    return _transition(session, job_id, from_statuses={JobStatus.PAUSE_REQUESTED},
                       to_status=JobStatus.RUNNING, message="pause withdrawn")


def pause_stale_job(session: Session, *, job_id: str, stale_before: datetime) -> bool:
    """pause_requested → paused when its worker died before it could stop (the job resumes
    from its newest periodic checkpoint)."""
    return _transition(
        session, job_id, from_statuses={JobStatus.PAUSE_REQUESTED}, to_status=JobStatus.PAUSED,
        message="job paused (its worker stopped)", when=[stale_condition(stale_before)],
        worker=None, heartbeat_at=None)


def stop_requested(session: Session, *, job_id: str) -> JobStatus | None:
    """Why the job's worker should stop: CANCEL_REQUESTED (or CANCELLED) or PAUSE_REQUESTED;
    None to carry on."""
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    if status in (JobStatus.CANCEL_REQUESTED, JobStatus.CANCELLED):
        return JobStatus.CANCEL_REQUESTED
    return JobStatus.PAUSE_REQUESTED if status == JobStatus.PAUSE_REQUESTED else None


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
    attempt: int | None = None,
    result_step: int | None = None,
    result_file: str | None = None,
) -> bool:
    """running → succeeded, creating the job's Adapter row in the same transaction."""
    owner = session.execute(select(Job.tenant_id, Job.model).where(Job.id == job_id)).first()
    if owner is None or not _transition(
        session, job_id, from_statuses={JobStatus.RUNNING, JobStatus.PAUSE_REQUESTED},
        to_status=JobStatus.SUCCEEDED,
        message="job succeeded", data={"adapter_id": adapter_id}, when=_lease(attempt),
        finished_at=utcnow(), adapter_id=adapter_id, trainable_params=trainable_params,
        result_step=result_step, result_file=result_file, estimated_finish=None,
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
    session: Session, *, job_id: str, code: str, message: str, param: str | None = None,
    attempt: int | None = None,
) -> bool:
    """Any non-terminal status → failed, with the error the API shows."""
    return _transition(
        session, job_id, from_statuses=NON_TERMINAL_STATUSES, to_status=JobStatus.FAILED,
        message=f"job failed: {message}", level="error", data={"code": code, "param": param},
        when=_lease(attempt), estimated_finish=None,
        finished_at=utcnow(), error_code=code, error_message=message, error_param=param,
    )


def finish_cancelled(session: Session, *, job_id: str, attempt: int | None = None) -> bool:
    """cancel_requested|running → cancelled."""
    return _transition(session, job_id, from_statuses=ACTIVE_STATUSES,
                       to_status=JobStatus.CANCELLED, message="job cancelled",
                       when=_lease(attempt), finished_at=utcnow(), estimated_finish=None)


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
    attempt: int | None = None,
    trained_tokens: int | None = None,
    estimated_finish: datetime | None = None,
) -> bool:
    """Store a training step (progress, heartbeat, tokens, estimated finish, one train metric
    row); False if the job is not active (or no longer on `attempt`)."""
    extra = {} if trained_tokens is None else {"trained_tokens": trained_tokens}
    active = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(ACTIVE_STATUSES), *_lease(attempt))
        .values(progress_step=step, progress_total=total, heartbeat_at=utcnow(),
                estimated_finish=estimated_finish, **extra)
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
