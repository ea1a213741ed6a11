"""`/healthz` (the process answers) and `/readyz` (database, storage and broker answer, and the
state of the database and thread pools)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.errors import ServiceUnavailable, error_body
from api.observability import pool_state
from api.schemas.health import Readiness, ReadinessFailure

router = APIRouter(tags=["health"])
NOT_CONFIGURED = "not configured"


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness: always ok while the process serves requests."""
    return {"status": "ok"}


def _probe(check: Callable[[], object]) -> str:
    """"ok", or the check's error message."""
    try:
        check()
    except Exception as err:  # noqa: BLE001 - a probe reports every failure, never raises it
        return f"{type(err).__name__}: {getattr(err, 'message', None) or err}"
    return "ok"


@router.get("/readyz", responses={200: {"model": Readiness},
                                   503: {"model": ReadinessFailure,
                                         "description": "a dependency is down"}})
def readyz(request: Request) -> JSONResponse:
    """Readiness: the database, storage and broker (when configured) all answer. A saturated
    pool is reported in `database_pool` (requests wait, and are served) but is not a failure."""
    state = request.app.state

    def database() -> None:
        with state.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    broker_check: Callable[[], object] | None = getattr(state, "broker_check", None)
    checks = {"database": _probe(database), "storage": _probe(state.storage.check),
              "broker": _probe(broker_check) if broker_check is not None else NOT_CONFIGURED}
    failing = [name for name, result in checks.items() if result not in ("ok", NOT_CONFIGURED)]
    pools = pool_state(state).as_dict()
    if not failing:
        return JSONResponse({"status": "ready", "checks": checks, "database_pool": pools})
    body: dict[str, Any] = {"status": "unavailable", "checks": checks, "database_pool": pools}
    message = "; ".join(f"{name}: {checks[name]}" for name in failing)
    body.update(error_body(ServiceUnavailable.code, message, param=failing[0],
                           error_type=ServiceUnavailable.error_type))
    return JSONResponse(body, status_code=ServiceUnavailable.status_code)
