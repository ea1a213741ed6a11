"""Objects as files under one root folder (`file://PATH`); a put is a temp file + os.replace."""
from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from api.core.storage.base import (
    CHUNK_BYTES,
    ObjectNotFound,
    StorageError,
    StorageUnavailable,
    StoredObject,
    check_chunk_size,
    copy_limited,
    validate_key,
    verified_chunks,
    verify_sha256,
)

_TEMP_PREFIX = ".part-"


class LocalStorage:
    """Objects as files under one root folder (`file://`); puts are temp file + os.replace."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self.root = Path(root).resolve()
        if create:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise _local_error(None, exc) from exc

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        """The file for `key`, refusing any key that resolves outside the root."""
        path = self.root / validate_key(key)
        if not path.resolve().is_relative_to(self.root):
            raise ValueError(f"storage key {key!r} escapes the storage root")
        return path

    def _open(self, key: str) -> BinaryIO:
        """Open the object for reading, mapping a missing file to ObjectNotFound."""
        try:
            return self._path(key).open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None
        except OSError as exc:
            raise _local_error(key, exc) from exc

    def put(
        self, key: str, data: bytes | BinaryIO | Iterable[bytes], *, max_bytes: int | None = None
    ) -> StoredObject:
        """Store `data` under `key` atomically; raise ObjectTooLarge past `max_bytes`."""
        path = self._path(key)
        if not self.root.is_dir():
            raise StorageUnavailable(f"storage folder {self.root} does not exist", key=key)
        tmp = path.parent / f"{_TEMP_PREFIX}{secrets.token_hex(8)}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # os.open (not mkstemp) so the object gets the usual umask-derived mode.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as exc:
            raise _local_error(key, exc) from exc
        try:
            with os.fdopen(fd, "wb") as fh:

                def write(chunk: bytes) -> None:
                    try:
                        fh.write(chunk)
                    except OSError as exc:
                        raise _local_error(key, exc) from exc

                stored = copy_limited(data, write, key=key, max_bytes=max_bytes)
                try:
                    fh.flush()
                    os.fsync(fh.fileno())
                except OSError as exc:
                    raise _local_error(key, exc) from exc
            try:
                os.replace(tmp, path)
            except OSError as exc:
                raise _local_error(key, exc) from exc
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return stored

    def get(self, key: str, *, sha256: str | None = None) -> bytes:
        """Return the whole object, verified against `sha256` when given."""
        with self._open(key) as fh:
            try:
                data = fh.read()
            except OSError as exc:
                raise _local_error(key, exc) from exc
        verify_sha256(key, sha256, hashlib.sha256(data).hexdigest())
        return data

    def stream(
        self, key: str, *, chunk_size: int = CHUNK_BYTES, sha256: str | None = None
    ) -> Iterator[bytes]:
        """Open the object now (ObjectNotFound raised here) and iterate over its bytes."""
        check_chunk_size(chunk_size)
        chunks = self._iter_file(self._open(key), key, chunk_size)
        return verified_chunks(chunks, key, sha256) if sha256 is not None else chunks

    @staticmethod
    def _iter_file(fh: BinaryIO, key: str, chunk_size: int) -> Iterator[bytes]:
        """Read an open file in chunks and close it when done."""
        with fh:
            while True:
                try:
                    chunk = fh.read(chunk_size)
                except OSError as exc:
                    raise _local_error(key, exc) from exc
                if not chunk:
                    return
                yield chunk

    @contextlib.contextmanager
    def open_local(self, key: str, *, sha256: str | None = None) -> Iterator[Path]:
        """Yield the object's own file (read it, never write it) after verifying `sha256`."""
        path = self._path(key)
        if sha256 is not None:
            for _ in self.stream(key, sha256=sha256):
                pass
        elif not path.is_file():
            raise ObjectNotFound(key)
        yield path

    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing key is not an error."""
        try:
            self._path(key).unlink(missing_ok=True)
        except (IsADirectoryError, NotADirectoryError):
            pass
        except OSError as exc:
            raise _local_error(key, exc) from exc

    def exists(self, key: str) -> bool:
        """Whether an object is stored under the key."""
        return self._path(key).is_file()

    def check(self) -> None:
        """Readiness probe: raise StorageUnavailable unless the root folder is writable."""
        try:
            fd, probe = tempfile.mkstemp(prefix=".probe-", dir=self.root)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise StorageUnavailable(f"storage folder {self.root} is not writable: {exc}") from exc


def _local_error(key: str | None, exc: OSError) -> StorageError:
    """Map a filesystem error: a key clash is a StorageError, the rest StorageUnavailable."""
    if isinstance(exc, (NotADirectoryError, IsADirectoryError, FileExistsError)):
        return StorageError(f"key {key} clashes with an existing object or folder: {exc}", key=key)
    return StorageUnavailable(f"local storage failed: {exc}", key=key)
