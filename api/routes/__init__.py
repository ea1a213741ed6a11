"""HTTP routes: thin handlers that call services and render schemas."""

from collections.abc import Iterator

from fastapi.responses import StreamingResponse


def download_response(chunks: Iterator[bytes], *, size: int, filename: str) -> StreamingResponse:
    """A stored object streamed as an attachment (the one shape of every /content endpoint)."""
    return StreamingResponse(
        chunks, media_type="application/octet-stream",
        headers={"Content-Length": str(size),
                 "Content-Disposition": f'attachment; filename="{filename}"'},
    )
