"""The reconciler sweep (api.services.reconciler) and attempt leases, on SQLite and Postgres."""
from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from api.core.models import Job, JobEvent, JobStatus, utcnow
from api.services.jobs import (
    INTERNAL_ERROR,
    claim_job,
    current_attempt,
    fail_stale_job,
    finish_failed,
    heartbeat,
    record_progress,
    requeue_stale_job,
)
from api.services.reconciler import ReconcilePolicy, reconcile_jobs
from tests.api.test_job_transitions import make_job

POLICY = ReconcilePolicy(heartbeat_timeout_s=60, requeue_after_s=300, max_attempts=2)


def _set(sessions: sessionmaker[Session], job_id: str, **values: object) -> None:
    with sessions() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))
        session.commit()


def _job(sessions: sessionmaker[Session], job_id: str) -> Job:
    with sessions() as session:
        job = session.get(Job, job_id)
        session.expunge(job)
        return job


def _sweep(sessions: sessionmaker[Session], **kwargs: object):
    with sessions() as session:
        done = reconcile_jobs(session, policy=POLICY, **kwargs)
        session.commit()
    return done


def _running(sessions: sessionmaker[Session], *, silent_for_s: float, attempts: int = 1) -> str:
    job_id = make_job(sessions, JobStatus.QUEUED)
    with sessions() as session:
        assert claim_job(session, job_id=job_id, worker="host:1")
        session.commit()
    _set(sessions, job_id, attempts=attempts,
         heartbeat_at=utcnow() - timedelta(seconds=silent_for_s))
    return job_id


def test_a_running_job_whose_worker_went_silent_is_requeued_once(db_sessions):
    dead = _running(db_sessions, silent_for_s=120)
    alive = _running(db_sessions, silent_for_s=5)
    done = _sweep(db_sessions)
    assert done.requeued == [dead] and done.to_send == [dead] and not done.failed
    job = _job(db_sessions, dead)
    assert job.status == JobStatus.QUEUED and job.worker is None and job.enqueued_at is not None
    assert _job(db_sessions, alive).status == JobStatus.RUNNING
    assert not _sweep(db_sessions)  # nothing left to do: a second sweep changes nothing
    with db_sessions() as session:
        messages = session.scalars(select(JobEvent.message).where(JobEvent.job_id == dead)).all()
    assert any("stopped heart-beating" in m and "attempt 2 of 2" in m for m in messages)


def test_a_job_out_of_attempts_fails_with_the_reason(db_sessions):
    job_id = _running(db_sessions, silent_for_s=120, attempts=2)
    done = _sweep(db_sessions)
    assert done.failed == [job_id] and not done.to_send
    job = _job(db_sessions, job_id)
    assert job.status == JobStatus.FAILED and job.error_code == INTERNAL_ERROR
    assert "worker lost" in job.error_message and "2 failed attempts" in job.error_message
    assert job.finished_at is not None


def test_a_cancel_whose_worker_died_ends_cancelled(db_sessions):
    job_id = _running(db_sessions, silent_for_s=120)
    _set(db_sessions, job_id, status=JobStatus.CANCEL_REQUESTED)
    assert _sweep(db_sessions).cancelled == [job_id]
    assert _job(db_sessions, job_id).status == JobStatus.CANCELLED


def test_a_heartbeat_that_lands_between_the_sweeps_read_and_its_update_wins(db_sessions):
    job_id = _running(db_sessions, silent_for_s=120)
    stale_before = utcnow() - timedelta(seconds=POLICY.heartbeat_timeout_s)  # the sweep's read
    with db_sessions() as session:
        assert heartbeat(session, job_id=job_id, attempt=1)  # the worker was only slow
        session.commit()
        assert not requeue_stale_job(session, job_id=job_id, stale_before=stale_before,
                                     reason="test")
        assert not fail_stale_job(session, job_id=job_id, stale_before=stale_before,
                                  reason="test")
        session.commit()
    assert _job(db_sessions, job_id).status == JobStatus.RUNNING


def test_queued_jobs_are_resent_only_after_requeue_after(db_sessions):
    fresh = make_job(db_sessions, JobStatus.QUEUED)
    lost = make_job(db_sessions, JobStatus.QUEUED)
    _set(db_sessions, lost, created_at=utcnow() - timedelta(seconds=600))
    done = _sweep(db_sessions)
    assert done.resent == [lost] and done.to_send == [lost]
    assert _job(db_sessions, fresh).enqueued_at is None
    assert not _sweep(db_sessions)  # just re-sent: not again until requeue_after has passed
    later = utcnow() + timedelta(seconds=POLICY.requeue_after_s + 1)
    assert set(_sweep(db_sessions, now=later).resent) == {fresh, lost}


@pytest.mark.parametrize("status", [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED,
                                    JobStatus.VALIDATING_FILES])
def test_other_statuses_are_left_alone(db_sessions, status):
    job_id = make_job(db_sessions, status)
    _set(db_sessions, job_id, created_at=utcnow() - timedelta(days=1),
         heartbeat_at=utcnow() - timedelta(days=1))
    assert not _sweep(db_sessions)
    assert _job(db_sessions, job_id).status == status


def test_an_old_attempt_cannot_touch_the_job_after_it_was_requeued_and_claimed(db_sessions):
    job_id = _running(db_sessions, silent_for_s=120)
    assert _sweep(db_sessions).requeued == [job_id]
    with db_sessions() as session:
        assert claim_job(session, job_id=job_id, worker="host:2")
        assert current_attempt(session, job_id=job_id) == 2
        session.commit()
        # The first worker wakes up: every write it tries under attempt 1 is refused.
        assert not heartbeat(session, job_id=job_id, attempt=1)
        assert not record_progress(session, job_id=job_id, step=3, total=4, train_loss=0.1,
                                   lr=1e-3, grad_norm=1.0, attempt=1)
        assert not finish_failed(session, job_id=job_id, code=INTERNAL_ERROR, message="late",
                                 attempt=1)
        assert heartbeat(session, job_id=job_id, attempt=2)
        session.commit()
    job = _job(db_sessions, job_id)
    assert job.status == JobStatus.RUNNING and job.worker == "host:2" and job.attempts == 2
