"""One exception hierarchy, one error shape: `{"error": {"code", "message", "param", "type"}}`.

Services raise `ApiError` subclasses (or core `SpeftError`s); `install_error_handlers` renders
every one of them, FastAPI's own validation errors, and a database or storage that cannot be
reached (503 naming `database` or `storage`), in the same shape. `error_responses` documents
that shape in the OpenAPI schema for the statuses a route can answer.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from api.core.storage import StorageError, StorageUnavailable
from speft_core.errors import SpeftError

log = logging.getLogger(__name__)


class SafeJSONResponse(JSONResponse):
    """The app's JSON response: a string UTF-8 cannot encode (a lone surrogate, e.g. in a row
    stored before the request check existed) is written as a JSON escape (`"\\ud800"`), so no
    stored value can make a response, or a whole listing, fail. Other text stays as it is."""

    def render(self, content: Any) -> bytes:
        """Compact JSON in UTF-8; ASCII with escapes when the text holds a lone surrogate."""
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, indent=None,
                              separators=(",", ":")).encode("ascii")


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
    """413: a request body or an upload exceeded its configured limit."""

    status_code, code = 413, "payload_too_large"


class RateLimited(ApiError):
    """429: too many requests or concurrent jobs; `Retry-After` says when to come back."""

    status_code, error_type, code = 429, "rate_limit_error", "rate_limited"


# Seconds a 503 asks a client to wait before retrying (the `openai` SDK honours Retry-After).
RETRY_AFTER_UNAVAILABLE_S = 1
_RETRY_LATER = {"Retry-After": str(RETRY_AFTER_UNAVAILABLE_S)}


class ServiceUnavailable(ApiError):
    """503: a dependency (database, broker, storage) is unreachable or a model failed to load;
    nothing was written, and `Retry-After` says when to try again."""

    status_code, error_type, code = 503, "service_unavailable", "service_unavailable"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message, param=param, code=code, headers={**_RETRY_LATER,
                                                                   **(headers or {})})


def error_body(code: str, message: str, *, param: str | None = None,
               error_type: str = "invalid_request_error") -> dict[str, Any]:
    """The one error shape."""
    return {"error": {"code": code, "message": message, "param": param, "type": error_type}}


class ErrorDetail(BaseModel):
    """What went wrong: a stable `code`, a readable `message`, the field or dependency named
    by `param`, and the error family `type`."""

    code: str
    message: str
    param: str | None = None
    type: str


class ErrorResponse(BaseModel):
    """The body of every error answer."""

    error: ErrorDetail


_ERROR_DESCRIPTIONS = {
    400: "A value is not acceptable (unknown model or file, bad dataset, wrong task)",
    401: "Missing or unknown API key",
    404: "No such object for this tenant",
    409: "Conflicts with the object's state or an earlier Idempotency-Key",
    413: ("The request body is larger than the route's limit (SPEFT_MAX_JSON_BODY_BYTES, 1 MiB "
          "by default; POST /v1/files: SPEFT_MAX_UPLOAD_BYTES), param `body`; or the uploaded "
          "file is larger than SPEFT_MAX_UPLOAD_BYTES, param `file`"),
    422: "The request does not match the schema, or a stored adapter cannot be served",
    429: "Too many requests; Retry-After says when to come back",
    503: "The database or storage cannot be reached, or a base model failed to load; nothing was "
         "written",
}
# What any authenticated /v1 route can answer besides its own errors (400: also a value the
# database cannot store, such as a NUL character on Postgres, or a lone surrogate in a JSON
# body; 413: a body over the route's limit, see api.request_limits).
COMMON_ERRORS = (400, 401, 413, 422, 429, 503)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting the error shape for `statuses`."""
    return {status: {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[status]}
            for status in statuses}


def _unavailable(dependency: str, reason: str) -> SafeJSONResponse:
    """503 naming the dependency that cannot be reached."""
    return SafeJSONResponse(
        error_body(ServiceUnavailable.code, f"{dependency} unavailable: {reason}",
                   param=dependency, error_type=ServiceUnavailable.error_type),
        status_code=ServiceUnavailable.status_code, headers=_RETRY_LATER)


def is_database_unavailable(exc: BaseException) -> bool:
    """Whether a SQLAlchemy error means the database cannot be reached (not a bug of ours):
    a refused or dropped connection, an operational failure, or no pooled connection in time."""
    return (isinstance(exc, (OperationalError, PoolTimeoutError))
            or (isinstance(exc, DBAPIError) and exc.connection_invalidated))


_LOCATION_ROOTS = ("body", "query", "path", "header")
# pydantic names the branch of a union field it tried (`input.str`, `adapter.list[...]`,
# `stop.constrained-str`): not a field
_UNION_BRANCH_NAMES = frozenset({"str", "int", "float", "bool", "none", "dict", "list", "bytes"})
_CONSTRAINED_BRANCH = "constrained-"
_DICT_KEY = "[key]"  # pydantic's location of a dict key that failed validation


def _validation_param(location: tuple[Any, ...]) -> str | None:
    """`("body", "method", "speft", "density")` -> "method.speft.density" (union branches dropped)."""
    parts = [str(p) for p in location if p not in _LOCATION_ROOTS]
    if _DICT_KEY in parts:  # a bad key of a dict: name the dict, not the (bad) key itself
        parts = parts[:max(parts.index(_DICT_KEY) - 1, 0)]
    parts = [p for p in parts if "[" not in p and p not in _UNION_BRANCH_NAMES
             and not p.startswith(_CONSTRAINED_BRANCH)]
    return ".".join(parts) or None


def _allowed_methods(request: Request) -> str:
    """`Allow` for a 405: the methods of every route on this path (Starlette names only the
    first route's, and FastAPI makes one route per method)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if route.matches(request.scope)[0] != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI) -> None:
    """Render ApiError, core SpeftError, validation and HTTP errors in the one error shape."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> SafeJSONResponse:
        return SafeJSONResponse(error_body(exc.code, exc.message, param=exc.param,
                                       error_type=exc.error_type),
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(SpeftError)
    async def _core_error(_: Request, exc: SpeftError) -> SafeJSONResponse:
        return SafeJSONResponse(error_body(exc.code, exc.message, param=exc.param), status_code=400)

    @app.exception_handler(StorageError)
    async def _storage_error(_: Request, exc: StorageError) -> SafeJSONResponse:
        if isinstance(exc, StorageUnavailable):  # nothing was written: retry later
            return _unavailable("storage", exc.message)
        # A stored object missing or corrupt behind a live row is our fault, said plainly.
        return SafeJSONResponse(error_body("storage_error",
                                           f"stored object unreadable: {exc.message}",
                                           error_type="api_error"), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> SafeJSONResponse:
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
        return SafeJSONResponse(error_body("invalid_request", message, param=param),
                                status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> SafeJSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request)
        return SafeJSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code,
                            headers=headers)

    async def _database_error(request: Request, exc: Exception) -> SafeJSONResponse:
        if isinstance(exc, DataError):  # a value the database cannot hold (Postgres: a NUL)
            reason = "; ".join(line.strip() for line in
                               str(getattr(exc, "orig", None) or exc).splitlines()[:2])
            return SafeJSONResponse(error_body(InvalidRequest.code,
                                           f"a value cannot be stored: {reason}"),
                                status_code=InvalidRequest.status_code)
        if not is_database_unavailable(exc):
            raise exc  # a bug, not an outage: the server error handler answers 500
        log.warning("speft.database unavailable path=%s error=%s: %s", request.url.path,
                    type(exc).__name__, exc)
        cause = type(getattr(exc, "orig", None) or exc).__name__
        return _unavailable("database", f"{cause}; retry later")

    for database_error in (DBAPIError, PoolTimeoutError):
        app.add_exception_handler(database_error, _database_error)

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> SafeJSONResponse:
        return SafeJSONResponse(error_body("internal_error", "internal server error",
                                       error_type="api_error"), status_code=500)
