"""`/v1/adapters` schemas: a trained sparse delta, the tenant's list, a delete answer."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from api.schemas.common import PublicModel, UnixTime


class AdapterObject(PublicModel):
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
    created_at: UnixTime

    @field_validator("eval", mode="before")
    @classmethod
    def _no_evaluation_is_empty(cls, value: Any) -> Any:
        """A stored NULL evaluation reads as `{}`."""
        return {} if value is None else value


class AdapterList(BaseModel):
    """Adapters of the tenant."""

    object: Literal["list"] = "list"
    data: list[AdapterObject]


class AdapterDeleted(BaseModel):
    """DELETE /v1/adapters/{id} answer."""

    id: str
    object: Literal["adapter"] = "adapter"
    deleted: bool = True
