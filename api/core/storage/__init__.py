"""Object storage for uploaded files, base models and adapter deltas: a local folder or S3.

`open_storage(settings)` is the one way the API, the worker and the CLI open it; the contract
(`Storage`) and its errors are in `base`, one module per backend (`local`, `s3`); `retrying`
wraps any of them to ride out a backend that refuses for a while (the worker's running jobs).
"""
from __future__ import annotations

from urllib.parse import urlsplit

from api.core.config import Settings
from api.core.storage.base import (
    CHUNK_BYTES,
    MAX_KEY_BYTES,
    ChecksumMismatch,
    ObjectNotFound,
    ObjectTooLarge,
    Storage,
    StorageError,
    StorageUnavailable,
    StoredObject,
    validate_key,
)
from api.core.storage.local import LocalStorage
from api.core.storage.retrying import RetryingStorage, retry_while_unavailable
from api.core.storage.s3 import S3Storage

__all__ = [
    "CHUNK_BYTES", "MAX_KEY_BYTES", "ChecksumMismatch", "LocalStorage", "ObjectNotFound",
    "ObjectTooLarge", "RetryingStorage", "S3Storage", "Storage", "StorageError",
    "StorageUnavailable", "StoredObject", "open_storage", "open_storage_url",
    "retry_while_unavailable", "validate_key",
]


def open_storage(settings: Settings, *, create: bool = True) -> Storage:
    """The storage SPEFT_STORAGE_URL names (S3 at SPEFT_S3_ENDPOINT_URL when set); with
    `create`, its folder or bucket is made when missing."""
    return open_storage_url(settings.storage_url, s3_endpoint_url=settings.s3_endpoint_url,
                            create=create)


def open_storage_url(url: str, *, s3_endpoint_url: str | None = None,
                     create: bool = True) -> Storage:
    """Open the backend a `file://PATH` or `s3://bucket/prefix` URL names."""
    if url.startswith("file://"):
        folder = url[len("file://"):]
        if not folder:
            raise ValueError(f"storage URL {url!r} names no folder")
        return LocalStorage(folder, create=create)
    if url.startswith("s3://"):
        parts = urlsplit(url)
        if not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"storage URL {url!r} must look like s3://bucket/prefix")
        prefix = parts.path.strip("/")
        if prefix:
            validate_key(prefix)
        return S3Storage(parts.netloc, prefix, endpoint_url=s3_endpoint_url, create=create)
    raise ValueError(f"unsupported storage URL {url!r}: expected file://PATH or s3://BUCKET/PREFIX")
