"""One exception hierarchy, one error shape: `{"error": {"code", "message", "param", "type"}}`.

Services raise `ApiError` subclasses (or core `SpeftError`s); `install_error_handlers` renders
every one of them, and FastAPI's own validation errors, in the same shape.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.core.storage import StorageError, StorageUnavailable
from speft_core.errors import SpeftError


class ApiError(Exception):
    """An error a client can act on; subclasses fix the HTTP status and error type."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers
        if code is not None:
            self.code = code


class InvalidRequest(ApiError):
    """400: the request is well-formed JSON but a value is not acceptable."""


class Unauthorized(ApiError):
    """401: missing or unknown API key."""

    status_code, error_type, code = 401, "authentication_error", "invalid_api_key"


class NotFound(ApiError):
    """404: no such object for this tenant (another tenant's objects are 404 too)."""

    status_code, code = 404, "not_found"


class Conflict(ApiError):
    """409: the request conflicts with the object's state (or an idempotency key's body)."""

    status_code, code = 409, "conflict"


class PayloadTooLarge(ApiError):
    """413: an upload exceeded the configured limit."""

    status_code, code = 413, "payload_too_large"


class RateLimited(ApiError):
    """429: too many requests or concurrent jobs; `Retry-After` says when to come back."""

    status_code, error_type, code = 429, "rate_limit_error", "rate_limited"


class ServiceUnavailable(ApiError):
    """503: a dependency (database, broker, storage) is unreachable; nothing was written."""

    status_code, error_type, code = 503, "service_unavailable", "service_unavailable"


def error_body(code: str, message: str, *, param: str | None = None,
               error_type: str = "invalid_request_error") -> dict[str, Any]:
    """The one error shape."""
    return {"error": {"code": code, "message": message, "param": param, "type": error_type}}


_LOCATION_ROOTS = ("body", "query", "path", "header")
# pydantic names the branch of a union field it tried (`input.str`, `adapter.list[...]`): not a field
_UNION_BRANCH_NAMES = frozenset({"str", "int", "float", "bool", "none", "dict", "list", "bytes"})


def _validation_param(location: tuple[Any, ...]) -> str | None:
    """`("body", "method", "speft", "density")` -> "method.speft.density" (union branches dropped)."""
    parts = [str(p) for p in location if p not in _LOCATION_ROOTS]
    parts = [p for p in parts if "[" not in p and p not in _UNION_BRANCH_NAMES]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    """Render ApiError, core SpeftError, validation and HTTP errors in the one error shape."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message, param=exc.param,
                                       error_type=exc.error_type),
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(SpeftError)
    async def _core_error(_: Request, exc: SpeftError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message, param=exc.param), status_code=400)

    @app.exception_handler(StorageError)
    async def _storage_error(_: Request, exc: StorageError) -> JSONResponse:
        if isinstance(exc, StorageUnavailable):  # nothing was written: retry later
            return JSONResponse(
                error_body(ServiceUnavailable.code, f"storage unavailable: {exc.message}",
                           error_type=ServiceUnavailable.error_type), status_code=503)
        # A stored object missing or corrupt behind a live row is our fault, said plainly.
        return JSONResponse(error_body("storage_error", f"stored object unreadable: {exc.message}",
                                       error_type="api_error"), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = _validation_param(tuple(first.get("loc", ())))
        message = str(first.get("msg", "invalid request"))
        cause = (first.get("ctx") or {}).get("error")
        if isinstance(cause, SpeftError):  # a core check inside a schema: name its field
            message = cause.message
            if cause.param:
                param = f"{param}.{cause.param}" if param else cause.param
        elif param:
            message = f"{param}: {message}"
        return JSONResponse(error_body("invalid_request", message, param=param), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code)
