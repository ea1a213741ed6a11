"""`/v1/models` schemas: the registered base models."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from api.schemas.common import PublicModel, TaskName, UnixTime

BASE_MODEL_OWNER = "speft"  # `owned_by` of a registered base model


class ModelObject(PublicModel):
    """A registered base model, as OpenAI's model object (with `task`, `params` and `dtype`)."""

    id: str
    object: Literal["model"] = "model"
    created: UnixTime = Field(validation_alias="created_at",
                              description="when the model was registered (Unix seconds)")
    owned_by: str = Field(BASE_MODEL_OWNER, description="who owns the model: 'speft' for the "
                          "registered base models")
    task: TaskName
    params: int | None = None
    dtype: str = Field("auto", description="the dtype its weights train (for jobs saying "
                       "dtype 'auto') and serve in; 'auto' is the checkpoint's own")


class ModelList(BaseModel):
    """All base models."""

    object: Literal["list"] = "list"
    data: list[ModelObject]
