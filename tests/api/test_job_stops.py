"""An attempt its worker stops before the end (api.services.job_stops), and the failure budget:
pauses cost no attempt, faults and crashes do. On SQLite and Postgres."""
from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from api.core.models import Job, JobEvent, JobStatus, utcnow
from api.services.job_reads import resume_job
from api.services.job_stops import failed_attempts, release_job, retry_or_fail
from api.services.jobs import INTERNAL_ERROR, claim_job, request_pause, request_resume
from api.services.reconciler import ReconcilePolicy, reconcile_jobs
from tests.api.test_job_transitions import make_job, status_of

RELEASED = {JobStatus.PAUSE_REQUESTED: JobStatus.PAUSED,
            JobStatus.CANCEL_REQUESTED: JobStatus.CANCELLED,
            JobStatus.RUNNING: JobStatus.QUEUED}


def _messages(sessions: sessionmaker[Session], job_id: str) -> list[str]:
    with sessions() as session:
        return list(session.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id)
                                    .order_by(JobEvent.id)))


def _claimed(sessions: sessionmaker[Session], job_id: str) -> int:
    """Claim the queued job; its attempt number."""
    with sessions() as session:
        assert claim_job(session, job_id=job_id, worker="host:1")
        session.commit()
        return session.get(Job, job_id).attempts


def _do(sessions: sessionmaker[Session], action, *args, **kwargs):
    """`action(session, …)` in its own committed session; its result."""
    with sessions() as session:
        result = action(session, *args, **kwargs)
        session.commit()
    return result


@pytest.mark.parametrize("status", list(JobStatus))
def test_a_stopped_attempt_goes_where_the_requests_made_meanwhile_say(db_sessions, status):
    job_id = make_job(db_sessions, status)
    with db_sessions() as session:
        session.execute(update(Job).where(Job.id == job_id).values(attempts=2, worker="host:1"))
        session.commit()
        # an attempt whose lease was taken over changes nothing
        assert release_job(session, job_id=job_id, attempt=1, voluntary=True, step=3,
                           reason="withdrawn") is None
        released = release_job(session, job_id=job_id, attempt=2, voluntary=True, step=3,
                               reason="the pause was withdrawn")
        session.commit()
    assert released == RELEASED.get(status)
    assert status_of(db_sessions, job_id) == RELEASED.get(status, status)
    if released is not None:
        job = _do(db_sessions, Session.get, Job, job_id)
        assert job.worker is None and job.heartbeat_at is None
        assert _do(db_sessions, failed_attempts, job_id=job_id) == 1  # 2 claims, 1 given back
    if released == JobStatus.QUEUED:
        assert job.enqueued_at is not None
        assert _messages(db_sessions, job_id)[-1] == "job re-queued: the pause was withdrawn"
    if released == JobStatus.PAUSED:
        assert _messages(db_sessions, job_id)[-1] == "job paused at step 3"


def test_pauses_cost_no_attempt_and_faults_do_until_the_job_fails_saying_why(db_sessions):
    job_id = make_job(db_sessions, JobStatus.QUEUED)
    for _ in range(3):  # paused, resumed; and a pause withdrawn after the worker took it
        attempt = _claimed(db_sessions, job_id)
        assert _do(db_sessions, request_pause, job_id=job_id)
        assert _do(db_sessions, release_job, job_id=job_id, attempt=attempt, voluntary=True,
                   step=attempt, reason="-") == JobStatus.PAUSED
        assert _do(db_sessions, request_resume, job_id=job_id)
        attempt = _claimed(db_sessions, job_id)
        assert _do(db_sessions, request_pause, job_id=job_id)
        assert _do(db_sessions, request_resume, job_id=job_id)  # withdrawn: running again
        assert _do(db_sessions, release_job, job_id=job_id, attempt=attempt, voluntary=True,
                   step=attempt, reason="pause withdrawn") == JobStatus.QUEUED
    assert _do(db_sessions, failed_attempts, job_id=job_id) == 0

    attempt = _claimed(db_sessions, job_id)  # the 7th claim, the 1st to fail
    assert _do(db_sessions, retry_or_fail, job_id=job_id, attempt=attempt, max_attempts=2,
               reason="object storage unavailable: down") == JobStatus.QUEUED
    assert _messages(db_sessions, job_id)[-1] == (
        "job re-queued: object storage unavailable: down (failed attempt 1 of 2)")
    attempt = _claimed(db_sessions, job_id)
    assert _do(db_sessions, retry_or_fail, job_id=job_id, attempt=attempt, max_attempts=2,
               reason="object storage unavailable: down") == JobStatus.FAILED
    job = _do(db_sessions, Session.get, Job, job_id)
    assert job.attempts == 8 and job.error_code == INTERNAL_ERROR
    assert job.error_message == "object storage unavailable: down; gave up after 2 failed attempts"


def test_a_crash_after_pauses_is_retried_as_the_first_failure(db_sessions):
    """Two pause/resume cycles, then the worker dies: with SPEFT_MAX_ATTEMPTS=2 the reconciler
    re-queues the job (one failure of two), it does not fail it after "3 attempts"."""
    job_id = make_job(db_sessions, JobStatus.QUEUED)
    for _ in range(2):
        attempt = _claimed(db_sessions, job_id)
        assert _do(db_sessions, request_pause, job_id=job_id)
        _do(db_sessions, release_job, job_id=job_id, attempt=attempt, voluntary=True, step=1,
            reason="-")
        assert _do(db_sessions, request_resume, job_id=job_id)
    _claimed(db_sessions, job_id)
    with db_sessions() as session:  # the third attempt's worker went silent
        session.execute(update(Job).where(Job.id == job_id)
                        .values(heartbeat_at=utcnow() - timedelta(seconds=120)))
        session.commit()
    policy = ReconcilePolicy(heartbeat_timeout_s=60, requeue_after_s=300, max_attempts=2)
    done = _do(db_sessions, reconcile_jobs, policy=policy)
    assert done.requeued == [job_id] and not done.failed
    assert "attempt 2 of 2 follows" in _messages(db_sessions, job_id)[-1]


def test_a_resume_that_finds_the_job_paused_by_its_worker_meanwhile_sends_it(db_sessions):
    """The resume request reads the job while it is still `pause_requested`; its worker pauses
    it before the request's update: the request resumes a paused job and must send it."""
    job_id = make_job(db_sessions, JobStatus.QUEUED)
    attempt = _claimed(db_sessions, job_id)
    assert _do(db_sessions, request_pause, job_id=job_id)
    with db_sessions() as request:
        job = request.get(Job, job_id)  # what the request read
        assert job.status == JobStatus.PAUSE_REQUESTED
        request.commit()  # its read is over; the job object keeps what it read
        assert _do(db_sessions, release_job, job_id=job_id, attempt=attempt, voluntary=True,
                   step=3, reason="-") == JobStatus.PAUSED  # the worker, meanwhile
        resumed, send = resume_job(request, tenant_id=job.tenant_id, job_id=job_id)
        request.commit()
    assert resumed.status == JobStatus.QUEUED and send
