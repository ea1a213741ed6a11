"""`/readyz` schemas."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from api.errors import ErrorDetail


class Readiness(BaseModel):
    """GET /readyz: each dependency's check, "ok" (or "not configured") or why it failed."""

    status: Literal["ready", "unavailable"]
    checks: dict[str, str]
    # connections (size, in_use, overflow, waiting, ...) and threads (threads, threads_busy,
    # threads_waiting); `saturated` when a request waits for either (not a failure)
    database_pool: dict[str, Any]


class ReadinessFailure(Readiness):
    """GET /readyz when a dependency is down: the checks plus an error naming the first one."""

    error: ErrorDetail
