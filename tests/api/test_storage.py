"""The object-storage contract, run against the local folder and a real S3 endpoint."""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.core.config import Settings
from api.core.storage import (
    ChecksumMismatch,
    LocalStorage,
    ObjectNotFound,
    ObjectTooLarge,
    S3Storage,
    Storage,
    StorageError,
    StorageUnavailable,
    StoredObject,
    open_storage,
    open_storage_url,
    validate_key,
)

PAYLOAD = b'{"text": "a fine film", "label": "positive"}\n' * 2000  # ~90 KB
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
KEY = "files/file-abc123.jsonl"


@pytest.fixture(params=["file", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """A fresh, empty store of each backend kind."""
    if request.param == "file":
        return open_storage(Settings(storage_url=f"file://{tmp_path / 'storage'}"))
    return open_storage(Settings(storage_url=request.getfixturevalue("s3_storage_url"),
                                 s3_endpoint_url=request.getfixturevalue("s3_endpoint")))


@pytest.fixture
def private_tempdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Route tempfile's default folder to an empty folder the test can inspect."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _chunked(data: bytes, size: int = 7000) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


def _files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_both_backends_keep_the_protocol(storage: Storage) -> None:
    assert isinstance(storage, Storage)


@pytest.mark.parametrize(
    "make_data",
    [
        pytest.param(lambda: PAYLOAD, id="bytes"),
        pytest.param(lambda: io.BytesIO(PAYLOAD), id="file-like"),
        pytest.param(lambda: _chunked(PAYLOAD), id="iterator"),
    ],
)
def test_put_returns_size_and_sha256_and_get_round_trips(storage: Storage, make_data) -> None:
    stored = storage.put(KEY, make_data())
    assert stored == StoredObject(key=KEY, size=len(PAYLOAD), sha256=PAYLOAD_SHA)
    assert storage.get(KEY) == PAYLOAD
    assert storage.get(KEY, sha256=PAYLOAD_SHA) == PAYLOAD
    assert storage.get(KEY, sha256=PAYLOAD_SHA.upper()) == PAYLOAD


def test_put_empty_object(storage: Storage) -> None:
    stored = storage.put("files/empty.jsonl", b"")
    assert (stored.size, stored.sha256) == (0, hashlib.sha256(b"").hexdigest())
    assert storage.get("files/empty.jsonl") == b""
    assert list(storage.stream("files/empty.jsonl")) == []


def test_put_replaces_an_existing_object(storage: Storage) -> None:
    storage.put(KEY, b"old")
    storage.put(KEY, b"new content")
    assert storage.get(KEY) == b"new content"


def test_put_refuses_text(storage: Storage) -> None:
    with pytest.raises(TypeError):
        storage.put(KEY, "not bytes")  # type: ignore[arg-type]
    assert not storage.exists(KEY)


def test_get_with_wrong_sha256_is_checksum_mismatch(storage: Storage) -> None:
    storage.put(KEY, PAYLOAD)
    with pytest.raises(ChecksumMismatch) as info:
        storage.get(KEY, sha256="0" * 64)
    assert info.value.actual == PAYLOAD_SHA
    assert isinstance(info.value, StorageError)


def test_stream_yields_all_bytes_in_chunks(storage: Storage) -> None:
    storage.put(KEY, PAYLOAD)
    chunks = list(storage.stream(KEY, chunk_size=10_000))
    assert b"".join(chunks) == PAYLOAD
    assert len(chunks) >= len(PAYLOAD) // 10_000
    assert all(len(chunk) <= 10_000 for chunk in chunks)


def test_stream_verifies_sha256_at_the_end(storage: Storage) -> None:
    storage.put(KEY, PAYLOAD)
    assert b"".join(storage.stream(KEY, sha256=PAYLOAD_SHA)) == PAYLOAD
    with pytest.raises(ChecksumMismatch):
        b"".join(storage.stream(KEY, sha256="f" * 64))


def test_missing_key_is_object_not_found(storage: Storage) -> None:
    with pytest.raises(ObjectNotFound) as info:
        storage.get("files/missing.jsonl")
    assert info.value.key == "files/missing.jsonl"
    # stream() opens eagerly, so a missing object fails before any byte is sent.
    with pytest.raises(ObjectNotFound):
        storage.stream("files/missing.jsonl")
    with pytest.raises(ObjectNotFound), storage.open_local("files/missing.jsonl"):
        pass


def test_exists_and_delete_are_idempotent(storage: Storage) -> None:
    assert not storage.exists(KEY)
    storage.put(KEY, PAYLOAD)
    assert storage.exists(KEY)
    storage.delete(KEY)
    assert not storage.exists(KEY)
    storage.delete(KEY)
    storage.delete("files/never-stored.jsonl")


def test_open_local_gives_a_readable_verified_path(
    storage: Storage, private_tempdir: Path
) -> None:
    storage.put("adapters/ad-1.safetensors", PAYLOAD)
    with storage.open_local("adapters/ad-1.safetensors", sha256=PAYLOAD_SHA) as path:
        assert path.read_bytes() == PAYLOAD
        assert path.suffix == ".safetensors"
    if isinstance(storage, S3Storage):
        assert not path.exists()
        assert _files_under(private_tempdir) == []
    else:
        assert path.exists()  # the file backend hands out the object itself


def test_open_local_with_wrong_sha256_leaves_no_temp_file(
    storage: Storage, private_tempdir: Path
) -> None:
    storage.put(KEY, PAYLOAD)
    with pytest.raises(ChecksumMismatch), storage.open_local(KEY, sha256="0" * 64):
        pytest.fail("a mismatching object must not be handed out")
    assert _files_under(private_tempdir) == []


def test_open_local_cleans_up_when_the_block_raises(
    storage: Storage, private_tempdir: Path
) -> None:
    storage.put(KEY, PAYLOAD)
    with pytest.raises(RuntimeError), storage.open_local(KEY):
        raise RuntimeError("consumer failed")
    assert _files_under(private_tempdir) == []
    assert storage.exists(KEY)


def test_put_over_max_bytes_is_too_large_and_stores_nothing(
    storage: Storage, tmp_path: Path, private_tempdir: Path
) -> None:
    with pytest.raises(ObjectTooLarge) as info:
        storage.put(KEY, _chunked(PAYLOAD), max_bytes=len(PAYLOAD) - 1)
    assert info.value.limit == len(PAYLOAD) - 1
    assert not storage.exists(KEY)
    with pytest.raises(ObjectTooLarge):
        storage.put(KEY, PAYLOAD, max_bytes=10)
    assert not storage.exists(KEY)
    assert _files_under(private_tempdir) == []
    if isinstance(storage, LocalStorage):
        assert _files_under(storage.root) == []


def test_put_at_exactly_max_bytes_is_accepted(storage: Storage) -> None:
    assert storage.put(KEY, io.BytesIO(PAYLOAD), max_bytes=len(PAYLOAD)).size == len(PAYLOAD)


def test_an_oversize_put_keeps_the_previous_object(storage: Storage) -> None:
    storage.put(KEY, b"previous")
    with pytest.raises(ObjectTooLarge):
        storage.put(KEY, PAYLOAD, max_bytes=100)
    assert storage.get(KEY) == b"previous"


def test_no_partial_object_is_visible_during_a_put(storage: Storage) -> None:
    seen: list[bool] = []

    def slow_source() -> Iterator[bytes]:
        for chunk in _chunked(PAYLOAD):
            seen.append(storage.exists(KEY))
            yield chunk

    storage.put(KEY, slow_source())
    assert seen and not any(seen)
    assert storage.get(KEY) == PAYLOAD


def test_an_aborted_put_leaves_nothing_behind(storage: Storage) -> None:
    def failing_source() -> Iterator[bytes]:
        yield PAYLOAD[:1000]
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        storage.put(KEY, failing_source())
    assert not storage.exists(KEY)
    if isinstance(storage, LocalStorage):
        assert _files_under(storage.root) == []


def test_keys_nest_and_list_independently(storage: Storage) -> None:
    storage.put("models/minilm-l6/config.json", b"{}")
    storage.put("models/minilm-l6/model.safetensors", b"weights")
    assert storage.get("models/minilm-l6/config.json") == b"{}"
    storage.delete("models/minilm-l6/config.json")
    assert storage.exists("models/minilm-l6/model.safetensors")


def test_check_passes_on_a_working_store(storage: Storage) -> None:
    storage.check()


@pytest.mark.parametrize(
    "bad",
    ["", "../x", "files/../../etc/passwd", "/abs", "a//b", "a/", "./a", "a/./b", "a\\b",
     "a\x00b", "a\nb", "a\x7fb", "x" * 513],
)
def test_validate_key_refuses_unsafe_keys(bad: str) -> None:
    with pytest.raises(ValueError):
        validate_key(bad)


@pytest.mark.parametrize(
    "good", ["files/file-abc123.jsonl", "a", "models/minilm-l6/config.json", "x" * 512, "a..b"]
)
def test_validate_key_accepts_service_keys(good: str) -> None:
    assert validate_key(good) == good


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a//b", ""])
def test_every_backend_method_validates_its_key(storage: Storage, bad: str) -> None:
    with pytest.raises(ValueError):
        storage.put(bad, b"x")
    with pytest.raises(ValueError):
        storage.get(bad)
    with pytest.raises(ValueError):
        storage.stream(bad)
    with pytest.raises(ValueError), storage.open_local(bad):
        pass
    with pytest.raises(ValueError):
        storage.delete(bad)
    with pytest.raises(ValueError):
        storage.exists(bad)


def test_file_key_cannot_escape_the_root_through_a_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    store = LocalStorage(tmp_path / "root")
    (store.root / "files").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="escapes"):
        store.put("files/x.jsonl", b"data")
    with pytest.raises(ValueError, match="escapes"):
        store.get("files/x.jsonl")
    assert list(outside.iterdir()) == []


def test_file_objects_live_under_the_root_with_normal_permissions(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "root")
    store.put(KEY, PAYLOAD)
    path = tmp_path / "root" / KEY
    assert path.read_bytes() == PAYLOAD
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_open_storage_file_url_is_relative_to_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_storage_url("file://./var/storage")
    assert isinstance(store, LocalStorage)
    assert store.root == (tmp_path / "var" / "storage").resolve()
    assert store.root.is_dir()
    absolute = open_storage_url(f"file://{tmp_path / 'abs'}")
    assert isinstance(absolute, LocalStorage) and absolute.root == (tmp_path / "abs").resolve()


def test_open_storage_file_without_create_reports_unavailable(tmp_path: Path) -> None:
    store = open_storage(Settings(storage_url=f"file://{tmp_path / 'missing'}"), create=False)
    assert not (tmp_path / "missing").exists()
    with pytest.raises(StorageUnavailable):
        store.check()
    with pytest.raises(StorageUnavailable):
        store.put(KEY, b"x")


@pytest.mark.parametrize(
    "url", ["ftp://host/x", "/plain/path", "", "file://", "s3://", "s3:///prefix", "gs://b/p",
            "s3://bucket/a/../b"],
)
def test_open_storage_refuses_unknown_or_malformed_urls(url: str) -> None:
    with pytest.raises(ValueError, match="storage URL|storage key"):
        open_storage_url(url)


def test_s3_objects_are_stored_under_the_prefix(s3_endpoint: str, s3_storage_url: str) -> None:
    store = open_storage_url(s3_storage_url, s3_endpoint_url=s3_endpoint)
    assert isinstance(store, S3Storage) and store.prefix == "prefix"
    store.put(KEY, b"data")
    head = store._client.head_object(Bucket=store.bucket, Key=f"prefix/{KEY}")
    assert head["ContentLength"] == 4
    assert head["Metadata"]["sha256"] == hashlib.sha256(b"data").hexdigest()


def test_s3_create_false_does_not_create_the_bucket(s3_endpoint: str, s3_storage_url: str) -> None:
    store = open_storage_url(s3_storage_url, s3_endpoint_url=s3_endpoint, create=False)
    with pytest.raises(StorageUnavailable):
        store.check()
    open_storage_url(s3_storage_url, s3_endpoint_url=s3_endpoint)  # creates it
    store.check()
    open_storage_url(s3_storage_url, s3_endpoint_url=s3_endpoint)  # and again: already there


def test_s3_unreachable_endpoint_is_unavailable_quickly(s3_endpoint: str) -> None:
    store = open_storage_url("s3://bucket/prefix", s3_endpoint_url="http://127.0.0.1:1",
                             create=False)
    started = time.monotonic()
    with pytest.raises(StorageUnavailable):
        store.check()
    assert time.monotonic() - started < 5
    with pytest.raises(StorageUnavailable):
        store.exists(KEY)


def test_large_object_streams_through_without_a_single_buffer(storage: Storage) -> None:
    big = os.urandom(1 << 20) * 10  # 10 MiB: past the S3 spool and multipart thresholds
    stored = storage.put("models/big.bin", io.BytesIO(big), max_bytes=len(big))
    assert stored.sha256 == hashlib.sha256(big).hexdigest()
    assert b"".join(storage.stream("models/big.bin", sha256=stored.sha256)) == big
