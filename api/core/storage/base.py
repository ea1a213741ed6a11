"""The object-storage contract every backend keeps, its errors, and what backends share.

A put is streamed, size-limited, hashed on the fly and atomic (no partial object is ever
visible); reads verify an expected sha256 when the caller gives one (the database holds it).
Keys are built by the service and validated by every method (`validate_key`), so no key can
leave the storage root.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

MAX_KEY_BYTES = 512
CHUNK_BYTES = 1 << 20


class StorageError(Exception):
    """Base class of every storage failure; `key` names the object when there is one."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.key = key


class ObjectNotFound(StorageError):
    """No object is stored under the key."""

    def __init__(self, key: str) -> None:
        super().__init__(f"object not found: {key}", key=key)


class ChecksumMismatch(StorageError):
    """The stored bytes do not hash to the sha256 the caller expected."""

    def __init__(self, key: str, *, expected: str, actual: str) -> None:
        super().__init__(
            f"checksum mismatch for {key}: expected sha256 {expected}, got {actual}", key=key
        )
        self.expected = expected
        self.actual = actual


class ObjectTooLarge(StorageError):
    """A streamed put went past its `limit` in bytes; nothing was stored."""

    def __init__(self, key: str, *, limit: int) -> None:
        super().__init__(f"object {key} is larger than the limit of {limit} bytes", key=key)
        self.limit = limit


class StorageUnavailable(StorageError):
    """The backend cannot be reached or refuses us (network, credentials, permissions, disk)."""


@dataclass(frozen=True)
class StoredObject:
    """What a put stored: the key, its size in bytes and its sha256 (lowercase hex)."""

    key: str
    size: int
    sha256: str


@runtime_checkable
class Storage(Protocol):
    """The object-store contract every backend keeps."""

    def put(
        self, key: str, data: bytes | BinaryIO | Iterable[bytes], *, max_bytes: int | None = None
    ) -> StoredObject:
        """Store `data` under `key` atomically; raise ObjectTooLarge past `max_bytes`."""
        ...

    def get(self, key: str, *, sha256: str | None = None) -> bytes:
        """Return the whole object, verified against `sha256` when given."""
        ...

    def stream(
        self, key: str, *, chunk_size: int = CHUNK_BYTES, sha256: str | None = None
    ) -> Iterator[bytes]:
        """Open the object now (ObjectNotFound raised here) and iterate over its bytes."""
        ...

    def open_local(self, key: str, *, sha256: str | None = None) -> AbstractContextManager[Path]:
        """Yield a local file path holding the verified object, valid inside the block."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing key is not an error."""
        ...

    def exists(self, key: str) -> bool:
        """Whether an object is stored under the key."""
        ...

    def check(self) -> None:
        """Readiness probe: raise StorageUnavailable unless the backend answers."""
        ...


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative object key, else raise ValueError."""
    if not isinstance(key, str):
        raise TypeError(f"storage key must be a str, not {type(key).__name__}")
    if not key:
        raise ValueError("storage key is empty")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"storage key {key!r} is not valid UTF-8") from None
    if size > MAX_KEY_BYTES:
        raise ValueError(f"storage key is longer than {MAX_KEY_BYTES} bytes")
    if key.startswith("/"):
        raise ValueError(f"storage key {key!r} is absolute")
    if "\\" in key:
        raise ValueError(f"storage key {key!r} contains a backslash")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in key):
        raise ValueError(f"storage key {key!r} contains a control character")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"storage key {key!r} has an empty, '.' or '..' segment")
    return key


def _chunks(data: bytes | BinaryIO | Iterable[bytes]) -> Iterator[bytes]:
    """Turn bytes, a binary file-like object or an iterable of bytes into byte chunks."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        yield bytes(data)
        return
    if isinstance(data, str):
        raise TypeError("storage data must be bytes, a binary file or an iterable of bytes")
    read = getattr(data, "read", None)
    source: Iterable[object] = iter(lambda: read(CHUNK_BYTES), b"") if read else data
    for chunk in source:
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise TypeError(f"storage data yielded {type(chunk).__name__}, expected bytes")
        if chunk:
            yield bytes(chunk)


def copy_limited(
    data: bytes | BinaryIO | Iterable[bytes],
    write: Callable[[bytes], object],
    *,
    key: str,
    max_bytes: int | None,
) -> StoredObject:
    """Copy `data` into `write`, counting and hashing, and stop past `max_bytes`."""
    if max_bytes is not None and max_bytes < 0:
        raise ValueError("max_bytes must be >= 0")
    digest = hashlib.sha256()
    size = 0
    for chunk in _chunks(data):
        size += len(chunk)
        if max_bytes is not None and size > max_bytes:
            raise ObjectTooLarge(key, limit=max_bytes)
        digest.update(chunk)
        write(chunk)
    return StoredObject(key=key, size=size, sha256=digest.hexdigest())


def verify_sha256(key: str, expected: str | None, actual: str) -> None:
    """Raise ChecksumMismatch when an expected sha256 is given and differs."""
    if expected is not None and expected.lower() != actual:
        raise ChecksumMismatch(key, expected=expected, actual=actual)


def verified_chunks(chunks: Iterator[bytes], key: str, sha256: str | None) -> Iterator[bytes]:
    """Pass chunks through and raise ChecksumMismatch at the end if they hash differently."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
        yield chunk
    verify_sha256(key, sha256, digest.hexdigest())


def check_chunk_size(chunk_size: int) -> None:
    """Refuse a chunk size that would never make progress."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be > 0")
