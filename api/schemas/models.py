"""`/v1/models` schemas: the registered base models."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from api.schemas.common import PublicModel, TaskName, UnixTime


class ModelObject(PublicModel):
    """A registered base model."""

    id: str
    object: Literal["model"] = "model"
    task: TaskName
    params: int | None = None
    dtype: str = Field("auto", description="the dtype its weights train (for jobs saying "
                       "dtype 'auto') and serve in; 'auto' is the checkpoint's own")
    created_at: UnixTime


class ModelList(BaseModel):
    """All base models."""

    object: Literal["list"] = "list"
    data: list[ModelObject]
