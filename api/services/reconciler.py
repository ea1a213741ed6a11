"""The reconciler: brings back every job that a dead worker or a lost message left behind.

DESIGN §6: a job, once accepted, reaches a terminal status even if a worker dies, the broker
restarts or the API restarts. Two ways a job gets stuck, and what a sweep does about each:

- its worker died (SIGKILL, OOM, machine lost): the job is `running` (or `cancel_requested`) and
  its `heartbeat_at` is older than `heartbeat_timeout_s`. It is re-queued and sent again while it
  has failed fewer than `max_attempts` times (`job_stops.failed_attempts`: pauses its workers
  took cost nothing), else failed as an internal error saying why; a job whose cancel was
  requested is cancelled, one whose pause was requested is paused.
- its message was lost (a broker restart without persistence, an enqueue that failed after the
  row was committed): the job is `queued` and was last sent (`enqueued_at`, else `created_at`)
  longer than `requeue_after_s` ago. It is sent again. A duplicate message is harmless: the claim
  is a conditional UPDATE, so only one delivery ever runs the job.

Every change is one conditional UPDATE that re-checks the staleness, so a heartbeat that arrives
during the sweep wins, and two reconcilers running at once (one per worker) never both act on a
job. The sweep only writes; the caller commits and then sends the jobs in `Reconciled.to_send`
("enqueue after commit", as the API does).

The same task sweeps orphan objects (`sweep_orphan_objects`): a deleted file or adapter whose
bytes were not removed after its delete committed (the storage failed then) and is still not
purged `ORPHAN_GRACE_S` later has its object deleted and is marked purged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.core.config import Settings
from api.core.models import Adapter, Checkpoint, File, Job, JobStatus, utcnow
from api.core.storage import Storage
from api.services import job_stops, jobs, stored_objects

SWEEP_LIMIT = 500  # jobs (or orphan objects) looked at per kind per sweep; the next takes the rest
# A deleted row is purged right after its commit; one still unpurged this long after is an orphan.
ORPHAN_GRACE_S = 60.0


@dataclass(frozen=True)
class ReconcilePolicy:
    """How long silence means death, and how often a job may be retried."""

    heartbeat_timeout_s: float
    requeue_after_s: float
    max_attempts: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ReconcilePolicy:
        """SPEFT_HEARTBEAT_TIMEOUT_S, SPEFT_REQUEUE_AFTER_S and SPEFT_MAX_ATTEMPTS."""
        return cls(heartbeat_timeout_s=settings.heartbeat_timeout_s,
                   requeue_after_s=settings.requeue_after_s, max_attempts=settings.max_attempts)


@dataclass
class Reconciled:
    """What one sweep did, by job id; `to_send` are the jobs to send after the commit."""

    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)

    @property
    def to_send(self) -> list[str]:
        """Jobs whose message must be (re)sent once the sweep is committed."""
        return self.requeued + self.resent

    def __bool__(self) -> bool:
        return bool(self.requeued or self.failed or self.cancelled or self.resent)


def reconcile_jobs(session: Session, *, policy: ReconcilePolicy,
                   now: datetime | None = None) -> Reconciled:
    """One sweep over stale running jobs and unclaimed queued jobs (see the module docstring)."""
    now = now or utcnow()
    done = Reconciled()
    stale_before = now - timedelta(seconds=policy.heartbeat_timeout_s)
    stale = session.execute(
        select(Job.id, Job.status, Job.worker, Job.heartbeat_at)
        .where(Job.status.in_(jobs.ACTIVE_STATUSES), jobs.stale_condition(stale_before))
        .order_by(Job.heartbeat_at).limit(SWEEP_LIMIT)
    ).all()
    for job_id, status, worker, beat in stale:
        silence = "never" if beat is None else f"{(now - beat).total_seconds():.0f} s ago"
        reason = f"worker {worker or '?'} stopped heart-beating (last heartbeat {silence})"
        if status == JobStatus.CANCEL_REQUESTED:
            if jobs.cancel_stale_job(session, job_id=job_id, stale_before=stale_before):
                done.cancelled.append(job_id)
            continue
        if status == JobStatus.PAUSE_REQUESTED:
            jobs.pause_stale_job(session, job_id=job_id, stale_before=stale_before)
            continue
        failed = job_stops.failed_attempts(session, job_id=job_id)  # this one included
        if failed < policy.max_attempts:
            if jobs.requeue_stale_job(session, job_id=job_id, stale_before=stale_before,
                                      reason=f"{reason}; attempt {failed + 1} of "
                                             f"{policy.max_attempts} follows"):
                done.requeued.append(job_id)
        elif jobs.fail_stale_job(session, job_id=job_id, stale_before=stale_before,
                                 reason=f"worker lost: {reason}; gave up after {failed} failed "
                                        f"attempt{'s' if failed != 1 else ''}"):
            done.failed.append(job_id)
    sent_before = now - timedelta(seconds=policy.requeue_after_s)
    unclaimed = session.scalars(
        select(Job.id)
        .where(Job.status == JobStatus.QUEUED, jobs.LAST_SENT_AT < sent_before)
        .order_by(jobs.LAST_SENT_AT).limit(SWEEP_LIMIT)
    ).all()
    for job_id in unclaimed:
        if jobs.mark_resent(session, job_id=job_id, sent_before=sent_before):
            done.resent.append(job_id)
    return done


def sweep_orphan_objects(session: Session, *, storage: Storage, now: datetime | None = None,
                         grace_s: float = ORPHAN_GRACE_S) -> list[str]:
    """Delete the stored bytes of files and adapters deleted more than `grace_s` ago and never
    purged, and mark them purged; the caller commits. Returns their ids."""
    deleted_before = (now or utcnow()) - timedelta(seconds=grace_s)
    return [object_id for model in (File, Adapter, Checkpoint)
            for object_id in stored_objects.purge_deleted(
                session, storage, model, deleted_before=deleted_before, limit=SWEEP_LIMIT)]
