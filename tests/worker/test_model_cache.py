"""The model cache: a stored tar archive of a HF folder unpacked once, verified and safely."""
from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from api.core.config import get_settings
from api.core.db import make_engine, session_factory, upgrade_database
from api.core.model_cache import ModelArchiveError, local_model_folder
from api.core.models import RegisteredModel
from api.core.storage import ChecksumMismatch, LocalStorage
from api.services.models import model_reference
from speft_core.models import load_model
from worker import tasks

KEY = "models/tiny-llama.tar.gz"
STORIES_PARAMS = 260_032


def tar_folder(folder: Path, *, top: str | None = None, skip: tuple[str, ...] = (),
               mode: str = "w:gz") -> bytes:
    """The files of `folder` as a tar archive, at its root or under the folder `top`."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for path in sorted(folder.iterdir()):
            if path.name not in skip:
                tar.add(path, arcname=f"{top}/{path.name}" if top else path.name)
    return buffer.getvalue()


def tar_members(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    """A plain tar archive of hand-made members (for names `tarfile.add` would never write)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buffer.getvalue()


def _file(name: str, data: bytes = b"{}") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _symlink(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info, b""


@pytest.fixture
def storage(tmp_path) -> LocalStorage:
    return LocalStorage(tmp_path / "storage")


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


def _put(storage: LocalStorage, data: bytes, key: str = KEY) -> str:
    return storage.put(key, data).sha256


def test_unpacks_once_then_serves_from_the_cache(storage, cache_dir, stories_dir):
    sha256 = _put(storage, tar_folder(stories_dir))
    folder = local_model_folder(storage, storage_key=KEY, sha256=sha256, cache_dir=cache_dir)
    assert folder == cache_dir / sha256
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in stories_dir.iterdir())
    weights = "model.safetensors"
    assert (folder / weights).read_bytes() == (stories_dir / weights).read_bytes()
    assert [p.name for p in cache_dir.iterdir()] == [sha256]  # no temp folder left behind

    storage.delete(KEY)  # a cache hit never touches storage
    again = local_model_folder(storage, storage_key=KEY, sha256=sha256, cache_dir=cache_dir)
    assert again == folder and (again / "config.json").is_file()


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_a_single_top_level_folder_is_the_model_in_any_compression(storage, cache_dir,
                                                                   stories_dir, mode):
    sha256 = _put(storage, tar_folder(stories_dir, top="stories260k", mode=mode))
    folder = local_model_folder(storage, storage_key=KEY, sha256=sha256, cache_dir=cache_dir)
    assert folder == cache_dir / sha256 and (folder / "config.json").is_file()
    weights = "model.safetensors"
    assert (folder / weights).read_bytes() == (stories_dir / weights).read_bytes()


def test_checksum_mismatch_is_refused_and_nothing_is_cached(storage, cache_dir, stories_dir):
    _put(storage, tar_folder(stories_dir))
    with pytest.raises(ModelArchiveError, match="changed since it was registered") as err:
        local_model_folder(storage, storage_key=KEY, sha256="0" * 64, cache_dir=cache_dir)
    assert isinstance(err.value.__cause__, ChecksumMismatch)
    assert list(cache_dir.iterdir()) == []


def test_a_missing_object_is_a_model_archive_error(storage, cache_dir):
    with pytest.raises(ModelArchiveError, match="not in storage"):
        local_model_folder(storage, storage_key=KEY, sha256="a" * 64, cache_dir=cache_dir)


def test_a_sha256_that_is_not_hex_never_becomes_a_path(storage, cache_dir):
    with pytest.raises(ValueError, match="64 lowercase hex"):
        local_model_folder(storage, storage_key=KEY, sha256="../../etc", cache_dir=cache_dir)


@pytest.mark.parametrize("members,why", [
    ([_file("config.json"), _file("../escaped.txt")], "unsafe member name"),
    ([_file("config.json"), _file("/tmp/absolute.txt")], "unsafe member name"),
    ([_file("config.json"), _symlink("weights.safetensors", "../../escaped")], "unsafe member"),
    ([_file("config.json"), _symlink("weights.safetensors", "/etc/passwd")], "unsafe member"),
])
def test_path_traversal_archives_are_refused(storage, cache_dir, tmp_path, members, why):
    sha256 = _put(storage, tar_members(*members))
    with pytest.raises(ModelArchiveError, match=why):
        local_model_folder(storage, storage_key=KEY, sha256=sha256, cache_dir=cache_dir)
    assert list(cache_dir.iterdir()) == []
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "escaped").exists()


@pytest.mark.parametrize("target", [
    "../{first}/model.safetensors",  # inside the temp folder; a sibling cache folder once renamed
    "sub/../../{first}/config.json",  # the same, by a longer way
    ".",  # a folder: a link through it could climb out by a way its name does not show
])
def test_a_link_out_of_the_models_own_folder_is_refused(storage, cache_dir, stories_dir, target):
    first = _put(storage, tar_folder(stories_dir), key="models/first.tar.gz")
    local_model_folder(storage, storage_key="models/first.tar.gz", sha256=first,
                       cache_dir=cache_dir)
    config = (stories_dir / "config.json").read_bytes()
    sha256 = _put(storage, tar_members(_file("model/config.json", config), _file("model/sub/x"),
                                       _symlink("model/weights", target.format(first=first))))
    with pytest.raises(ModelArchiveError, match="not a file inside the model's folder"):
        local_model_folder(storage, storage_key=KEY, sha256=sha256, cache_dir=cache_dir)
    assert [p.name for p in cache_dir.iterdir()] == [first]


def test_a_link_to_a_file_inside_the_model_is_kept(storage, cache_dir, stories_dir):
    config = (stories_dir / "config.json").read_bytes()
    sha256 = _put(storage, tar_members(_file("model/config.json", config),
                                       _file("model/sub/weights.bin", b"w"),
                                       _symlink("model/weights.bin", "sub/weights.bin"),
                                       _symlink("model/sub/config.json", "../config.json")))
    folder = local_model_folder(storage, storage_key=KEY, sha256=sha256, cache_dir=cache_dir)
    assert (folder / "weights.bin").read_bytes() == b"w"
    assert (folder / "sub" / "config.json").read_bytes() == config


def test_an_archive_unpacking_past_the_limit_is_refused(storage, cache_dir):
    sha256 = _put(storage, tar_members(_file("config.json"), _file("big.bin", b"x" * 2048)))
    with pytest.raises(ModelArchiveError, match="unpacks to more than 1024 bytes"):
        local_model_folder(storage, storage_key=KEY, sha256=sha256, cache_dir=cache_dir,
                           max_unpacked_bytes=1024)
    assert list(cache_dir.iterdir()) == []


@pytest.mark.parametrize("make", [
    lambda folder: b"not a tar archive at all" * 100,
    lambda folder: tar_folder(folder)[:20_000],  # a truncated gzip stream
])
def test_corrupt_archives_are_model_archive_errors(storage, cache_dir, stories_dir, make):
    sha256 = _put(storage, make(stories_dir))
    with pytest.raises(ModelArchiveError):
        local_model_folder(storage, storage_key=KEY, sha256=sha256, cache_dir=cache_dir)
    assert list(cache_dir.iterdir()) == []


def test_an_archive_without_config_json_is_refused(storage, cache_dir, stories_dir):
    sha256 = _put(storage, tar_folder(stories_dir, skip=("config.json",)))
    with pytest.raises(ModelArchiveError, match="no config.json"):
        local_model_folder(storage, storage_key=KEY, sha256=sha256, cache_dir=cache_dir)
    assert list(cache_dir.iterdir()) == []


class _RacedStorage(LocalStorage):
    """Storage whose download lets another process finish unpacking the same archive first."""

    def __init__(self, root: Path, winner: Path) -> None:
        super().__init__(root)
        self.winner = winner

    @contextmanager
    def open_local(self, key: str, *, sha256: str | None = None) -> Iterator[Path]:
        with super().open_local(key, sha256=sha256) as path:
            self.winner.mkdir()
            (self.winner / "config.json").write_text('{"winner": true}')
            yield path


def test_losing_an_unpack_race_keeps_the_winners_folder(tmp_path, cache_dir, stories_dir):
    data = tar_folder(stories_dir)
    sha256 = hashlib.sha256(data).hexdigest()
    cache_dir.mkdir()
    storage = _RacedStorage(tmp_path / "storage", winner=cache_dir / sha256)
    storage.put(KEY, data)
    folder = local_model_folder(storage, storage_key=KEY, sha256=sha256, cache_dir=cache_dir)
    assert folder == cache_dir / sha256
    assert (folder / "config.json").read_text() == '{"winner": true}'
    assert [p.name for p in cache_dir.iterdir()] == [sha256]  # the loser's copy is gone


@pytest.fixture
def worker_env(tmp_path, monkeypatch) -> Iterator[Path]:
    """SPEFT_* for this worker process: a storage folder and a model cache in tmp_path."""
    monkeypatch.setenv("SPEFT_STORAGE_URL", f"file://{tmp_path / 'storage'}")
    monkeypatch.setenv("SPEFT_MODEL_CACHE_DIR", str(tmp_path / "model-cache"))
    get_settings.cache_clear()
    tasks.get_storage.cache_clear()
    try:
        yield tmp_path
    finally:
        tasks.get_storage.cache_clear()
        monkeypatch.undo()
        get_settings.cache_clear()


def test_model_reference_of_a_stored_model_is_a_folder_load_model_loads(worker_env, stories_dir):
    sha256 = _put(tasks.get_storage(), tar_folder(stories_dir, top="stories260k"))
    url = f"sqlite:///{worker_env / 'speft.db'}"
    upgrade_database(url)
    engine = make_engine(url)
    try:
        with session_factory(engine)() as session:
            session.add(RegisteredModel(id="archived-llama", task="causal_lm",
                                        params=STORIES_PARAMS, storage_key=KEY, sha256=sha256))
            session.flush()
            reference = model_reference(session, storage=tasks.get_storage(),
                                        model_id="archived-llama",
                                        cache_dir=worker_env / "model-cache")
    finally:
        engine.dispose()
    assert Path(reference) == worker_env / "model-cache" / sha256
    model = load_model(Path(reference), "causal_lm")
    assert sum(p.numel() for p in model.parameters()) == STORIES_PARAMS
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape[:2] == (1, 3) and torch.isfinite(logits).all()
