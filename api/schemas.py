"""Request and response models: the OpenAPI contract of DESIGN.md §3.

The fine-tuning method and hyperparameters are the core's own dataclasses (`SpeftConfig`,
`TrainConfig`), so their defaults, bounds and checks have one source of truth; pydantic
validates their types and runs their checks, and the error handler names the failing field.
"""
from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, WithJsonSchema

from api.core.config import Device
from api.errors import ErrorDetail, InvalidRequest
from speft_core.config import (
    MASK_KINDS,
    MAX_BATCH_SIZE,
    MAX_EPOCHS,
    MAX_LENGTH,
    MAX_SCORING_EXAMPLES,
    SCOPES,
    JobSpec,
    SpeftConfig,
    TrainConfig,
)
from speft_core.salience import METRICS

TaskName = Literal["classification", "causal_lm"]  # = speft_core.config.TASKS (tested)

MAX_SUFFIX_LENGTH = 64
MAX_METADATA_KEYS = 16


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- the core's settings, documented with the bounds their own checks enforce ----------------
def _ints(low: int, high: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": low, "maximum": high}


def _numbers(low: float, high: float, *, low_open: bool = False) -> dict[str, Any]:
    return {"type": "number", "exclusiveMinimum" if low_open else "minimum": low, "maximum": high}


def _documented(config: type, bounds: dict[str, dict[str, Any]],
                extra: dict[str, Any] | None = None) -> Any:
    """`config` (a core dataclass, validated by its own checks) with a JSON schema that also
    states those checks' bounds and each field's help text: the OpenAPI contract is exact, so a
    request the schema allows is never refused as invalid (tests/api/test_fuzz.py holds both to
    that)."""
    schema = TypeAdapter(config).json_schema()
    for item in dataclasses.fields(config):
        field_schema = schema["properties"][item.name]
        if "help" in item.metadata:
            field_schema["description"] = item.metadata["help"]
        if item.name in bounds:
            field_schema.pop("anyOf", None)
            field_schema.pop("type", None)
            field_schema.update(bounds[item.name])
    return Annotated[config, WithJsonSchema({**schema, **(extra or {})})]


_LEARNING_RATE = _numbers(0.0, 10.0, low_open=True)
SpeftSettings = _documented(SpeftConfig, {
    "metric": {"type": "string", "enum": sorted(METRICS)},
    "density": {"anyOf": [_numbers(0.0, 1.0, low_open=True), {"type": "integer", "minimum": 2}]},
    "mask": {"type": "string", "enum": list(MASK_KINDS)},
    "scope": {"type": "string", "enum": list(SCOPES)},
    "target_modules": {"anyOf": [{"type": "array", "minItems": 1,
                                  "items": {"type": "string", "minLength": 1}},
                                 {"type": "null"}]},
    "scoring_examples": _ints(1, MAX_SCORING_EXAMPLES),
    "update_interval": _ints(0, 10**9),
    "update_fraction": _numbers(0.0, 1.0, low_open=True),
}, extra={"if": {"properties": {"mask": {"const": "dynamic"}}, "required": ["mask"]},
          "then": {"properties": {"update_interval": {"minimum": 1}},
                   "required": ["update_interval"]}})
TrainSettings = _documented(TrainConfig, {
    "n_epochs": _ints(1, MAX_EPOCHS),
    "batch_size": _ints(1, MAX_BATCH_SIZE),
    "learning_rate": _LEARNING_RATE,
    "max_length": _ints(2, MAX_LENGTH),
    "seed": _ints(0, 2**32 - 1),
    "warmup_ratio": _numbers(0.0, 1.0),
    "weight_decay": _numbers(0.0, 10.0),
    "max_grad_norm": _numbers(0.0, 1e6),
    "gradient_accumulation_steps": _ints(1, 1024),
    "head_learning_rate": {"anyOf": [_LEARNING_RATE, {"type": "null"}]},
})


# -- files and models ------------------------------------------------------------------------
class FileObject(BaseModel):
    """An uploaded dataset."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    filename: str
    purpose: str
    created_at: int
    sha256: str
    num_examples: int | None = None
    task: TaskName | None = None


class FileList(BaseModel):
    """A page of files."""

    object: Literal["list"] = "list"
    data: list[FileObject]


class FileDeleted(BaseModel):
    """DELETE /v1/files/{id} answer."""

    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class ModelObject(BaseModel):
    """A registered base model."""

    id: str
    object: Literal["model"] = "model"
    task: TaskName
    params: int | None = None
    created_at: int


class ModelList(BaseModel):
    """All base models."""

    object: Literal["list"] = "list"
    data: list[ModelObject]


# -- fine-tuning jobs ------------------------------------------------------------------------
class SpeftMethod(_Strict):
    """`method`: the fine-tuning method and its settings."""

    type: Literal["speft"] = "speft"
    speft: SpeftSettings = Field(default_factory=SpeftConfig)


class JobCreate(_Strict):
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
    metadata: dict[str, str] = Field(default_factory=dict, max_length=MAX_METADATA_KEYS)

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


class JobError(BaseModel):
    """Why a job failed: `user_error` (data or spec) or `internal_error`."""

    code: str
    message: str
    param: str | None = None


class JobProgress(BaseModel):
    """Optimizer steps done and planned."""

    step: int = 0
    total_steps: int | None = None


class JobObject(BaseModel):
    """A fine-tuning job."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    model: str
    status: str
    created_at: int
    started_at: int | None = None
    finished_at: int | None = None
    training_file: str
    validation_file: str | None = None
    task: TaskName
    device: Device = "cpu"
    method: dict[str, Any]
    hyperparameters: dict[str, Any]
    trainable_params: int | None = None
    adapter_id: str | None = None
    error: JobError | None = None
    progress: JobProgress = Field(default_factory=JobProgress)
    suffix: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)


class JobList(BaseModel):
    """A page of jobs, newest first; pass the last id as `after` for the next page."""

    object: Literal["list"] = "list"
    data: list[JobObject]
    has_more: bool


class JobEvent(BaseModel):
    """Something that happened to a job."""

    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    level: Literal["info", "warning", "error"]
    type: str
    message: str
    data: dict[str, Any] | None = None
    created_at: int


class JobEventList(BaseModel):
    """A job's events, oldest first."""

    object: Literal["list"] = "list"
    data: list[JobEvent]


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


# -- adapters --------------------------------------------------------------------------------
class AdapterObject(BaseModel):
    """A trained sparse delta."""

    id: str
    object: Literal["adapter"] = "adapter"
    job_id: str
    base_model: str
    nnz: int
    density: float
    metric: str
    bytes: int
    sha256: str
    eval: dict[str, float] = Field(default_factory=dict)
    created_at: int


class AdapterList(BaseModel):
    """Adapters of the tenant."""

    object: Literal["list"] = "list"
    data: list[AdapterObject]


class AdapterDeleted(BaseModel):
    """DELETE /v1/adapters/{id} answer."""

    id: str
    object: Literal["adapter"] = "adapter"
    deleted: bool = True


# -- inference -------------------------------------------------------------------------------
MAX_CLASSIFICATION_INPUTS = 256
MAX_STOP_STRINGS = 4
MAX_STOP_LENGTH = 256
MAX_SEED = 2**32 - 1  # as the training seed; larger integers lose precision in JSON clients
StopString = Annotated[str, Field(max_length=MAX_STOP_LENGTH)]
MAX_COMPOSED_ADAPTERS = 8


class AdapterWeight(_Strict):
    """One adapter of a composition and the weight its delta is added with."""

    id: str = Field(min_length=1, max_length=64)
    weight: float = Field(1.0, ge=-10.0, le=10.0, allow_inf_nan=False)


AdapterChoice = (str | Annotated[list[AdapterWeight],
                                  Field(min_length=1, max_length=MAX_COMPOSED_ADAPTERS)] | None)


class _InferenceRequest(_Strict):
    model: str = Field(min_length=1, max_length=128)
    adapter: AdapterChoice = Field(
        None, description="An adapter id, a list of {id, weight} whose deltas are summed for "
                          "this request only, or null for the base model")

    def adapter_parts(self) -> list[tuple[str, float]]:
        """The adapter choice as (id, weight) pairs; empty for the base model. An adapter named
        twice is a 400 naming `adapter` (a rule no JSON schema can state)."""
        if self.adapter is None:
            return []
        if isinstance(self.adapter, str):
            return [(self.adapter, 1.0)]
        if len({part.id for part in self.adapter}) != len(self.adapter):
            raise InvalidRequest("an adapter appears twice in the composition", param="adapter")
        return [(part.id, part.weight) for part in self.adapter]


class ClassificationCreate(_InferenceRequest):
    """POST /v1/classifications: texts to label with a classification adapter."""

    input: str | Annotated[list[str], Field(min_length=1, max_length=MAX_CLASSIFICATION_INPUTS)
                           ] = Field(description="A text or a list of texts (at most "
                                                 f"{MAX_CLASSIFICATION_INPUTS}), each at most "
                                                 "SPEFT_INFERENCE_MAX_INPUT_CHARS characters "
                                                 "(100,000 by default; 400 beyond)")

    def texts(self) -> list[str]:
        """The input as a list."""
        return [self.input] if isinstance(self.input, str) else list(self.input)


class ClassificationResult(BaseModel):
    """One input's label and the probability of every label."""

    index: int
    label: str
    probs: dict[str, float]


class ClassificationResponse(BaseModel):
    """Labels for each input, in input order."""

    object: Literal["list"] = "list"
    model: str
    adapter: AdapterChoice
    data: list[ClassificationResult]


class CompletionCreate(_InferenceRequest):
    """POST /v1/completions: continue a prompt with a causal LM (SSE when `stream`)."""

    prompt: str = Field(description="At most SPEFT_INFERENCE_MAX_INPUT_CHARS characters "
                                    "(100,000 by default; 400 beyond)")
    max_tokens: int = Field(16, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0.0, le=5.0, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = (
        Field(None, description=f"A stop string or up to {MAX_STOP_STRINGS}, each at most "
                                f"{MAX_STOP_LENGTH} characters"))
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False

    def stop_strings(self) -> tuple[str, ...]:
        """The stop strings as a tuple (empty strings dropped)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)


class CompletionChoice(BaseModel):
    """The generated text and why it ended (`stop` or `length`)."""

    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None


class CompletionUsage(BaseModel):
    """Token counts of the request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    """A completion (also the shape of each streamed chunk, whose text is the new piece)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    adapter: AdapterChoice
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class LoadedAdapter(BaseModel):
    """An adapter resident in this API process's cache."""

    id: str
    model: str
    bytes: int
    pinned: bool
    hits: int
    load_ms: float
    loaded_at: int
    last_used_at: int


class LoadedAdapterList(BaseModel):
    """The caller's resident adapters and this process's cache totals."""

    object: Literal["list"] = "list"
    data: list[LoadedAdapter]
    resident_bytes: int
    budget_bytes: int


# -- health ----------------------------------------------------------------------------------
class Readiness(BaseModel):
    """GET /readyz: each dependency's check, "ok" (or "not configured") or why it failed."""

    status: Literal["ready", "unavailable"]
    checks: dict[str, str]


class ReadinessFailure(Readiness):
    """GET /readyz when a dependency is down: the checks plus an error naming the first one."""

    error: ErrorDetail
