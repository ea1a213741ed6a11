"""`/v1/fine_tuning/jobs/{id}/checkpoints` schemas, in OpenAI's shape."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from api.schemas.common import PublicModel, UnixTime


class CheckpointObject(PublicModel):
    """A job's delta at one step: servable by `id` wherever an adapter id is accepted."""

    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: UnixTime
    fine_tuning_job_id: str = Field(validation_alias="job_id")
    step_number: int = Field(validation_alias="step")
    fine_tuned_model_checkpoint: str = Field(validation_alias="id",
                                             description="the id to serve it by (= id)")
    metrics: dict[str, float | None] = Field(
        description="train_loss, and with a validation file valid_loss and valid_accuracy "
                    "(classification) or valid_mean_token_accuracy (causal LM)")
    bytes: int
    sha256: str


class CheckpointList(BaseModel):
    """A job's live checkpoints, newest first."""

    object: Literal["list"] = "list"
    data: list[CheckpointObject]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


class CheckpointDeleted(BaseModel):
    """DELETE answer."""

    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    deleted: bool = True
