"""How a running attempt ends short of the end on its own worker's word, and the failure budget.

A worker stops an attempt before the end in two ways: on request (it took a pause: it stored a
checkpoint of where it stood and stopped) or on a fault it may retry (object storage still
refusing after the retries). Either way the requests made meanwhile decide where the job goes
(`release_job`, leased to the attempt like every worker write):

- `pause_requested` → `paused`;
- `cancel_requested` → `cancelled`;
- `running` → `queued`, sent again after the commit: a pause that was withdrawn after the worker
  had already taken it (the job goes on from the checkpoint just stored), or a fault with
  attempts left (it goes on from its newest checkpoint).

So whatever the interleaving of pause, resume, cancel and the worker's own stop, the job never
stays `running` with nobody running it.

The failure budget (SPEFT_MAX_ATTEMPTS) counts failed attempts, not claims: `Job.attempts` counts
claims and is the lease number, so it only ever grows; a stop on request gives its attempt back
by marking its status event `data.voluntary = true` (`failed_attempts` = claims less those
events). A pause and resume cycle therefore costs nothing; a crash, a lost worker or a storage
outage that outlasts the retries costs one.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.core.models import Job, JobEvent, JobStatus, utcnow
from api.services.jobs import EVENT_STATUS, INTERNAL_ERROR, _lease, _transition, finish_failed

VOLUNTARY = "voluntary"  # status event data: this stop was asked for and costs no attempt


def release_job(session: Session, *, job_id: str, attempt: int, reason: str, voluntary: bool,
                step: int | None = None) -> JobStatus | None:
    """Its worker stopped `attempt` before the end: pause_requested → paused, cancel_requested →
    cancelled, running → queued (the caller sends it after the commit). The status the job took;
    None when the job is no longer the attempt's.

    `reason` says why a job is paused or re-queued (a voluntary pause says "job paused at step
    N", `step` being the step of the checkpoint stored before stopping); a `voluntary` stop does
    not count against the failure budget."""
    data: dict[str, Any] = {} if step is None else {"step": step}
    if voluntary:
        data[VOLUNTARY] = True
    paused = f"job paused at step {step}" if voluntary and step is not None else \
        f"job paused: {reason}"
    now = utcnow()
    moves = ((JobStatus.PAUSE_REQUESTED, JobStatus.PAUSED, paused, {}),
             (JobStatus.CANCEL_REQUESTED, JobStatus.CANCELLED, "job cancelled",
              {"finished_at": now}),
             (JobStatus.RUNNING, JobStatus.QUEUED, f"job re-queued: {reason}",
              {"enqueued_at": now}))
    for source, target, message, fields in moves:
        if _transition(session, job_id, from_statuses={source}, to_status=target,
                       message=message, level="info" if voluntary else "warning", data=data,
                       when=_lease(attempt), worker=None, heartbeat_at=None,
                       estimated_finish=None, **fields):
            return target
    return None


def failed_attempts(session: Session, *, job_id: str) -> int:
    """The job's attempts that count against SPEFT_MAX_ATTEMPTS: its claims less its voluntary
    stops (a running attempt counts until it stops on request)."""
    claims = session.scalar(select(Job.attempts).where(Job.id == job_id)) or 0
    stops = session.scalars(select(JobEvent.data).where(JobEvent.job_id == job_id,
                                                        JobEvent.type == EVENT_STATUS))
    return claims - sum(1 for data in stops if (data or {}).get(VOLUNTARY))


def retry_or_fail(session: Session, *, job_id: str, attempt: int, max_attempts: int,
                  reason: str) -> JobStatus | None:
    """`attempt` failed on a fault worth retrying (`reason`): release the job (re-queued, or
    paused or cancelled as requested meanwhile) while it has failed fewer than `max_attempts`
    times, else fail it as an internal error saying why. The status it took; None when the job
    is no longer the attempt's."""
    failed = failed_attempts(session, job_id=job_id)
    if failed < max_attempts:
        return release_job(session, job_id=job_id, attempt=attempt, voluntary=False,
                           reason=f"{reason} (failed attempt {failed} of {max_attempts})")
    plural = "s" if failed != 1 else ""
    if finish_failed(session, job_id=job_id, code=INTERNAL_ERROR, attempt=attempt,
                     message=f"{reason}; gave up after {failed} failed attempt{plural}"):
        return JobStatus.FAILED
    return None
