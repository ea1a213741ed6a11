"""What every schema module shares: the strict request base, the response base, Unix time, and
the helpers that document the core's own bounds in the JSON schema."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    TypeAdapter,
    WithJsonSchema,
    computed_field,
)

TaskName = Literal["classification", "causal_lm"]  # = speft_core.config.TASKS (tested)


class StrictModel(BaseModel):
    """A request body: unknown fields are refused (422 naming them)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class PublicModel(BaseModel):
    """A response object, built from its ORM row by attribute (`Schema.model_validate(row)`)."""

    model_config = ConfigDict(from_attributes=True)


class CursorList(BaseModel):
    """A page of a list as OpenAI pages it: `first_id` and `last_id` name the page's ends (null
    when it is empty); while `has_more`, pass `last_id` as `after` for the next page."""

    object: Literal["list"] = "list"
    data: Sequence[Any]  # a subclass names the item type
    has_more: bool

    @computed_field  # type: ignore[prop-decorator]
    @property
    def first_id(self) -> str | None:
        """The id of the page's first object."""
        return self.data[0].id if self.data else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def last_id(self) -> str | None:
        """The id of the page's last object."""
        return self.data[-1].id if self.data else None


def unix_seconds(value: Any) -> Any:
    """A datetime, or a float of epoch seconds (`time.time()`), as whole seconds since the epoch;
    anything else as given (validated as int)."""
    if isinstance(value, datetime):
        return int(value.timestamp())
    return int(value) if isinstance(value, float) else value


# The one place a stored timestamp becomes the API's integer seconds.
UnixTime = Annotated[int, BeforeValidator(unix_seconds)]


def int_range(low: int, high: int) -> dict[str, Any]:
    """JSON schema of an integer in [low, high]."""
    return {"type": "integer", "minimum": low, "maximum": high}


def number_range(low: float, high: float, *, low_open: bool = False) -> dict[str, Any]:
    """JSON schema of a number in [low, high] (or (low, high] when `low_open`)."""
    return {"type": "number", "exclusiveMinimum" if low_open else "minimum": low, "maximum": high}


def documented(config: type, bounds: dict[str, dict[str, Any]],
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
