"""Job status transitions (api.services.jobs) on SQLite and Postgres: who may move a job where."""
from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from api.core.models import (
    Adapter,
    File,
    Job,
    JobEvent,
    JobMetric,
    JobStatus,
    MetricKind,
    RegisteredModel,
    Tenant,
    new_id,
)
from api.services.jobs import (
    EVENT_STATUS,
    INTERNAL_ERROR,
    USER_ERROR,
    claim_job,
    finish_cancelled,
    finish_failed,
    finish_succeeded,
    record_eval,
    record_progress,
    request_cancel,
    stop_requested,
)

NON_TERMINAL = {JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.RUNNING,
                JobStatus.CANCEL_REQUESTED, JobStatus.PAUSE_REQUESTED, JobStatus.PAUSED}


def _base_rows(session: Session) -> tuple[str, str]:
    """A tenant, the minilm-l6 base model and a training file; returns (tenant id, file id)."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == "acme"))
    if tenant is None:
        tenant = Tenant(name="acme")
        session.add(tenant)
        session.add(RegisteredModel(id="minilm-l6", task="classification", params=22_000_000))
        session.flush()
    file = File(tenant_id=tenant.id, filename="train.jsonl", purpose="fine-tune", bytes=10,
                sha256="0" * 64, storage_key=f"files/{new_id('file')}", num_examples=1)
    session.add(file)
    session.flush()
    return tenant.id, file.id


def make_job(sessions: sessionmaker[Session], status: JobStatus) -> str:
    """A committed job row in `status`."""
    with sessions() as session:
        tenant_id, file_id = _base_rows(session)
        job = Job(tenant_id=tenant_id, model="minilm-l6", status=status, training_file=file_id,
                  spec={"model": "minilm-l6", "training_file": file_id})
        session.add(job)
        session.commit()
        return job.id


def status_of(sessions: sessionmaker[Session], job_id: str) -> JobStatus:
    with sessions() as session:
        return session.scalar(select(Job.status).where(Job.id == job_id))


def _succeed(session: Session, job_id: str) -> bool:
    return finish_succeeded(
        session, job_id=job_id, adapter_id=new_id("adapter"), storage_key="adapters/x",
        nnz=10, density=0.01, metric="magnitude", bytes=100, sha256="a" * 64,
        eval={"eval_accuracy": 0.5}, trainable_params=12,
    )


TRANSITIONS: dict[str, tuple[Callable[[Session, str], bool], set[JobStatus], JobStatus]] = {
    "claim_job": (lambda s, j: claim_job(s, job_id=j, worker="w1"),
                  {JobStatus.QUEUED}, JobStatus.RUNNING),
    "finish_succeeded": (_succeed, {JobStatus.RUNNING, JobStatus.PAUSE_REQUESTED},
                         JobStatus.SUCCEEDED),
    "finish_failed": (lambda s, j: finish_failed(s, job_id=j, code=USER_ERROR, message="bad"),
                      NON_TERMINAL, JobStatus.FAILED),
    "finish_cancelled": (lambda s, j: finish_cancelled(s, job_id=j),
                         {JobStatus.RUNNING, JobStatus.CANCEL_REQUESTED, JobStatus.PAUSE_REQUESTED},
                         JobStatus.CANCELLED),
}


@pytest.mark.parametrize("name", sorted(TRANSITIONS))
def test_transition_moves_only_from_its_source_statuses(db_sessions, name):
    transition, sources, target = TRANSITIONS[name]
    for status in JobStatus:
        job_id = make_job(db_sessions, status)
        with db_sessions() as session:
            changed = transition(session, job_id)
            session.commit()
        assert changed is (status in sources), (name, status)
        assert status_of(db_sessions, job_id) == (target if changed else status)
        with db_sessions() as session:
            events = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)).all()
        assert [e.type for e in events] == ([EVENT_STATUS] if changed else [])
        if changed:
            assert events[0].data["status"] == target.value


def test_claim_records_worker_start_heartbeat_and_attempt(db_sessions):
    job_id = make_job(db_sessions, JobStatus.QUEUED)
    with db_sessions() as session:
        assert claim_job(session, job_id=job_id, worker="host:1")
        session.commit()
        job = session.get(Job, job_id)
        assert job.worker == "host:1" and job.attempts == 1
        assert job.started_at is not None and job.heartbeat_at is not None
        assert not claim_job(session, job_id=job_id, worker="host:2")  # a redelivery is refused
        session.commit()
        session.refresh(job)
        assert job.worker == "host:1" and job.attempts == 1


def test_cancel_of_a_queued_job_is_immediate(db_sessions):
    job_id = make_job(db_sessions, JobStatus.QUEUED)
    with db_sessions() as session:
        assert request_cancel(session, job_id=job_id)
        session.commit()
        assert session.get(Job, job_id).finished_at is not None
        assert stop_requested(session, job_id=job_id) == JobStatus.CANCEL_REQUESTED
        assert not claim_job(session, job_id=job_id, worker="w")
    assert status_of(db_sessions, job_id) == JobStatus.CANCELLED


def test_cancel_of_a_running_job_asks_the_worker_to_stop(db_sessions):
    job_id = make_job(db_sessions, JobStatus.RUNNING)
    with db_sessions() as session:
        assert stop_requested(session, job_id=job_id) is None
        assert request_cancel(session, job_id=job_id)
        session.commit()
        assert stop_requested(session, job_id=job_id) == JobStatus.CANCEL_REQUESTED
        assert status_of(db_sessions, job_id) == JobStatus.CANCEL_REQUESTED
        assert not request_cancel(session, job_id=job_id)  # asking twice changes nothing
        assert not _succeed(session, job_id)  # a cancel request wins over a late success
        assert finish_cancelled(session, job_id=job_id)
        session.commit()
    assert status_of(db_sessions, job_id) == JobStatus.CANCELLED


@pytest.mark.parametrize("status", [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED])
def test_cancel_of_a_finished_job_is_refused(db_sessions, status):
    job_id = make_job(db_sessions, status)
    with db_sessions() as session:
        assert not request_cancel(session, job_id=job_id)
        session.commit()
    assert status_of(db_sessions, job_id) == status


def test_success_twice_makes_one_adapter(db_sessions):
    job_id = make_job(db_sessions, JobStatus.RUNNING)
    with db_sessions() as session:
        assert _succeed(session, job_id)
        session.commit()
        assert not _succeed(session, job_id)
        session.commit()
        adapters = session.scalars(select(Adapter).where(Adapter.job_id == job_id)).all()
        job = session.get(Job, job_id)
        assert len(adapters) == 1 and job.adapter_id == adapters[0].id
        assert adapters[0].base_model == "minilm-l6" and adapters[0].tenant_id == job.tenant_id
        assert job.trainable_params == 12 and job.finished_at is not None


def test_failure_records_the_error(db_sessions):
    job_id = make_job(db_sessions, JobStatus.RUNNING)
    with db_sessions() as session:
        assert finish_failed(session, job_id=job_id, code=INTERNAL_ERROR,
                             message="internal error: RuntimeError")
        session.commit()
        job = session.get(Job, job_id)
        assert (job.error_code, job.error_message, job.error_param) == (
            INTERNAL_ERROR, "internal error: RuntimeError", None)
        assert not finish_failed(session, job_id=job_id, code=USER_ERROR, message="again")


def test_progress_and_metrics_are_idempotent_per_step(db_sessions):
    job_id = make_job(db_sessions, JobStatus.RUNNING)
    with db_sessions() as session:
        for loss in (0.9, 0.7):  # a retried attempt reports step 1 again: overwritten, not doubled
            assert record_progress(session, job_id=job_id, step=1, total=4, train_loss=loss,
                                   lr=1e-3, grad_norm=2.0)
            session.commit()
        assert record_progress(session, job_id=job_id, step=2, total=4, train_loss=0.5,
                               lr=1e-3, grad_norm=1.0)
        record_eval(session, job_id=job_id, step=2,
                    metrics={"eval_loss": 0.4, "eval_accuracy": 0.8, "epoch": 0})
        record_eval(session, job_id=job_id, step=2,
                    metrics={"eval_loss": 0.3, "eval_accuracy": 0.9, "epoch": 0})
        session.commit()
        rows = session.scalars(
            select(JobMetric).where(JobMetric.job_id == job_id)
            .order_by(JobMetric.kind, JobMetric.step)).all()
        assert [(r.kind, r.step) for r in rows] == [
            (MetricKind.EVAL, 2), (MetricKind.TRAIN, 1), (MetricKind.TRAIN, 2)]
        assert rows[0].eval_accuracy == pytest.approx(0.9)
        assert rows[1].train_loss == pytest.approx(0.7)
        job = session.get(Job, job_id)
        assert (job.progress_step, job.progress_total) == (2, 4) and job.heartbeat_at is not None


def test_progress_of_a_finished_job_is_ignored(db_sessions):
    job_id = make_job(db_sessions, JobStatus.CANCELLED)
    with db_sessions() as session:
        assert not record_progress(session, job_id=job_id, step=1, total=4, train_loss=0.9,
                                   lr=1e-3, grad_norm=2.0)
        session.commit()
        count = session.scalar(select(func.count()).select_from(JobMetric)
                               .where(JobMetric.job_id == job_id))
        assert count == 0


def _claim_concurrently(sessions: sessionmaker[Session], job_id: str) -> list[bool]:
    """Two threads, each with its own session, claim one job at the same moment."""
    barrier = threading.Barrier(2)
    results: list[bool] = []
    errors: list[BaseException] = []

    def claim(worker: str) -> None:
        try:
            with sessions() as session:
                barrier.wait(timeout=10)
                won = claim_job(session, job_id=job_id, worker=worker)
                session.commit()
                results.append(won)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors
    return results


def test_two_concurrent_claims_have_one_winner(db_sessions):
    for _ in range(3):
        job_id = make_job(db_sessions, JobStatus.QUEUED)
        assert sorted(_claim_concurrently(db_sessions, job_id)) == [False, True]
        with db_sessions() as session:
            assert session.get(Job, job_id).attempts == 1
