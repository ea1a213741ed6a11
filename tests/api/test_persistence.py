"""Persistence: migrations are the schema on SQLite and Postgres, rows round-trip, claims are atomic."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from pydantic import ValidationError
from sqlalchemy import Engine, inspect, select, text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session, sessionmaker

from api.core import db as db_module
from api.core.config import Settings, get_settings
from api.core.db import alembic_config, make_engine, upgrade_database
from api.core.models import (
    Adapter,
    ApiKey,
    Base,
    File,
    Job,
    JobEvent,
    JobMetric,
    JobStatus,
    MetricKind,
    RegisteredModel,
    Tenant,
    api_key_prefix,
    hash_api_key,
    utcnow,
)
from api.services.jobs import transition_job

REPO = Path(__file__).resolve().parents[2]
SPEC = {
    "model": "minilm-l6",
    "training_file": "file-x",
    "task": "classification",
    "method": {"type": "speft", "speft": {"metric": "gradient", "density": 0.01}},
    "hyperparameters": {"n_epochs": 1, "learning_rate": 5e-4},
    "metadata": {"team": "nlp", "nested": [1, 2.5, None]},
}


def _schema_diff(engine: Engine) -> list:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)


def _seed(session: Session, tenant_name: str = "acme") -> tuple[Tenant, RegisteredModel, File]:
    """A tenant, the base model `minilm-l6` (once) and one training file."""
    tenant = Tenant(name=tenant_name)
    model = session.get(RegisteredModel, "minilm-l6") or RegisteredModel(
        id="minilm-l6", task="classification", params=22_700_000, fingerprint="ab" * 32
    )
    session.add_all([tenant, model])
    session.flush()
    file = File(
        tenant_id=tenant.id, filename="train.jsonl", purpose="fine-tune", bytes=1234,
        sha256="cd" * 32, storage_key=f"files/{tenant.id}/train.jsonl", num_examples=10,
        task="classification",
    )
    session.add(file)
    session.flush()
    return tenant, model, file


def _job(tenant: Tenant, file: File, **fields) -> Job:
    values = {"tenant_id": tenant.id, "model": "minilm-l6", "status": JobStatus.QUEUED,
              "spec": SPEC, "training_file": file.id}
    return Job(**(values | fields))


def _seed_job(session: Session) -> Job:
    """A queued job of a new tenant, flushed (so it has its id)."""
    tenant, _, file = _seed(session)
    job = _job(tenant, file)
    session.add(job)
    session.flush()
    return job


# --- migrations -------------------------------------------------------------------------------


def test_upgrade_head_creates_exactly_the_models_schema(migrated_db: Engine) -> None:
    assert _schema_diff(migrated_db) == []
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    with migrated_db.connect() as connection:
        assert MigrationContext.configure(connection).get_current_revision() == head


def test_schema_comparison_notices_a_missing_index(migrated_db: Engine) -> None:
    with migrated_db.begin() as connection:
        connection.execute(text("DROP INDEX ix_jobs_status"))
    diff = _schema_diff(migrated_db)
    assert [(op[0], op[1].name) for op in diff] == [("add_index", "ix_jobs_status")]


def test_downgrade_to_base_then_upgrade_again(migrated_db: Engine) -> None:
    url = migrated_db.url
    command.downgrade(alembic_config(url), "base")
    assert set(inspect(migrated_db).get_table_names()) <= {"alembic_version"}
    upgrade_database(url)
    assert _schema_diff(migrated_db) == []


@pytest.mark.parametrize("backend", ["sqlite", "empty_postgres"])
def test_processes_upgrading_together_migrate_once(
    request: pytest.FixtureRequest, backend: str
) -> None:
    url = request.getfixturevalue(f"{backend}_url")
    script = "import sys; from api.core.db import upgrade_database; upgrade_database(sys.argv[1])"
    env = os.environ | {"PYTHONPATH": str(REPO)}
    processes = [
        subprocess.Popen([sys.executable, "-c", script, url], cwd=REPO, env=env,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    errors = [p.communicate(timeout=60)[1] for p in processes if p.wait(timeout=60) != 0]
    assert errors == []
    engine = make_engine(url)
    try:
        assert _schema_diff(engine) == []
    finally:
        engine.dispose()


def test_threads_upgrading_together_migrate_once(sqlite_url: str) -> None:
    barrier = threading.Barrier(3)

    def upgrade() -> None:
        barrier.wait(timeout=10)
        upgrade_database(sqlite_url)

    with ThreadPoolExecutor(max_workers=3) as pool:
        for future in [pool.submit(upgrade) for _ in range(3)]:
            future.result(timeout=60)


def test_upgrade_works_from_any_working_directory(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    upgrade_database(sqlite_url)
    engine = make_engine(sqlite_url)
    try:
        assert _schema_diff(engine) == []
    finally:
        engine.dispose()


def test_sqlite_engine_uses_wal_and_foreign_keys(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        engine.dispose()


# --- rows -------------------------------------------------------------------------------------


def test_models_round_trip(db_sessions: sessionmaker[Session]) -> None:
    with db_sessions() as session:
        tenant, _, file = _seed(session)
        key = ApiKey(tenant_id=tenant.id, key_hash=hash_api_key("sk-secret-1"),
                     prefix=api_key_prefix("sk-secret-1"))
        job = _job(tenant, file, idempotency_key="idem-1", request_hash="ef" * 32,
                   progress_total=30)
        session.add_all([key, job])
        session.flush()
        session.add_all([
            JobEvent(job_id=job.id, level="info", type="message", message="created"),
            JobEvent(job_id=job.id, level="info", type="metrics", message="step 1",
                     data={"step": 1, "loss": 0.7}),
            JobMetric(job_id=job.id, kind=MetricKind.TRAIN, step=1, train_loss=0.7, lr=5e-4,
                      grad_norm=1.5),
            JobMetric(job_id=job.id, kind=MetricKind.EVAL, step=1, eval_loss=0.6,
                      eval_accuracy=0.81),
        ])
        adapter = Adapter(tenant_id=tenant.id, job_id=job.id, base_model="minilm-l6", nnz=2270,
                          density=0.01, metric="gradient", bytes=20_000, sha256="01" * 32,
                          storage_key=f"adapters/{job.id}.safetensors",
                          eval={"eval_accuracy": 0.81})
        session.add(adapter)
        session.commit()
        ids = {"tenant": tenant.id, "file": file.id, "job": job.id, "adapter": adapter.id}

    with db_sessions() as session:
        job = session.get_one(Job, ids["job"])
        assert job.id.startswith("ftjob-") and ids["file"].startswith("file-")
        assert ids["adapter"].startswith("adapter-")
        assert job.status is JobStatus.QUEUED
        assert job.spec == SPEC
        assert job.attempts == 0 and job.progress_step == 0 and job.progress_total == 30
        assert job.created_at.tzinfo is not None and job.created_at.utcoffset() == timedelta(0)
        assert abs(utcnow() - job.created_at) < timedelta(minutes=1)
        assert [e.message for e in job.events] == ["created", "step 1"]
        assert job.events[1].data == {"step": 1, "loss": 0.7}
        kinds = {(m.kind, m.step): m for m in job.metrics}
        assert kinds[(MetricKind.TRAIN, 1)].grad_norm == 1.5
        assert kinds[(MetricKind.EVAL, 1)].eval_accuracy == pytest.approx(0.81)
        adapter = session.scalars(select(Adapter).where(Adapter.job_id == job.id)).one()
        assert adapter.eval == {"eval_accuracy": 0.81} and adapter.job.id == job.id
        key = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_api_key("sk-secret-1")))
        key = key.one()
        assert key.prefix == "sk-secre" and key.tenant.name == "acme" and key.revoked_at is None


def test_timestamps_are_stored_in_utc(db_sessions: sessionmaker[Session]) -> None:
    plus_two = datetime(2026, 1, 2, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    with db_sessions() as session:
        tenant, _, file = _seed(session)
        job = _job(tenant, file, started_at=plus_two)
        session.add(job)
        session.commit()
        job_id = job.id
    with db_sessions() as session:
        started = session.get_one(Job, job_id).started_at
        assert started == datetime(2026, 1, 2, 12, 0, tzinfo=UTC) and started.tzinfo == UTC


@pytest.mark.parametrize(("fields", "error", "match"), [
    ({"started_at": datetime(2026, 1, 1)}, StatementError, "naive datetime"),
    ({"status": "sleeping"}, StatementError, "sleeping"),
    ({"training_file": "file-missing"}, IntegrityError, None),  # foreign keys on, also on SQLite
], ids=["naive-datetime", "unknown-status", "missing-file"])
def test_invalid_job_rows_are_refused(
    db_sessions: sessionmaker[Session], fields: dict, error: type[Exception], match: str | None
) -> None:
    with db_sessions() as session:
        tenant, _, file = _seed(session)
        session.add(_job(tenant, file, **fields))
        with pytest.raises(error, match=match):
            session.flush()


def test_one_adapter_per_job(db_sessions: sessionmaker[Session]) -> None:
    with db_sessions() as session:
        job = _seed_job(session)
        for _ in range(2):
            session.add(Adapter(tenant_id=job.tenant_id, job_id=job.id, base_model="minilm-l6", nnz=1,
                                density=0.01, metric="gradient", bytes=1, sha256="0" * 64,
                                storage_key="k"))
        with pytest.raises(IntegrityError):
            session.flush()


def test_idempotency_key_is_unique_per_tenant(db_sessions: sessionmaker[Session]) -> None:
    with db_sessions() as session:
        acme, _, acme_file = _seed(session, "acme")
        globex, _, globex_file = _seed(session, "globex")
        session.add_all([
            _job(acme, acme_file, idempotency_key="k1"),
            _job(globex, globex_file, idempotency_key="k1"),  # another tenant: allowed
            _job(acme, acme_file),  # no key: any number allowed
            _job(acme, acme_file),
        ])
        session.commit()
        session.add(_job(acme, acme_file, idempotency_key="k1"))
        with pytest.raises(IntegrityError):
            session.commit()


def test_metric_rows_are_unique_per_job_kind_and_step(db_sessions: sessionmaker[Session]) -> None:
    with db_sessions() as session:
        job = _seed_job(session)
        session.add_all([JobMetric(job_id=job.id, kind=MetricKind.TRAIN, step=5, train_loss=1.0),
                         JobMetric(job_id=job.id, kind=MetricKind.EVAL, step=5, eval_loss=1.1)])
        session.flush()
        session.add(JobMetric(job_id=job.id, kind=MetricKind.TRAIN, step=5, train_loss=0.9))
        with pytest.raises(IntegrityError):
            session.flush()


# --- status transitions -----------------------------------------------------------------------


def test_transition_job_moves_only_from_expected_statuses(
    db_sessions: sessionmaker[Session],
) -> None:
    with db_sessions() as session:
        job = _seed_job(session)
        session.commit()
        now = utcnow()
        assert transition_job(session, job.id, from_statuses=[JobStatus.QUEUED],
                              to_status=JobStatus.RUNNING, started_at=now, worker="w1",
                              attempts=Job.attempts + 1)
        session.commit()
        assert (job.status, job.worker, job.attempts) == (JobStatus.RUNNING, "w1", 1)
        assert job.started_at == now
        assert not transition_job(session, job.id, from_statuses=[JobStatus.QUEUED],
                                  to_status=JobStatus.RUNNING)
        assert not transition_job(session, "ftjob-missing", from_statuses=[JobStatus.QUEUED],
                                  to_status=JobStatus.RUNNING)
        assert transition_job(session, job.id,
                              from_statuses=[JobStatus.RUNNING, JobStatus.CANCEL_REQUESTED],
                              to_status=JobStatus.SUCCEEDED, finished_at=utcnow())
        session.commit()
        assert job.status is JobStatus.SUCCEEDED and job.status.is_terminal
        with pytest.raises(TypeError):
            transition_job(session, job.id, from_statuses=[JobStatus.RUNNING],
                           to_status=JobStatus.FAILED, no_such_column=1)


def test_two_concurrent_claims_exactly_one_wins(db_sessions: sessionmaker[Session]) -> None:
    rounds = 5
    with db_sessions() as session:
        tenant, _, file = _seed(session)
        jobs = [_job(tenant, file) for _ in range(rounds)]
        session.add_all(jobs)
        session.commit()
        job_ids = [job.id for job in jobs]

    def claim(job_id: str, worker: str, barrier: threading.Barrier) -> bool:
        with db_sessions() as session:
            session.connection()  # own connection checked out before the race starts
            barrier.wait(timeout=10)
            won = transition_job(session, job_id, from_statuses=[JobStatus.QUEUED],
                                 to_status=JobStatus.RUNNING, worker=worker,
                                 started_at=utcnow(), attempts=Job.attempts + 1)
            session.commit()
            return won

    with ThreadPoolExecutor(max_workers=2) as pool:
        for job_id in job_ids:
            barrier = threading.Barrier(2)
            futures = [pool.submit(claim, job_id, f"w{n}", barrier) for n in range(2)]
            assert sorted(f.result(timeout=30) for f in futures) == [False, True]

    with db_sessions() as session:
        for job_id in job_ids:
            job = session.get_one(Job, job_id)
            assert job.status is JobStatus.RUNNING and job.attempts == 1


# --- settings and the process engine ------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No SPEFT_* variables set (make test exports some)."""
    for name in list(os.environ):
        if name.startswith("SPEFT_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_settings_defaults_match_design(clean_env: pytest.MonkeyPatch) -> None:
    settings = Settings()
    assert settings.database_url == "sqlite:///./var/speft.db"
    assert settings.broker_url is None and settings.embedded_broker
    assert settings.storage_url == "file://./var/storage"
    assert settings.s3_endpoint_url is None
    assert settings.api_keys == "" and settings.api_key_tenants == {} and settings.open_mode
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.max_upload_bytes == 100 * 1024 * 1024
    assert settings.max_file_lines == 1_000_000
    assert settings.default_tenant == "default" and settings.default_device == "cpu"
    assert settings.queue_for("cuda") == "cuda"
    assert settings.models_dir is None


def test_settings_parse_api_keys_from_env(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("SPEFT_API_KEYS", "key1:tenantA, key2:tenantB")
    clean_env.setenv("SPEFT_BROKER_URL", "redis://127.0.0.1:6379/0")
    settings = Settings()
    assert settings.api_key_tenants == {"key1": "tenantA", "key2": "tenantB"}
    assert not settings.open_mode and not settings.embedded_broker


@pytest.mark.parametrize("value", ["key1", "key1:tenantA,key2", ":tenantA", "key1:",
                                   "key1:tenantA,key1:tenantB", "key1:bad tenant", ",,,",
                                   "key1:tenantA,", "k1:a;k2:b", "k:ey:tenantA",
                                   "key 1:tenantA", "key1:" + "t" * 65])
def test_settings_reject_malformed_api_keys(clean_env: pytest.MonkeyPatch, value: str) -> None:
    clean_env.setenv("SPEFT_API_KEYS", value)
    with pytest.raises(ValidationError, match="SPEFT_API_KEYS"):
        Settings()


@pytest.mark.parametrize(("env", "value"), [
    ("SPEFT_DATABASE_URL", "mysql://localhost/db"),
    ("SPEFT_STORAGE_URL", "ftp://host/x"),
    ("SPEFT_PORT", "70000"),
    ("SPEFT_MAX_UPLOAD_BYTES", "0"),
])
def test_settings_errors_name_the_variable(
    clean_env: pytest.MonkeyPatch, env: str, value: str
) -> None:
    clean_env.setenv(env, value)
    with pytest.raises(ValidationError, match=env):
        Settings()


def test_process_engine_follows_settings_and_is_disposable(
    clean_env: pytest.MonkeyPatch, sqlite_url: str
) -> None:
    clean_env.setenv("SPEFT_DATABASE_URL", sqlite_url)
    get_settings.cache_clear()
    try:
        assert get_settings() is get_settings()
        engine = db_module.get_engine()
        assert str(engine.url) == sqlite_url and db_module.get_engine() is engine
        assert db_module.get_session_factory().kw["bind"] is engine
        db_module.dispose_engine()
        assert db_module.get_engine() is not engine
    finally:
        db_module.dispose_engine(close=True)
        get_settings.cache_clear()


def _open_fresh_sqlite(path: str, barrier, results) -> None:  # runs in a forked process
    from sqlalchemy import text

    from api.core.db import make_engine

    barrier.wait()
    try:
        with make_engine(f"sqlite:///{path}").connect() as connection:
            connection.execute(text("select 1"))
        results.put(None)
    except Exception as err:  # noqa: BLE001 — reported to the parent
        results.put(repr(err))


def test_processes_opening_a_new_sqlite_file_together_all_connect(tmp_path):
    """The WAL switch races on a new file (API + worker start together); no one may fail."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    errors = []
    for round_ in range(10):
        barrier, results = context.Barrier(8), context.Queue()
        path = str(tmp_path / f"race-{round_}.db")
        procs = [context.Process(target=_open_fresh_sqlite, args=(path, barrier, results))
                 for _ in range(8)]
        for proc in procs:
            proc.start()
        errors += [r for r in (results.get(timeout=60) for _ in procs) if r is not None]
        for proc in procs:
            proc.join(timeout=60)
    assert errors == []
