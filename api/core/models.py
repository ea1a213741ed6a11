"""The service's tables as SQLAlchemy 2 typed declarative models.

Schema decisions (the migrations in `migrations/versions/` create exactly this):
- Ids are strings with an OpenAI-style prefix made in Python (`file-…`, `ftjob-…`, `adapter-…`);
  base models use their public name (`minilm-l6`) as id; events and metrics use integers.
- Timestamps are timezone-aware UTC on both databases (`UTCDateTime`); rows are soft-deleted
  (`deleted_at`) where the API has DELETE, so job → file/adapter links never dangle; `purged_at`
  records when a deleted row's stored bytes were removed (after the commit, or by the sweep).
- Job status is a `JobStatus` value in a VARCHAR (no CHECK: a new status needs no migration;
  unknown strings are refused on flush); it changes through `api.services.jobs.transition_job`,
  one conditional UPDATE, so two workers cannot both claim one job.
- The base-model class is `RegisteredModel` (table `base_models`), not to shadow pydantic's name.
- `job_metrics` holds one row per reported training step (`kind="train"`: train_loss, lr,
  grad_norm) and one per evaluation (`kind="eval"`: eval_loss, eval_accuracy), unique on
  (job_id, kind, step): a retried attempt deletes or upserts its rows; a duplicate is refused
  rather than doubling a curve.
- `adapters.job_id` is unique (one adapter per job, also under task redelivery);
  `jobs.adapter_id` is a plain copy for reading, without a circular foreign key.
- API keys are stored as sha256 hex (`hash_api_key`) plus a short display prefix, never in clear.
"""
from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

ID_LENGTH = 64
API_KEY_PREFIX_LENGTH = 8

# Named constraints: Alembic (and SQLite batch migrations) can address every one of them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class JobStatus(StrEnum):
    """A job's status; the only place status names are spelled."""

    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    CANCEL_REQUESTED = "cancel_requested"
    PAUSE_REQUESTED = "pause_requested"
    PAUSED = "paused"

    @property
    def is_terminal(self) -> bool:
        """True for succeeded, failed and cancelled: the job will not change again."""
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES: frozenset[JobStatus] = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}
)
# A worker is running the job (or stopping it): it heart-beats, reports progress and phases.
ACTIVE_STATUSES: frozenset[JobStatus] = frozenset(
    {JobStatus.RUNNING, JobStatus.CANCEL_REQUESTED, JobStatus.PAUSE_REQUESTED}
)


class MetricKind(StrEnum):
    """What a `job_metrics` row reports: a training step or an evaluation."""

    TRAIN = "train"
    EVAL = "eval"


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """A fresh public id such as `ftjob-3f2a…` (prefix, dash, 24 hex digits)."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def hash_api_key(key: str) -> str:
    """The sha256 hex digest under which an API key is stored and looked up."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def api_key_prefix(key: str) -> str:
    """The first characters of an API key, kept for display."""
    return key[:API_KEY_PREFIX_LENGTH]


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite stores it naive, in UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given for a UTC column; use api.core.models.utcnow()")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# JSON on SQLite, JSONB on Postgres (comparable, indexable); both read back as Python objects.
JSONValue = JSON().with_variant(JSONB(), "postgresql")
# A 64-bit autoincrement key that is still SQLite's rowid alias.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    """Declarative base; its metadata is what Alembic migrates to."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime(), dict[str, Any]: JSONValue}


def _string_enum(enum: type[StrEnum], *, length: int) -> Enum:
    """A VARCHAR holding the enum's values; unknown strings are refused before reaching SQL."""
    return Enum(
        enum,
        native_enum=False,
        create_constraint=False,  # the set of values lives in Python: a new one needs no migration
        length=length,
        validate_strings=True,
        values_callable=lambda members: [member.value for member in members],
    )


def _id(prefix: str) -> Any:
    return mapped_column(String(ID_LENGTH), primary_key=True, default=lambda: new_id(prefix))


def _created_at() -> Any:
    return mapped_column(default=utcnow)


def _tenant_fk() -> Any:
    return mapped_column(String(ID_LENGTH), ForeignKey("tenants.id"))


class Tenant(Base):
    """An isolated customer: every file, job and adapter belongs to exactly one."""

    __tablename__ = "tenants"

    id: Mapped[str] = _id("tenant")
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = _created_at()

    api_keys: Mapped[list[ApiKey]] = relationship(back_populates="tenant")


class ApiKey(Base):
    """A tenant's API key, stored as its sha256 (`hash_api_key`) and a display prefix."""

    __tablename__ = "api_keys"

    id: Mapped[str] = _id("key")
    tenant_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(API_KEY_PREFIX_LENGTH))
    created_at: Mapped[datetime] = _created_at()
    # Set by `speft keys revoke`: refused for good, also while configured in SPEFT_API_KEYS.
    revoked_at: Mapped[datetime | None]
    # A configured key (SPEFT_API_KEYS) missing from the configuration of the last start:
    # refused while missing, usable again once configured again. Always NULL for created keys.
    unconfigured_at: Mapped[datetime | None]

    tenant: Mapped[Tenant] = relationship(back_populates="api_keys")


class File(Base):
    """An uploaded JSONL dataset (purpose `fine-tune`), validated on upload."""

    __tablename__ = "files"
    __table_args__ = (Index(None, "tenant_id", "created_at", "id"),)

    id: Mapped[str] = _id("file")
    tenant_id: Mapped[str] = _tenant_fk()
    filename: Mapped[str] = mapped_column(Text)
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(Text)
    num_examples: Mapped[int]
    task: Mapped[str | None] = mapped_column(String(32))  # detected format: classification/causal_lm
    # a classification file's distinct labels (speft_core.data.label_set); None for other
    # tasks and for files uploaded before labels were recorded
    labels: Mapped[list[str] | None] = mapped_column(JSONValue)
    created_at: Mapped[datetime] = _created_at()
    deleted_at: Mapped[datetime | None]
    purged_at: Mapped[datetime | None]  # when the deleted row's stored bytes were removed


class RegisteredModel(Base):
    """A registered base model (table `base_models`), shared by all tenants; `id` is its public name."""

    __tablename__ = "base_models"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    task: Mapped[str] = mapped_column(String(32))
    params: Mapped[int] = mapped_column(BigInteger)
    storage_key: Mapped[str | None] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64))  # of the archive at storage_key
    local_path: Mapped[str | None] = mapped_column(Text)
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    # what `hyperparameters.dtype: "auto"` trains in and what serving loads: 'auto' = the checkpoint's
    dtype: Mapped[str] = mapped_column(String(16), default="auto", server_default="auto")
    created_at: Mapped[datetime] = _created_at()


class Job(Base):
    """A fine-tuning job; `spec` is the full job body, status changes via `transition_job`."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index(None, "tenant_id", "created_at", "id"),  # cursor pagination, newest first
        UniqueConstraint("tenant_id", "idempotency_key"),
    )

    id: Mapped[str] = _id("ftjob")
    tenant_id: Mapped[str] = _tenant_fk()
    model: Mapped[str] = mapped_column(String(128), ForeignKey("base_models.id"))
    status: Mapped[JobStatus] = mapped_column(_string_enum(JobStatus, length=32), index=True)
    spec: Mapped[dict[str, Any]]
    training_file: Mapped[str] = mapped_column(String(ID_LENGTH), ForeignKey("files.id"))
    validation_file: Mapped[str | None] = mapped_column(String(ID_LENGTH), ForeignKey("files.id"))
    created_at: Mapped[datetime] = _created_at()
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    enqueued_at: Mapped[datetime | None]  # when its message was last sent (reconciler: resend)
    attempts: Mapped[int] = mapped_column(default=0)
    worker: Mapped[str | None] = mapped_column(String(255))
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    error_param: Mapped[str | None] = mapped_column(String(255))
    progress_step: Mapped[int] = mapped_column(default=0)
    progress_total: Mapped[int | None]
    trainable_params: Mapped[int | None] = mapped_column(BigInteger)
    adapter_id: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    result_step: Mapped[int | None]  # the step the adapter's delta was taken at
    result_file: Mapped[str | None] = mapped_column(String(ID_LENGTH))  # per-step metrics CSV
    trained_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    estimated_finish: Mapped[datetime | None]  # from this attempt's measured step rate
    # the phase the attempt is in (speft_core.progress.PHASES) and its own progress and estimate
    progress_phase: Mapped[str | None] = mapped_column(String(32))
    phase_step: Mapped[int] = mapped_column(default=0, server_default="0")
    phase_total: Mapped[int | None]
    phase_estimated_finish: Mapped[datetime | None]
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))

    events: Mapped[list[JobEvent]] = relationship(order_by="JobEvent.id", viewonly=True)
    metrics: Mapped[list[JobMetric]] = relationship(order_by="JobMetric.id", viewonly=True)

    # Public fields derived from the stored body and the columns (read by the Job schema).
    @property
    def task(self) -> str:
        """The task the job trains for (resolved and stored at creation)."""
        return self.spec.get("task", "classification")

    @property
    def device(self) -> str:
        """The device kind the job trains on, also its queue (jobs stored before devices existed
        ran on the CPU)."""
        return self.spec.get("device", "cpu")

    @property
    def method(self) -> dict[str, Any]:
        """The stored `method` body."""
        return self.spec.get("method", {})

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """The stored `hyperparameters` body."""
        return self.spec.get("hyperparameters", {})

    @property
    def suffix(self) -> str | None:
        """The stored `suffix`."""
        return self.spec.get("suffix")

    @property
    def spec_metadata(self) -> dict[str, str]:
        """The stored `metadata` body (`metadata` itself is SQLAlchemy's)."""
        return self.spec.get("metadata") or {}

    @property
    def error(self) -> dict[str, Any] | None:
        """Why the job failed (code, message, param); None unless it failed with a code."""
        if self.status != JobStatus.FAILED or not self.error_code:
            return None
        return {"code": self.error_code, "message": self.error_message or "",
                "param": self.error_param}

    @property
    def result_files(self) -> list[str]:
        """The file ids of the job's results (its per-step metrics CSV, once it succeeded)."""
        return [self.result_file] if self.result_file else []

    @property
    def progress(self) -> dict[str, Any]:
        """Optimizer steps done and planned, the phase with its own progress and estimate, and
        when the worker was last heard from (the Job schema decides what a reader is shown)."""
        return {"step": self.progress_step, "total_steps": self.progress_total,
                "phase": self.progress_phase, "phase_step": self.phase_step,
                "phase_total": self.phase_total,
                "phase_estimated_finish": self.phase_estimated_finish,
                "heartbeat_at": self.heartbeat_at}


class JobEvent(Base):
    """One line of a job's event log (`GET …/jobs/{id}/events`), ordered by `id`."""

    __tablename__ = "job_events"
    __table_args__ = (Index(None, "job_id", "id"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(ID_LENGTH), ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = _created_at()
    level: Mapped[str] = mapped_column(String(16), default="info")
    type: Mapped[str] = mapped_column(String(64), default="message")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None]


class JobMetric(Base):
    """One training-step report (`kind="train"`) or one evaluation (`kind="eval"`) of a job."""

    __tablename__ = "job_metrics"
    __table_args__ = (UniqueConstraint("job_id", "kind", "step"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(ID_LENGTH), ForeignKey("jobs.id", ondelete="CASCADE"))
    kind: Mapped[MetricKind] = mapped_column(
        _string_enum(MetricKind, length=16), default=MetricKind.TRAIN
    )
    step: Mapped[int]
    train_loss: Mapped[float | None] = mapped_column(Float)
    lr: Mapped[float | None] = mapped_column(Float)
    grad_norm: Mapped[float | None] = mapped_column(Float)
    eval_loss: Mapped[float | None] = mapped_column(Float)
    eval_accuracy: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = _created_at()


class Checkpoint(Base):
    """A job's delta at one step (`ftckpt-…`), servable and downloadable like an adapter; the
    `.safetensors` bytes are at `storage_key`, the training state the job resumes from beside
    them (`state_key_for`)."""

    __tablename__ = "checkpoints"
    # One live checkpoint per step: a deleted one (a pruned or user-deleted row, kept for its
    # purge) must not stop a resumed job from saving that step again.
    __table_args__ = (
        Index("uq_checkpoints_job_id_step_live", "job_id", "step", unique=True,
              postgresql_where=text("deleted_at IS NULL"), sqlite_where=text("deleted_at IS NULL")),
        Index(None, "tenant_id", "job_id"),
    )

    id: Mapped[str] = _id("ftckpt")
    tenant_id: Mapped[str] = _tenant_fk()
    job_id: Mapped[str] = mapped_column(String(ID_LENGTH), ForeignKey("jobs.id"))
    base_model: Mapped[str] = mapped_column(String(128), ForeignKey("base_models.id"))
    step: Mapped[int]
    attempt: Mapped[int]
    metrics: Mapped[dict[str, Any]]
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()
    deleted_at: Mapped[datetime | None]
    purged_at: Mapped[datetime | None]

    @staticmethod
    def state_key_for(storage_key: str) -> str:
        """Where the training state of the checkpoint whose delta is at `storage_key` lives."""
        return storage_key.removesuffix(".safetensors") + ".state"

    @staticmethod
    def companion_keys(storage_key: str) -> list[str]:
        """Objects deleted with the delta: the training state."""
        return [Checkpoint.state_key_for(storage_key)]


class WebhookEndpoint(Base):
    """A tenant's webhook receiver (`whep-…`): the events it wants and the secret they are
    signed with (Standard Webhooks, `whsec_` + base64 key; shown once, at creation)."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (Index(None, "tenant_id", "created_at", "id"),)

    id: Mapped[str] = _id("whep")
    tenant_id: Mapped[str] = _tenant_fk()
    url: Mapped[str] = mapped_column(Text)
    secret: Mapped[str] = mapped_column(String(128))
    events: Mapped[list[Any]] = mapped_column(JSONValue)
    created_at: Mapped[datetime] = _created_at()
    deleted_at: Mapped[datetime | None]


class WebhookDelivery(Base):
    """One event for one endpoint (`msg-…`, its `webhook-id`): pending until delivered or
    given up; `sent_at` is when its delivery task was last sent to the queue."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index(None, "endpoint_id", "created_at"), Index(None, "status", "sent_at"))

    id: Mapped[str] = _id("msg")
    endpoint_id: Mapped[str] = mapped_column(String(ID_LENGTH),
                                             ForeignKey("webhook_endpoints.id"))
    job_id: Mapped[str | None] = mapped_column(String(ID_LENGTH), ForeignKey("jobs.id"))
    event_type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = _created_at()
    sent_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    tries: Mapped[list[WebhookAttempt]] = relationship(order_by="WebhookAttempt.id",
                                                       viewonly=True)


class WebhookAttempt(Base):
    """One POST of a delivery: the answer's status code, or why there was none."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (Index(None, "delivery_id", "id"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(String(ID_LENGTH),
                                             ForeignKey("webhook_deliveries.id"))
    number: Mapped[int]
    created_at: Mapped[datetime] = _created_at()
    status_code: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[float] = mapped_column(Float)


class Adapter(Base):
    """A trained sparse delta: metadata here, the `.safetensors` bytes in storage."""

    __tablename__ = "adapters"
    __table_args__ = (Index(None, "tenant_id", "created_at", "id"),)

    id: Mapped[str] = _id("adapter")
    tenant_id: Mapped[str] = _tenant_fk()
    job_id: Mapped[str] = mapped_column(String(ID_LENGTH), ForeignKey("jobs.id"), unique=True)
    base_model: Mapped[str] = mapped_column(String(128), ForeignKey("base_models.id"))
    nnz: Mapped[int] = mapped_column(BigInteger)
    density: Mapped[float] = mapped_column(Float)
    metric: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(Text)
    eval: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = _created_at()
    deleted_at: Mapped[datetime | None]
    purged_at: Mapped[datetime | None]  # when the deleted row's stored bytes were removed

    job: Mapped[Job] = relationship()

