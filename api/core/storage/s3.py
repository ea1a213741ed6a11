"""Objects in an S3 bucket under a key prefix (`s3://bucket/prefix`), on any S3 endpoint."""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

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

# A streamed put is buffered in memory up to this size, then in an anonymous temp file.
SPOOL_BYTES = 8 << 20
DEFAULT_S3_REGION = "us-east-1"
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
            stored = copy_limited(data, spool.write, key=key, max_bytes=max_bytes)
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
        verify_sha256(key, sha256, hashlib.sha256(data).hexdigest())
        return data

    def stream(
        self, key: str, *, chunk_size: int = CHUNK_BYTES, sha256: str | None = None
    ) -> Iterator[bytes]:
        """Open the object now (ObjectNotFound raised here) and iterate over its bytes."""
        check_chunk_size(chunk_size)
        s3_key = self._object_key(key)
        with _s3_errors(key):
            body = self._client.get_object(Bucket=self.bucket, Key=s3_key)["Body"]
        chunks = self._iter_body(body, key, chunk_size)
        return verified_chunks(chunks, key, sha256) if sha256 is not None else chunks

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
