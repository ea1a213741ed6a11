"""`/v1/fine_tuning/jobs` schemas: the create body, the job, its events and metrics.

The fine-tuning method and hyperparameters are the core's own dataclasses (`SpeftConfig`,
`TrainConfig`), so their defaults, bounds and checks have one source of truth; pydantic
validates their types and runs their checks, and the error handler names the failing field.
The job's public fields derived from its stored body (task, device, method, …) are properties
of the ORM `Job`, so `JobObject.model_validate(job)` reads them like columns.
"""
from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    Field,
    StringConstraints,
    ValidationInfo,
    computed_field,
    field_validator,
    model_validator,
)

from api.core.config import Device
from api.core.models import ACTIVE_STATUSES
from api.schemas.common import (
    PublicModel,
    StrictModel,
    TaskName,
    UnixTime,
    documented,
    int_range,
    number_range,
)
from speft_core.config import (
    DTYPES,
    MASK_KINDS,
    MAX_BATCH_SIZE,
    MAX_CHECKPOINTS,
    MAX_EPOCHS,
    MAX_LENGTH,
    MAX_SCORING_EXAMPLES,
    SCOPES,
    SCORE_NORMALIZATIONS,
    SELECTIONS,
    SPREAD_LINES,
    JobSpec,
    SpeftConfig,
    TrainConfig,
)
from speft_core.progress import PHASES, TRAINING
from speft_core.salience import METRICS

# OpenAI's limits: a suffix of up to 64 characters; metadata of up to 16 pairs, keys of up to
# 64 characters and values of up to 512.
MAX_SUFFIX_LENGTH = 64
MAX_METADATA_KEYS = 16
MAX_METADATA_KEY_LENGTH = 64
MAX_METADATA_VALUE_LENGTH = 512
MetadataKey = Annotated[str, StringConstraints(max_length=MAX_METADATA_KEY_LENGTH)]
MetadataValue = Annotated[str, StringConstraints(max_length=MAX_METADATA_VALUE_LENGTH)]

# -- the core's settings, documented with the bounds their own checks enforce ----------------
_LEARNING_RATE = number_range(0.0, 10.0, low_open=True)
_AUTO = {"type": "string", "const": "auto"}
SpeftSettings = documented(SpeftConfig, {
    "metric": {"type": "string", "enum": sorted(METRICS)},
    "density": {"anyOf": [number_range(0.0, 1.0, low_open=True),
                          {"type": "integer", "minimum": 2}]},
    "mask": {"type": "string", "enum": [*MASK_KINDS, "auto"]},
    "scope": {"type": "string", "enum": list(SCOPES)},
    "target_modules": {"anyOf": [{"type": "array", "minItems": 1,
                                  "items": {"type": "string", "minLength": 1}},
                                 {"type": "null"}]},
    "scoring_examples": int_range(1, MAX_SCORING_EXAMPLES),
    "scoring_batch_size": {"anyOf": [int_range(1, MAX_BATCH_SIZE), {"type": "null"}]},
    "update_interval": {"anyOf": [int_range(0, 10**9), _AUTO]},
    "update_fraction": number_range(0.0, 1.0, low_open=True),
    "score_normalization": {"type": "string", "enum": list(SCORE_NORMALIZATIONS)},
    "module_floor": number_range(0.0, 1.0),
    "explore_fraction": {"type": "number", "minimum": 0.0, "exclusiveMaximum": 1.0},
    "scoring_holdout": {"type": "number", "minimum": 0.0, "maximum": 0.5},
    "spread_cap": {"anyOf": [{"const": 0}, number_range(1.0, 1000.0), _AUTO]},
    "spread_lines": {"type": "string", "enum": list(SPREAD_LINES)},
    "head_warmup_steps": int_range(0, 100_000),
}, extra={"allOf": [
    # a dynamic mask asked for by name is re-selected: update_interval 'auto' or at least 1
    {"if": {"properties": {"mask": {"const": "dynamic"}}, "required": ["mask"]},
     "then": {"properties": {"update_interval": {"not": {"const": 0}}}}},
    # an explicit cap (a number above 0) leaves no room for a module floor
    {"if": {"properties": {"spread_cap": {"type": "number", "exclusiveMinimum": 0}},
            "required": ["spread_cap"]},
     "then": {"properties": {"module_floor": {"const": 0}}}},
]})
TrainSettings = documented(TrainConfig, {
    "n_epochs": {"anyOf": [int_range(1, MAX_EPOCHS), _AUTO]},
    "batch_size": {"anyOf": [int_range(1, MAX_BATCH_SIZE), _AUTO]},
    "learning_rate": {"anyOf": [_LEARNING_RATE, _AUTO]},
    "max_length": {"anyOf": [int_range(2, MAX_LENGTH), _AUTO]},
    "seed": int_range(0, 2**32 - 1),
    "warmup_ratio": number_range(0.0, 1.0),
    "weight_decay": number_range(0.0, 10.0),
    "max_grad_norm": number_range(0.0, 1e6),
    "gradient_accumulation_steps": int_range(1, 1024),
    "head_learning_rate": {"anyOf": [_LEARNING_RATE, {"type": "null"}]},
    "dtype": {"type": "string", "enum": list(DTYPES)},
    "n_checkpoints": {"anyOf": [int_range(1, MAX_CHECKPOINTS), {"type": "null"}]},
    "checkpoint_every_steps": {"anyOf": [int_range(1, 10**9), {"type": "null"}]},
    "keep_checkpoints": {"anyOf": [int_range(1, MAX_CHECKPOINTS), {"type": "null"}]},
    "select": {"type": "string", "enum": list(SELECTIONS)},
    "early_stopping": {"anyOf": [{"type": "object", "additionalProperties": False,
                                  "properties": {"patience": int_range(1, MAX_CHECKPOINTS),
                                                 "min_delta": number_range(0.0, 1e6)}},
                                 {"type": "null"}]},
}, extra={"not": {"required": ["n_checkpoints", "checkpoint_every_steps"],
                  "properties": {"n_checkpoints": {"type": "integer"},
                                 "checkpoint_every_steps": {"type": "integer"}}}})


# -- the create body -------------------------------------------------------------------------
class SpeftMethod(StrictModel):
    """`method`: the fine-tuning method and its settings."""

    type: Literal["speft"] = "speft"
    speft: SpeftSettings = Field(default_factory=SpeftConfig)


class JobCreate(StrictModel):
    """POST /v1/fine_tuning/jobs body."""

    model: str = Field(min_length=1, max_length=256)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(default=None, min_length=1, max_length=64)
    task: TaskName | None = None  # None: the base model's own task
    device: Device | None = None  # where it trains (its queue); None: SPEFT_DEFAULT_DEVICE
    method: SpeftMethod = Field(default_factory=SpeftMethod)
    hyperparameters: TrainSettings = Field(default_factory=TrainConfig)
    suffix: str | None = Field(default=None, max_length=MAX_SUFFIX_LENGTH,
                               pattern=r"^[A-Za-z0-9._-]+$")
    metadata: dict[MetadataKey, MetadataValue] = Field(
        default_factory=dict, max_length=MAX_METADATA_KEYS,
        description=f"Up to {MAX_METADATA_KEYS} pairs; keys of up to {MAX_METADATA_KEY_LENGTH} "
                    f"characters, values of up to {MAX_METADATA_VALUE_LENGTH}")

    def to_spec(self, *, task: str, training_file: str, validation_file: str | None) -> JobSpec:
        """The core job spec, with files resolved to local paths by the caller."""
        return JobSpec(model=self.model, task=task, training_file=training_file,
                       validation_file=validation_file, speft=self.method.speft,
                       hyperparameters=self.hyperparameters, suffix=self.suffix,
                       metadata=dict(self.metadata))

    def stored_body(self, task: str, device: str) -> dict[str, Any]:
        """The body as stored on the job (defaults filled in, task and device resolved)."""
        body = self.model_dump(mode="json")
        body["task"] = task
        body["device"] = device
        return body


# -- the job and what it reports -------------------------------------------------------------
class JobError(PublicModel):
    """Why a job failed: `user_error` (data or spec) or `internal_error`."""

    code: str
    message: str
    param: str | None = None


class JobProgress(PublicModel):
    """Optimizer steps done and planned, and what the running attempt is doing now."""

    step: int = 0
    total_steps: int | None = Field(
        default=None, description="the run's optimizer steps, known once its data is read "
        "(before the base evaluation and salience scoring)")
    phase: Literal[PHASES] | None = Field(  # type: ignore[valid-type]
        default=None, description="what the running attempt is doing; null unless the job is "
        "running (or stopping)")
    phase_step: int = Field(0, description="how far the phase is: examples evaluated "
                            "(evaluating_base, evaluating) or scored (scoring_salience, each "
                            "pass), steps (head_warmup, training: the optimizer steps)")
    phase_total: int | None = Field(None, description="what the phase has in all; null for "
                                    "loading, checkpointing and saving")
    phase_estimated_finish: UnixTime | None = Field(
        default=None, description="when the phase should end, from its measured rate; never in "
        "the past, null when unknown or `stale`")
    heartbeat_at: UnixTime | None = Field(None, description="when the job's worker was last "
                                          "heard from")
    stale: bool = Field(False, description="the running job's worker has not been heard from "
                        "for SPEFT_HEARTBEAT_TIMEOUT_S: it may have died (the reconciler then "
                        "re-queues or fails the job); the estimates are null meanwhile")


STALE_AFTER_S = "stale_after_s"  # the validation context key of JobObject.shown


class JobObject(PublicModel):
    """A fine-tuning job."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    model: str
    status: str
    created_at: UnixTime
    started_at: UnixTime | None = None
    finished_at: UnixTime | None = None
    training_file: str
    validation_file: str | None = None
    task: TaskName
    device: Device = "cpu"
    method: dict[str, Any]
    hyperparameters: dict[str, Any]
    trainable_params: int | None = None
    adapter_id: str | None = None
    trained_tokens: int = Field(0, description="tokens trained on so far (non-padding, every "
                                "step's batches; a resumed job counts those before the pause)")
    estimated_finish: UnixTime | None = Field(
        default=None, description="when the running job should finish, from its measured step "
        "rate (median of recent steps); never in the past; null before two steps, once it has "
        "stopped, and while its worker is not heard from (`progress.stale`)")
    result_step: int | None = Field(
        default=None, description="the step the adapter's delta was taken at: the best "
        "checkpoint's (hyperparameters.select 'best', with a validation file) or the last")
    error: JobError | None = None
    progress: JobProgress = Field(default_factory=JobProgress)
    suffix: str | None = None
    # read from `Job.spec_metadata` (an ORM class's `metadata` is SQLAlchemy's own)
    metadata: dict[str, str] = Field(default_factory=dict,
                                     validation_alias=AliasChoices("spec_metadata", "metadata"))
    # OpenAI's job fields, so that its SDK reads a job unchanged
    organization_id: str = Field(validation_alias=AliasChoices("tenant_id", "organization_id"),
                                 description="The owning tenant")
    result_files: list[str] = Field(
        default_factory=list, description="once the job succeeded, the id of its per-step "
        "metrics CSV (purpose fine-tune-results; GET /v1/files/{id}/content)")

    @classmethod
    def shown(cls, job: Any, *, stale_after_s: float | None = None) -> JobObject:
        """The job as a reader sees it now; a running job whose worker was last heard from more
        than `stale_after_s` ago is `progress.stale` (None: never)."""
        return cls.model_validate(job, context={STALE_AFTER_S: stale_after_s})

    @model_validator(mode="after")
    def _as_of_now(self, info: ValidationInfo) -> JobObject:
        """A phase only while a worker runs the job (the training phase's progress is the
        step's); estimates only while it is heard from, and never in the past."""
        progress, now = self.progress, int(time.time())
        active = self.status in ACTIVE_STATUSES
        if progress.phase == TRAINING:
            progress.phase_step, progress.phase_total = progress.step, progress.total_steps
            progress.phase_estimated_finish = self.estimated_finish
        if not active:
            progress.phase, progress.phase_step, progress.phase_total = None, 0, None
        stale_after_s = (info.context or {}).get(STALE_AFTER_S)
        if stale_after_s is not None:
            heard = progress.heartbeat_at
            progress.stale = heard is None or now - heard > stale_after_s
        progress.stale = active and progress.stale
        live = active and not progress.stale
        self.estimated_finish = _not_before(now, self.estimated_finish) if live else None
        progress.phase_estimated_finish = (_not_before(now, progress.phase_estimated_finish)
                                           if live else None)
        return self

    @computed_field  # type: ignore[prop-decorator]
    @property
    def fine_tuned_model(self) -> str | None:
        """The adapter id once the job succeeded (usable as `model` in inference), else null."""
        return self.adapter_id

    @computed_field  # type: ignore[prop-decorator]
    @property
    def seed(self) -> int | None:
        """The training seed (`hyperparameters.seed`)."""
        seed = self.hyperparameters.get("seed")
        return seed if isinstance(seed, int) else None


def _not_before(now: int, estimate: int | None) -> int | None:
    """An estimated time, moved up to now once it has passed (the run is late)."""
    return None if estimate is None else max(now, estimate)


class JobList(BaseModel):
    """A page of jobs, newest first; pass the last id as `after` for the next page."""

    object: Literal["list"] = "list"
    data: list[JobObject]
    has_more: bool


class JobEvent(PublicModel):
    """Something that happened to a job."""

    id: str = Field(description="ftevent-<number>, in the order the events happened")
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    level: Literal["info", "warning", "error"]
    type: str
    message: str
    data: dict[str, Any] | None = None
    created_at: UnixTime

    @field_validator("id", mode="before")
    @classmethod
    def _event_id(cls, value: Any) -> Any:
        return f"ftevent-{value}" if isinstance(value, int) else value


class JobEventList(BaseModel):
    """A job's events, oldest first (all of them: `has_more` is always false)."""

    object: Literal["list"] = "list"
    data: list[JobEvent]
    has_more: bool = False


class JobMetric(BaseModel):
    """One step report (train_loss, lr, grad_norm) or one evaluation (eval_*)."""

    step: int
    train_loss: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    eval_loss: float | None = None
    eval_accuracy: float | None = None


class JobMetricList(BaseModel):
    """A job's metrics, by step."""

    object: Literal["list"] = "list"
    data: list[JobMetric]
