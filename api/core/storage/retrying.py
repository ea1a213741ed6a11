"""A storage that rides out a refusing backend: each call that raises StorageUnavailable is tried
again with a growing pause until a time budget is spent, then the last error is raised.

The worker wraps its storage in it for a running job (SPEFT_STORAGE_RETRY_S), so a storage blip
(a restarting S3 endpoint, a remounted volume) delays the job instead of failing it. The API does
not: a request answers 503 at once and the client retries. The back-off loop is kombu's
`retry_over_time` (the broker library Celery is built on, already installed): linear growth to a
ceiling, a deadline, and an errback that logs each retry. `retry_while_unavailable` is the same
policy for one call, e.g. opening the storage (an S3 bucket is probed when it is opened).
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeVar

from kombu.utils.functional import retry_over_time

from api.core.storage.base import CHUNK_BYTES, Storage, StorageUnavailable, StoredObject

log = logging.getLogger(__name__)

T = TypeVar("T")
FIRST_PAUSE_S = 1.0  # the pause before the first retry
PAUSE_STEP_S = 2.0  # added to the pause before each further retry
MAX_PAUSE_S = 15.0  # the longest pause between two tries


def retry_while_unavailable(call: Callable[[], T], *, timeout_s: float, what: str) -> T:
    """`call()`, tried again with a growing pause while it raises StorageUnavailable, the last
    try starting by `timeout_s` from now; each retry is logged naming `what`."""
    deadline = time.monotonic() + timeout_s

    def log_retry(error: StorageUnavailable, pauses: Iterator[float], tries: int) -> float:
        pause = min(next(pauses), max(0.0, deadline - time.monotonic()))
        log.warning("speft.storage %s refused (try %d), retrying in %.0f s: %s",
                    what, tries + 1, pause, error.message)
        return pause

    result: T = retry_over_time(call, StorageUnavailable, errback=log_retry,
                                interval_start=FIRST_PAUSE_S, interval_step=PAUSE_STEP_S,
                                interval_max=MAX_PAUSE_S, timeout=timeout_s)
    return result


class RetryingStorage:
    """`storage` whose calls are retried on StorageUnavailable for up to `timeout_s` seconds.

    A put is retried only when its data is bytes (a stream cannot be sent twice); `stream`
    retries opening the object, not a read that fails half-way; `open_local` retries entering
    the block; `check` (the readiness probe) is never retried."""

    def __init__(self, storage: Storage, *, timeout_s: float) -> None:
        if not timeout_s > 0:
            raise ValueError("timeout_s must be > 0")
        self.storage, self.timeout_s = storage, timeout_s

    def __repr__(self) -> str:
        return f"RetryingStorage({self.storage!r}, timeout_s={self.timeout_s:g})"

    def _retry(self, what: str, key: str, call: Callable[[], T]) -> T:
        """`call()`, retried while the backend refuses."""
        return retry_while_unavailable(call, timeout_s=self.timeout_s, what=f"{what} {key}")

    def put(
        self, key: str, data: bytes | BinaryIO | Iterable[bytes], *, max_bytes: int | None = None
    ) -> StoredObject:
        """Store `data` under `key` atomically; raise ObjectTooLarge past `max_bytes`."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            return self.storage.put(key, data, max_bytes=max_bytes)
        return self._retry("put", key, lambda: self.storage.put(key, data, max_bytes=max_bytes))

    def get(self, key: str, *, sha256: str | None = None) -> bytes:
        """Return the whole object, verified against `sha256` when given."""
        return self._retry("get", key, lambda: self.storage.get(key, sha256=sha256))

    def stream(
        self, key: str, *, chunk_size: int = CHUNK_BYTES, sha256: str | None = None
    ) -> Iterator[bytes]:
        """Open the object now (ObjectNotFound raised here) and iterate over its bytes."""
        return self._retry("open", key, lambda: self.storage.stream(
            key, chunk_size=chunk_size, sha256=sha256))

    @contextlib.contextmanager
    def open_local(self, key: str, *, sha256: str | None = None) -> Iterator[Path]:
        """Yield a local file path holding the verified object, valid inside the block."""
        with contextlib.ExitStack() as stack:
            yield self._retry("download", key, lambda: stack.enter_context(
                self.storage.open_local(key, sha256=sha256)))

    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing key is not an error."""
        self._retry("delete", key, lambda: self.storage.delete(key))

    def exists(self, key: str) -> bool:
        """Whether an object is stored under the key."""
        return self._retry("exists", key, lambda: self.storage.exists(key))

    def check(self) -> None:
        """Readiness probe: raise StorageUnavailable unless the backend answers (no retry)."""
        self.storage.check()
