"""Request and response models: the OpenAPI contract of DESIGN.md §3.

The fine-tuning method and hyperparameters are the core's own dataclasses (`SpeftConfig`,
`TrainConfig`), so their defaults, bounds and checks have one source of truth; pydantic
validates their types and runs their checks, and the error handler names the failing field.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.core.config import Device
from speft_core.config import JobSpec, SpeftConfig, TrainConfig

TaskName = Literal["classification", "causal_lm"]  # = speft_core.config.TASKS (tested)

MAX_SUFFIX_LENGTH = 64
MAX_METADATA_KEYS = 16


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    speft: SpeftConfig = Field(default_factory=SpeftConfig)


class JobCreate(_Strict):
    """POST /v1/fine_tuning/jobs body."""

    model: str = Field(min_length=1, max_length=256)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(default=None, min_length=1, max_length=64)
    task: TaskName | None = None  # None: the base model's own task
    device: Device | None = None  # where it trains (its queue); None: SPEFT_DEFAULT_DEVICE
    method: SpeftMethod = Field(default_factory=SpeftMethod)
    hyperparameters: TrainConfig = Field(default_factory=TrainConfig)
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
