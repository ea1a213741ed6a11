"""HTTP routes: thin handlers that call services and render schemas."""

from collections.abc import Iterator
from typing import Any

from fastapi.responses import StreamingResponse

# How every /content endpoint's 200 is documented: the stored bytes, as uploaded or trained.
DOWNLOAD_RESPONSE: dict[int | str, dict[str, Any]] = {200: {
    "description": "The stored bytes (Content-Length and a Content-Disposition file name set)",
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
}}


def download_response(chunks: Iterator[bytes], *, size: int, filename: str) -> StreamingResponse:
    """A stored object streamed as an attachment (the one shape of every /content endpoint)."""
    return StreamingResponse(
        chunks, media_type="application/octet-stream",
        headers={"Content-Length": str(size),
                 "Content-Disposition": f'attachment; filename="{filename}"'},
    )
