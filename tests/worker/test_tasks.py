"""run_job in-process on a migrated SQLite database, local storage and real sst2 lines with MiniLM."""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
from sqlalchemy import select, update

from api.core.config import get_settings
from api.core.db import (
    dispose_engine,
    get_session_factory,
    make_engine,
    session_factory,
    upgrade_database,
)
from api.core.models import (
    Adapter,
    File,
    Job,
    JobEvent,
    JobMetric,
    JobStatus,
    MetricKind,
    utcnow,
)
from api.schemas.jobs import JobObject
from api.services import job_runs
from api.services.jobs import (
    INTERNAL_ERROR,
    USER_ERROR,
    claim_job,
    request_cancel,
    requeue_stale_job,
)
from api.services.reconciler import ReconcilePolicy, reconcile_jobs
from speft_core.errors import TrainingCancelled
from tests.fixtures.jobs import SPEC, Service
from worker import recorder, tasks
from worker.celery_app import app


@pytest.fixture
def service(tmp_path, monkeypatch, data_dir) -> Iterator[Service]:
    """SPEFT_* pointed at a migrated SQLite file and a storage folder in tmp_path."""
    url = f"sqlite:///{tmp_path / 'speft.db'}"
    upgrade_database(url)
    monkeypatch.setenv("SPEFT_DATABASE_URL", url)
    monkeypatch.setenv("SPEFT_STORAGE_URL", f"file://{tmp_path / 'storage'}")
    get_settings.cache_clear()
    dispose_engine()
    tasks.get_storage.cache_clear()
    engine = make_engine(url)
    try:
        yield Service(session_factory(engine), tasks.get_storage(), data_dir)
    finally:
        engine.dispose()
        dispose_engine(close=True)
        tasks.get_storage.cache_clear()
        monkeypatch.undo()
        get_settings.cache_clear()


def test_task_is_registered_by_name_and_acked_late():
    task = app.tasks["speft.run_job"]
    assert task.name == tasks.run_job.name == "speft.run_job"
    assert task.acks_late and task.reject_on_worker_lost


def test_job_succeeds_with_adapter_metrics_and_events_and_a_redelivery_does_nothing(service):
    job_id = service.make_job()
    tasks.run_job.run(job_id)

    job = service.job(job_id)
    assert job.status == JobStatus.SUCCEEDED, (job.error_code, job.error_message)
    assert job.attempts == 1 and job.worker and job.finished_at is not None
    assert (job.progress_step, job.progress_total) == (4, 4) and job.trainable_params > 0
    with service.sessions() as session:
        adapter = session.scalar(select(Adapter).where(Adapter.job_id == job_id))
        metrics = session.scalars(select(JobMetric).where(JobMetric.job_id == job_id)).all()
        events = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)
                                 .order_by(JobEvent.id)).all()
    assert adapter.id == job.adapter_id and adapter.nnz == 2000 and adapter.metric == "magnitude"
    assert adapter.base_model == "minilm-l6" and adapter.tenant_id == service.tenant_id
    assert set(adapter.eval) >= {"eval_loss", "eval_accuracy"}
    content = service.storage.get(adapter.storage_key, sha256=adapter.sha256)
    assert len(content) == adapter.bytes
    assert [m.step for m in metrics if m.kind == MetricKind.TRAIN] == [1, 2, 3, 4]
    assert [m.step for m in metrics if m.kind == MetricKind.EVAL] == [4]
    messages = [e.message for e in events]
    assert messages[0] == "job started" and messages[-1] == "job succeeded"
    assert "mask selected" in messages

    tasks.run_job.run(job_id)  # the broker delivers the message again: nothing changes
    assert service.job(job_id).status == JobStatus.SUCCEEDED
    assert service.count(Adapter, job_id) == 1 and service.count(JobEvent, job_id) == len(events)
    assert len(service.adapter_objects()) == 1


def test_bad_training_line_fails_as_user_error(service):
    lines = service.sst2("train", 8)
    lines[2] = '{"text": "broken", "label": '
    job_id = service.make_job(lines)
    tasks.run_job.run(job_id)
    job = service.job(job_id)
    assert (job.status, job.error_code) == (JobStatus.FAILED, USER_ERROR)
    assert "line 3" in job.error_message
    assert service.count(Adapter, job_id) == 0 and service.adapter_objects() == []


@pytest.mark.parametrize("field", ["training_file", "validation_file"])
@pytest.mark.parametrize("how", ["row deleted", "object missing"])
def test_a_file_deleted_under_a_queued_job_fails_it_as_user_error_naming_the_field(
        service, field, how):
    job_id = service.make_job()
    with service.sessions() as session:
        row = session.get(File, getattr(session.get(Job, job_id), field))
        if how == "row deleted":
            row.deleted_at = utcnow()
        service.storage.delete(row.storage_key)
        session.commit()
    tasks.run_job.run(job_id)
    job = service.job(job_id)
    assert (job.status, job.error_code, job.error_param) == (JobStatus.FAILED, USER_ERROR, field)
    assert row.id in job.error_message and "deleted" in job.error_message


def test_cancel_before_start_means_no_training(service):
    job_id = service.make_job()
    with service.sessions() as session:
        assert request_cancel(session, job_id=job_id)
        session.commit()
    tasks.run_job.run(job_id)
    job = service.job(job_id)
    assert job.status == JobStatus.CANCELLED and job.started_at is None
    assert service.count(Adapter, job_id) == 0 and service.adapter_objects() == []


def test_cancel_while_running_stops_between_steps(service, monkeypatch):
    job_id = service.make_job()
    monkeypatch.setattr(recorder, "CANCEL_POLL_S", 0.0)
    record_progress = recorder.record_progress

    def cancel_then_record(session, **report):
        if report["step"] == 1:
            with service.sessions() as other:
                assert request_cancel(other, job_id=job_id)
                other.commit()
        return record_progress(session, **report)

    monkeypatch.setattr(recorder, "record_progress", cancel_then_record)
    tasks.run_job.run(job_id)
    job = service.job(job_id)
    assert job.status == JobStatus.CANCELLED and job.progress_step == 1
    assert service.count(Adapter, job_id) == 0 and service.adapter_objects() == []


def test_unexpected_error_is_an_internal_error(service, monkeypatch):
    def explode(spec, **_):
        raise RuntimeError("boom at /secret/path")

    monkeypatch.setattr(tasks, "fine_tune", explode)
    job_id = service.make_job()
    tasks.run_job.run(job_id)
    job = service.job(job_id)
    assert (job.status, job.error_code) == (JobStatus.FAILED, INTERNAL_ERROR)
    assert job.error_message == "internal error: RuntimeError"


def test_job_trains_on_its_device(service, monkeypatch):
    seen = []

    def record_device(spec, *, device, **_):
        seen.append(device)
        raise TrainingCancelled("stop here")

    monkeypatch.setattr(tasks, "fine_tune", record_device)
    tasks.run_job.run(service.make_job(device="cpu"))
    assert seen == [torch.device("cpu")]


def test_cuda_job_on_a_worker_without_cuda_fails_saying_so(service, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    job_id = service.make_job(device="cuda")
    tasks.run_job.run(job_id)
    job = service.job(job_id)
    assert (job.status, job.error_code, job.error_param) == (JobStatus.FAILED, INTERNAL_ERROR,
                                                             "device")
    assert "speft worker --device cuda" in job.error_message


def test_success_that_loses_to_a_cancel_leaves_no_adapter_object(service, monkeypatch):
    job_id = service.make_job()

    def train_then_get_cancelled(spec, **_):
        with service.sessions() as other:  # the cancel lands after the last cancel check
            assert request_cancel(other, job_id=job_id)
            other.commit()
        return SimpleNamespace(delta=SimpleNamespace(nnz=1), eval={}, trainable_params=1,
                               best_step=None, steps=4)

    monkeypatch.setattr(tasks, "fine_tune", train_then_get_cancelled)
    monkeypatch.setattr(job_runs, "delta_to_bytes", lambda delta: json.dumps({"fake": 1}).encode())
    tasks.run_job.run(job_id)
    assert service.job(job_id).status == JobStatus.CANCELLED
    assert service.count(Adapter, job_id) == 0 and service.adapter_objects() == []


def test_the_heartbeat_thread_stamps_the_job_while_training_runs_between_steps(service,
                                                                               monkeypatch):
    monkeypatch.setenv("SPEFT_HEARTBEAT_INTERVAL_S", "0.05")
    get_settings.cache_clear()
    job_id = service.make_job()
    beats = []

    def slow_scoring(spec, **_):  # minutes of salience scoring: no step reports meanwhile
        for _ in range(3):
            time.sleep(0.2)
            beats.append(service.job(job_id).heartbeat_at)
        raise TrainingCancelled()

    monkeypatch.setattr(tasks, "fine_tune", slow_scoring)
    tasks.run_job.run(job_id)
    assert beats[0] < beats[1] < beats[2], beats


def test_a_later_attempt_that_succeeds_removes_the_killed_attempts_upload(service, monkeypatch):
    job_id = service.make_job()
    adapter_id = job_runs.adapter_id_for(job_id)
    with service.sessions() as session:  # attempt 1: claimed, uploaded, then the worker died
        assert claim_job(session, job_id=job_id, worker="dead:1")
        session.commit()
    service.storage.put(job_runs.attempt_key(adapter_id, 1), b"partial")
    with service.sessions() as session:
        assert requeue_stale_job(session, job_id=job_id, stale_before=utcnow(), reason="test")
        session.commit()
    tasks.run_job.run(job_id)  # attempt 2
    job = service.job(job_id)
    assert job.status == JobStatus.SUCCEEDED and job.attempts == 2
    assert job.adapter_id == adapter_id and service.count(Adapter, job_id) == 1
    objects = service.adapter_objects()
    assert [p.name for p in objects] == [f"{adapter_id}.attempt-2.safetensors"]


def test_the_reconcile_task_fails_a_dead_job_and_deletes_its_uploads(service, monkeypatch):
    monkeypatch.setenv("SPEFT_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("SPEFT_HEARTBEAT_TIMEOUT_S", "1")
    get_settings.cache_clear()
    job_id = service.make_job()
    with service.sessions() as session:
        assert claim_job(session, job_id=job_id, worker="dead:1")
        session.execute(update(Job).where(Job.id == job_id)
                        .values(heartbeat_at=utcnow() - timedelta(seconds=5)))
        session.commit()
    service.storage.put(job_runs.attempt_key(job_runs.adapter_id_for(job_id), 1), b"partial")
    assert tasks.reconcile.run() == {"requeued": [], "failed": [job_id], "cancelled": [],
                                     "resent": [], "purged": []}
    job = service.job(job_id)
    assert job.status == JobStatus.FAILED and "worker lost" in job.error_message
    assert service.adapter_objects() == []


def test_the_reconcile_task_removes_the_object_of_a_file_deleted_a_minute_ago_and_not_purged(
        service):
    file_id = service.upload("train.jsonl", service.sst2("train", 4))
    recent_id = service.upload("recent.jsonl", service.sst2("train", 4))
    with service.sessions() as session:  # both deleted, their after-commit purges lost
        session.execute(update(File).where(File.id == file_id)
                        .values(deleted_at=utcnow() - timedelta(seconds=90)))
        session.execute(update(File).where(File.id == recent_id).values(deleted_at=utcnow()))
        session.commit()
    assert tasks.reconcile.run() == {"purged": [file_id]}  # the recent one is left to its purge
    assert not service.storage.exists(f"files/{file_id}.jsonl")
    assert service.storage.exists(f"files/{recent_id}.jsonl")
    with service.sessions() as session:
        assert session.get(File, file_id).purged_at is not None
        assert session.get(File, recent_id).purged_at is None
    assert tasks.reconcile.run() == {}  # purged once


# --- an attempt that makes no progress (SPEFT_STALL_TIMEOUT_S) ---------------------------------


def _wait_until(condition, timeout_s: float = 10.0):
    """The first truthy value of `condition()`, polled until `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return value


def _events(service, job_id):
    with service.sessions() as session:
        return [(event.level, event.message) for event in
                session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)
                                .order_by(JobEvent.id))]


def _stalled(service, job_id):
    return [message for level, message in _events(service, job_id)
            if level == "warning" and "stalled" in message]


def _sweep(max_attempts: int):
    """One reconciler sweep, committed (the re-sends are left out: the test delivers them)."""
    policy = ReconcilePolicy.from_settings(get_settings())
    policy = ReconcilePolicy(policy.heartbeat_timeout_s, policy.requeue_after_s, max_attempts)
    with get_session_factory()() as session:
        done = reconcile_jobs(session, policy=policy)
        session.commit()
    return done


@pytest.fixture
def hung_first_attempt(service, monkeypatch):
    """Attempt 1's training blocks at step 0 (as on a build lock nobody releases) until the test
    releases it, then raises; later attempts train for real. Short timeouts: a beat every 50 ms,
    a stall after 0.5 s without progress, a worker presumed lost after 0.3 s of silence."""
    for name, value in (("HEARTBEAT_INTERVAL_S", "0.05"), ("STALL_TIMEOUT_S", "0.5"),
                        ("HEARTBEAT_TIMEOUT_S", "0.3")):
        monkeypatch.setenv(f"SPEFT_{name}", value)
    get_settings.cache_clear()
    release = threading.Event()
    real_fine_tune, calls = tasks.fine_tune, []

    def hung_then_healthy(spec, **kwargs):
        calls.append(spec)
        if len(calls) == 1:
            release.wait(60)
            raise RuntimeError("woke up")  # its failure must not land: the lease is gone
        return real_fine_tune(spec, **kwargs)

    monkeypatch.setattr(tasks, "fine_tune", hung_then_healthy)
    job_id = service.make_job()
    first = threading.Thread(target=tasks.run_job.run, args=(job_id,))
    first.start()
    try:
        yield job_id
    finally:
        release.set()
        first.join(timeout=30)


def test_a_stuck_attempt_stops_heart_beating_is_requeued_and_a_healthy_retry_succeeds(
        service, monkeypatch, hung_first_attempt):
    job_id = hung_first_attempt
    assert "no step, evaluation or event" in _wait_until(lambda: _stalled(service, job_id))[0]
    assert _wait_until(lambda: _sweep(max_attempts=3).requeued) == [job_id]
    assert service.job(job_id).status == JobStatus.QUEUED
    monkeypatch.setenv("SPEFT_STALL_TIMEOUT_S", "3600")  # the retry loads and scores for seconds
    get_settings.cache_clear()
    tasks.run_job.run(job_id)  # the re-sent message, delivered to a healthy worker
    job = service.job(job_id)
    assert (job.status, job.attempts, job.error_code) == (JobStatus.SUCCEEDED, 2, None)
    assert service.count(Adapter, job_id) == 1


def test_a_stuck_attempt_without_attempts_left_fails_as_a_lost_worker(service,
                                                                      hung_first_attempt):
    job_id = hung_first_attempt
    _wait_until(lambda: _stalled(service, job_id))
    assert _wait_until(lambda: _sweep(max_attempts=1).failed) == [job_id]
    job = service.job(job_id)
    assert (job.status, job.error_code) == (JobStatus.FAILED, INTERNAL_ERROR)
    assert "worker lost" in job.error_message


def test_events_are_progress_so_a_long_silent_phase_that_reports_them_keeps_its_heartbeat(
        service, monkeypatch):
    monkeypatch.setenv("SPEFT_HEARTBEAT_INTERVAL_S", "0.05")
    monkeypatch.setenv("SPEFT_STALL_TIMEOUT_S", "0.4")
    get_settings.cache_clear()
    job_id = service.make_job()
    beats = []

    def scoring_with_events(spec, *, callbacks, **_):
        for phase in range(8):  # 1.6 s in all, an event every 0.2 s: never 0.4 s idle
            time.sleep(0.2)
            callbacks.on_event(f"phase {phase}", {})
            beats.append(service.job(job_id).heartbeat_at)
        raise TrainingCancelled()

    monkeypatch.setattr(tasks, "fine_tune", scoring_with_events)
    tasks.run_job.run(job_id)
    assert beats == sorted(set(beats)) and len(beats) == 8, beats
    assert _stalled(service, job_id) == []


def test_the_estimated_finish_follows_the_median_step_time(monkeypatch):
    clock = iter([0.0, 10.0, 11.0, 12.0, 13.0, 14.0])  # a slow first step, then 1 s a step
    monkeypatch.setattr(recorder.time, "monotonic", lambda: next(clock))
    rate = recorder.StepRate()
    assert rate.estimate(1, 100) is None  # one step seen: no rate yet
    estimates = [rate.estimate(step, 100) for step in (2, 3, 4, 5)]
    left = [(e - utcnow()).total_seconds() for e in estimates]
    assert left[-1] == pytest.approx(95, abs=2)  # the median ignores the slow step
    done = rate.estimate(6, 6)  # the last step: finishing now
    assert abs((done - utcnow()).total_seconds()) < 1


def test_a_job_reports_each_phase_with_its_own_size_as_it_enters_it(service):
    job_id = service.make_job(method={"type": "speft", "speft": {
        **SPEC["method"]["speft"], "head_warmup_steps": 2}})
    tasks.run_job.run(job_id)

    job = service.job(job_id)
    assert job.status == JobStatus.SUCCEEDED, (job.error_code, job.error_message)
    with service.sessions() as session:
        phases = [(event.data["phase"], event.data["total"]) for event in session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
            if event.message.startswith("phase: ")]
    assert phases == [("evaluating_base", 32), ("head_warmup", 2), ("scoring_salience", 32),
                      ("selecting_mask", None), ("training", 4), ("evaluating", 32),
                      ("checkpointing", None), ("saving", None)]
    shown = JobObject.shown(job, stale_after_s=60).progress  # a finished job is in no phase
    assert (shown.phase, shown.phase_estimated_finish, shown.stale) == (None, None, False)
