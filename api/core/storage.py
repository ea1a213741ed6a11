"""Object storage for uploaded files, base models and adapter deltas: a local folder or S3.

Both backends keep one contract (`Storage`): a put is streamed, size-limited, hashed on the
fly and atomic (no partial object is ever visible); reads verify an expected sha256 when the
caller gives one (the database holds it). Keys are built by the service and validated by every
method, so no key can leave the storage root.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol, runtime_checkable
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

MAX_KEY_BYTES = 512
CHUNK_BYTES = 1 << 20
# A streamed S3 put is buffered in memory up to this size, then in an anonymous temp file.
SPOOL_BYTES = 8 << 20
DEFAULT_S3_REGION = "us-east-1"
_TEMP_PREFIX = ".part-"
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_UNAVAILABLE_CODES = frozenset({
    "403", "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "ExpiredToken", "InvalidToken", "NoSuchBucket", "SlowDown", "ServiceUnavailable",
    "RequestTimeout", "InternalError",
})
_UNAVAILABLE_BOTO = (
    BotoConnectionError, HTTPClientError, NoCredentialsError, PartialCredentialsError,
    CredentialRetrievalError,
)


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


def open_storage(url: str, *, s3_endpoint_url: str | None = None, create: bool = True) -> Storage:
    """Open the backend a `file://` or `s3://bucket/prefix` URL names."""
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


def _copy_limited(
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


def _verify(key: str, expected: str | None, actual: str) -> None:
    """Raise ChecksumMismatch when an expected sha256 is given and differs."""
    if expected is not None and expected.lower() != actual:
        raise ChecksumMismatch(key, expected=expected, actual=actual)


def _verified(chunks: Iterator[bytes], key: str, sha256: str | None) -> Iterator[bytes]:
    """Pass chunks through and raise ChecksumMismatch at the end if they hash differently."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
        yield chunk
    _verify(key, sha256, digest.hexdigest())


def _check_chunk_size(chunk_size: int) -> None:
    """Refuse a chunk size that would never make progress."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be > 0")


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

                stored = _copy_limited(data, write, key=key, max_bytes=max_bytes)
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
        _verify(key, sha256, hashlib.sha256(data).hexdigest())
        return data

    def stream(
        self, key: str, *, chunk_size: int = CHUNK_BYTES, sha256: str | None = None
    ) -> Iterator[bytes]:
        """Open the object now (ObjectNotFound raised here) and iterate over its bytes."""
        _check_chunk_size(chunk_size)
        chunks = self._iter_file(self._open(key), key, chunk_size)
        return _verified(chunks, key, sha256) if sha256 is not None else chunks

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


class S3Storage:
    """Objects in an S3 bucket under a key prefix (`s3://bucket/prefix`), any S3 endpoint."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        create: bool = True,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        session = boto3.session.Session()
        region = session.region_name or DEFAULT_S3_REGION
        self._region = region
        # Custom endpoints (moto, MinIO, Ceph) rarely do virtual-host buckets.
        s3_options = {"addressing_style": "path"} if endpoint_url else {}
        self._client = session.client(
            "s3", endpoint_url=endpoint_url, region_name=region,
            config=Config(
                connect_timeout=2, read_timeout=30, s3=s3_options,
                retries={"mode": "standard", "max_attempts": 3},
            ),
        )
        # The readiness probe answers fast and never retries.
        self._probe = session.client(
            "s3", endpoint_url=endpoint_url, region_name=region,
            config=Config(
                connect_timeout=1, read_timeout=2, s3=s3_options,
                retries={"mode": "standard", "max_attempts": 1},
            ),
        )
        if create:
            self._ensure_bucket()

    def __repr__(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"S3Storage('s3://{self.bucket}/{self.prefix}'{where})"

    def _ensure_bucket(self) -> None:
        """Create the bucket when it does not exist yet."""
        with _s3_errors(None):
            try:
                self._client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                if not _is_not_found(exc) and _error_code(exc) != "NoSuchBucket":
                    raise
            options = {}
            if self._region != DEFAULT_S3_REGION:
                options["CreateBucketConfiguration"] = {"LocationConstraint": self._region}
            try:
                self._client.create_bucket(Bucket=self.bucket, **options)
            except ClientError as exc:
                if _error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def _object_key(self, key: str) -> str:
        """The S3 key for a storage key: the prefix, then the validated key."""
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(
        self, key: str, data: bytes | BinaryIO | Iterable[bytes], *, max_bytes: int | None = None
    ) -> StoredObject:
        """Store `data` under `key` atomically; raise ObjectTooLarge past `max_bytes`."""
        s3_key = self._object_key(key)
        # Spool first: the limit and the hash are known before anything reaches the bucket.
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
            stored = _copy_limited(data, spool.write, key=key, max_bytes=max_bytes)
            spool.seek(0)
            with _s3_errors(key):
                self._client.upload_fileobj(
                    spool, self.bucket, s3_key,
                    ExtraArgs={"Metadata": {"sha256": stored.sha256}},
                )
        return stored

    def get(self, key: str, *, sha256: str | None = None) -> bytes:
        """Return the whole object, verified against `sha256` when given."""
        s3_key = self._object_key(key)
        with _s3_errors(key):
            body = self._client.get_object(Bucket=self.bucket, Key=s3_key)["Body"]
            try:
                data = body.read()
            finally:
                body.close()
        _verify(key, sha256, hashlib.sha256(data).hexdigest())
        return data

    def stream(
        self, key: str, *, chunk_size: int = CHUNK_BYTES, sha256: str | None = None
    ) -> Iterator[bytes]:
        """Open the object now (ObjectNotFound raised here) and iterate over its bytes."""
        _check_chunk_size(chunk_size)
        s3_key = self._object_key(key)
        with _s3_errors(key):
            body = self._client.get_object(Bucket=self.bucket, Key=s3_key)["Body"]
        chunks = self._iter_body(body, key, chunk_size)
        return _verified(chunks, key, sha256) if sha256 is not None else chunks

    @staticmethod
    def _iter_body(body: object, key: str, chunk_size: int) -> Iterator[bytes]:
        """Read a botocore streaming body in chunks and close it when done."""
        try:
            with _s3_errors(key):
                yield from body.iter_chunks(chunk_size)  # type: ignore[attr-defined]
        finally:
            body.close()  # type: ignore[attr-defined]

    @contextlib.contextmanager
    def open_local(self, key: str, *, sha256: str | None = None) -> Iterator[Path]:
        """Download to a temp file, verify `sha256`, yield its path, then delete it."""
        chunks = self.stream(key, sha256=sha256)
        fd, name = tempfile.mkstemp(prefix="speft-", suffix=PurePosixPath(key).suffix)
        try:
            with os.fdopen(fd, "wb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
            yield Path(name)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(name)

    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing key is not an error."""
        s3_key = self._object_key(key)
        with _s3_errors(key):
            self._client.delete_object(Bucket=self.bucket, Key=s3_key)

    def exists(self, key: str) -> bool:
        """Whether an object is stored under the key."""
        s3_key = self._object_key(key)
        with _s3_errors(key):
            try:
                self._client.head_object(Bucket=self.bucket, Key=s3_key)
            except ClientError as exc:
                if _is_not_found(exc):
                    return False
                raise
        return True

    def check(self) -> None:
        """Readiness probe: raise StorageUnavailable unless the bucket answers, within seconds."""
        try:
            self._probe.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise StorageUnavailable(f"bucket {self.bucket} is not reachable: {exc}") from exc


def _error_code(exc: ClientError) -> str:
    """The S3 error code of a ClientError ("404" for a bodiless HEAD)."""
    return str(exc.response.get("Error", {}).get("Code", ""))


def _is_not_found(exc: ClientError) -> bool:
    """Whether a ClientError says the object is missing."""
    return _error_code(exc) in _NOT_FOUND_CODES


@contextlib.contextmanager
def _s3_errors(key: str | None) -> Iterator[None]:
    """Map botocore failures to ObjectNotFound, StorageUnavailable or StorageError."""
    try:
        yield
    except ClientError as exc:
        code = _error_code(exc)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if key is not None and code in _NOT_FOUND_CODES:
            raise ObjectNotFound(key) from exc
        if code in _UNAVAILABLE_CODES or status == 403 or status >= 500:
            raise StorageUnavailable(f"S3 refused the request: {exc}", key=key) from exc
        raise StorageError(f"S3 request failed: {exc}", key=key) from exc
    except _UNAVAILABLE_BOTO as exc:
        raise StorageUnavailable(f"S3 is not reachable: {exc}", key=key) from exc
    except BotoCoreError as exc:
        raise StorageError(f"S3 request failed: {exc}", key=key) from exc
