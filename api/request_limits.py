"""Request bodies at the door: a size limit per route, and no lone surrogate in a JSON body.

One pure ASGI middleware (no BaseHTTPMiddleware: no extra task, no re-wrapped streams), run before
routing, authentication and every handler:

- **Body limit.** The upload route (`POST /v1/files`, multipart) may carry SPEFT_MAX_UPLOAD_BYTES
  plus `MULTIPART_OVERHEAD_BYTES` of framing (the file part itself is bounded exactly by storage:
  413 naming `file`); every other route SPEFT_MAX_JSON_BODY_BYTES. A `Content-Length` over the
  limit is refused before a byte is read; a body without one (chunked) is counted as it arrives
  and refused as soon as it passes the limit. Either way: 413 naming `body`.
- **Lone surrogates.** A JSON escape such as `"\\ud800"` that is not half of a pair decodes to a
  string Python holds but UTF-8 cannot encode, so it would fail later, in a response, a database
  driver or a tokenizer. Every body but the upload's (read whole: it is within the JSON limit) is
  checked once here: a string or key holding one is a 400 naming its path (`metadata.k`,
  `messages[0].content`). Bodies without a surrogate escape are not parsed (one byte scan).
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from starlette.routing import get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.core.config import Settings
from api.errors import PayloadTooLarge, SafeJSONResponse, error_body

UPLOAD_ROUTE = ("POST", "/v1/files")  # the one route whose body is a multipart upload
MULTIPART_OVERHEAD_BYTES = 64 * 1024  # boundaries, part headers and the `purpose` field
BODY_PARAM = "body"
# `\uD800`–`\uDFFF` written as a JSON escape: the only way a surrogate gets into a UTF-8 body.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class _BodyTooLarge(Exception):
    """Raised into the app by `receive` once a streamed body passes its route's limit."""


def lone_surrogate_path(value: Any) -> tuple[str, str] | None:
    """(path, what) of the first string or key in decoded JSON holding a lone surrogate: the
    path as `metadata.k` / `input[2]` (a key is named by the object holding it), None if none.

    Walked with an explicit stack, so a deeply nested body costs no recursion."""
    pending: list[tuple[str, Any]] = [("", value)]
    while pending:
        path, item = pending.pop()
        if isinstance(item, str):
            found = _SURROGATE.search(item)
            if found is not None:
                return path, f"\\u{ord(found.group()):04x} at character {found.start()}"
        elif isinstance(item, list):
            pending.extend((f"{path}[{index}]", child)
                           for index, child in reversed(list(enumerate(item))))
        elif isinstance(item, dict):
            if any(_SURROGATE.search(key) for key in item):
                return path, "in a key"
            pending.extend((f"{path}.{key}" if path else key, child)
                           for key, child in reversed(list(item.items())))
    return None


def _surrogate_error(body: bytes) -> SafeJSONResponse | None:
    """A 400 naming where the JSON `body` holds a lone surrogate; None when it holds none (or
    is not JSON at all: the route's own parsing answers that)."""
    if not _SURROGATE_ESCAPE.search(body):
        return None
    try:
        decoded = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested too deeply: the route answers
        return None
    hit = lone_surrogate_path(decoded)
    if hit is None:
        return None
    path, what = hit
    param = path or BODY_PARAM
    message = (f"{param}: a lone surrogate ({what}); JSON strings must be valid Unicode "
               "(a \\ud800-\\udfff escape must be half of a surrogate pair)")
    return SafeJSONResponse(error_body("invalid_request", message, param=param), status_code=400)


def _too_large(limit: int) -> SafeJSONResponse:
    """413 naming `body`."""
    return SafeJSONResponse(
        error_body(PayloadTooLarge.code, f"the request body is larger than this route's limit "
                                         f"of {limit} bytes", param=BODY_PARAM),
        status_code=PayloadTooLarge.status_code)


def _declared_length(scope: Scope) -> int | None:
    """The request's Content-Length, if it sent a valid one."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class RequestLimitsMiddleware:
    """Refuse bodies over their route's limit (413) and JSON bodies with lone surrogates (400)."""

    def __init__(self, app: ASGIApp, *, json_limit: int, upload_limit: int) -> None:
        self.app, self.json_limit, self.upload_limit = app, json_limit, upload_limit

    def limit_for(self, scope: Scope) -> tuple[int, bool]:
        """(byte limit, whether the body streams through unread) for this request's route."""
        if (scope["method"], get_route_path(scope).rstrip("/")) == UPLOAD_ROUTE:
            return self.upload_limit + MULTIPART_OVERHEAD_BYTES, True
        return self.json_limit, False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, streamed = self.limit_for(scope)
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            await _too_large(limit)(scope, receive, send)
            return
        if streamed:
            await self._counted(scope, receive, send, limit)
            return
        messages = await _read_body(receive, limit)
        if messages is None:
            await _too_large(limit)(scope, receive, send)
            return
        refused = _surrogate_error(b"".join(m.get("body", b"") for m in messages))
        if refused is not None:
            await refused(scope, receive, send)
            return
        await self.app(scope, _replay(messages, receive), send)

    async def _counted(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """Run the app with a body counted as it streams; past `limit`, whatever the app made
        of the interruption is dropped and a 413 sent instead."""
        size, exceeded, started = 0, False, False

        async def counting_receive() -> Message:
            nonlocal size, exceeded
            message = await receive()
            size += len(message.get("body", b""))
            if size > limit:
                exceeded = True
                raise _BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # the app's answer to the cut-off body: replaced by the 413
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _BodyTooLarge:
            pass
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await _too_large(limit)(scope, receive, send)


async def _read_body(receive: Receive, limit: int) -> list[Message] | None:
    """Every message of the request body (up to `more_body: False` or a disconnect); None as
    soon as the body passes `limit` bytes (the rest is never read)."""
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        size += len(message.get("body", b""))
        if size > limit:
            return None
        if message["type"] != "http.request" or not message.get("more_body", False):
            return messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A `receive` that hands out the buffered body, then waits on the real one (disconnects)."""
    pending: Iterator[Message] = iter(messages)

    async def replay() -> Message:
        return next(pending, None) or await receive()

    return replay


def install_request_limits(app: FastAPI, settings: Settings) -> None:
    """Add the middleware with SPEFT_MAX_JSON_BODY_BYTES and SPEFT_MAX_UPLOAD_BYTES."""
    app.add_middleware(RequestLimitsMiddleware, json_limit=settings.max_json_body_bytes,
                       upload_limit=settings.max_upload_bytes)
