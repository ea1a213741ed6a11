"""`/readyz` schemas."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from api.errors import ErrorDetail


class Readiness(BaseModel):
    """GET /readyz: each dependency's check, "ok" (or "not configured") or why it failed."""

    status: Literal["ready", "unavailable"]
    checks: dict[str, str]


class ReadinessFailure(Readiness):
    """GET /readyz when a dependency is down: the checks plus an error naming the first one."""

    error: ErrorDetail
