"""Base models registered from a storage key: a tar archive of a HF folder, hashed and cached."""
from __future__ import annotations

import hashlib
import json
import tarfile

import pytest
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from api.cli import app as cli
from api.core.models import RegisteredModel
from api.core.storage import LocalStorage, Storage, open_storage_url
from api.errors import InvalidRequest
from api.services.models import register_local_model, register_stored_model
from tests.worker.test_model_cache import STORIES_PARAMS, tar_folder, tar_members

KEY = "models/tiny-llama.tar.gz"


@pytest.fixture
def storage(tmp_path) -> LocalStorage:
    return LocalStorage(tmp_path / "storage")


def _register(session: Session, storage: Storage, cache_dir, *, key: str = KEY,
              model_id: str = "archived-llama", task: str = "causal_lm") -> RegisteredModel:
    return register_stored_model(session, storage=storage, model_id=model_id, task=task,
                                 storage_key=key, cache_dir=cache_dir)


def test_register_a_stored_archive_records_key_checksum_and_params(
        db_sessions: sessionmaker[Session], storage, tmp_path, stories_dir):
    data = tar_folder(stories_dir)
    storage.put(KEY, data)
    with db_sessions() as session, session.begin():
        _register(session, storage, tmp_path / "cache")
    with db_sessions() as session:
        row = session.get(RegisteredModel, "archived-llama")
        assert (row.task, row.params, row.local_path) == ("causal_lm", STORIES_PARAMS, None)
        assert row.storage_key == KEY and row.sha256 == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "cache" / row.sha256 / "config.json").is_file()  # unpacked once, kept


def test_re_registering_as_a_folder_forgets_the_archive(
        db_sessions: sessionmaker[Session], storage, tmp_path, stories_dir):
    storage.put(KEY, tar_folder(stories_dir))
    with db_sessions() as session, session.begin():
        _register(session, storage, tmp_path / "cache")
    with db_sessions() as session, session.begin():
        register_local_model(session, model_id="archived-llama", task="causal_lm",
                             path=stories_dir, models_dir=stories_dir.parent)
    with db_sessions() as session:
        row = session.get(RegisteredModel, "archived-llama")
        assert (row.storage_key, row.sha256, row.local_path) == (None, None, str(stories_dir))


def test_register_from_s3(db_sessions: sessionmaker[Session], s3_storage_url, s3_endpoint,
                          tmp_path, stories_dir):
    storage = open_storage_url(s3_storage_url, s3_endpoint_url=s3_endpoint)
    stored = storage.put(KEY, tar_folder(stories_dir, top="stories260k"))
    with db_sessions() as session, session.begin():
        row = _register(session, storage, tmp_path / "cache")
        assert (row.sha256, row.params) == (stored.sha256, STORIES_PARAMS)


@pytest.mark.parametrize("key,why", [
    ("models/missing.tar", "no object is stored under models/missing.tar"),
    ("../outside.tar", "'..' segment"),
    ("/abs.tar", "is absolute"),
])
def test_a_missing_or_malformed_key_is_an_invalid_storage_key(
        db_sessions: sessionmaker[Session], storage, tmp_path, key, why):
    with db_sessions() as session, pytest.raises(InvalidRequest, match=why) as err:
        _register(session, storage, tmp_path / "cache", key=key)
    assert err.value.param == "storage_key"


@pytest.mark.parametrize("make,why", [
    (lambda folder: tar_folder(folder, skip=("config.json",)), "no config.json"),
    (lambda folder: tar_folder(folder, skip=("model.safetensors",)),
     "not a HF model folder with safetensors weights"),
    (lambda folder: tar_members((tarfile.TarInfo("../config.json"), b"{}")),
     "unsafe member name"),
    (lambda folder: b"plain text, not a tar archive" * 50, "not a readable tar archive"),
])
def test_an_archive_that_is_not_a_model_is_refused_at_register(
        db_sessions: sessionmaker[Session], storage, tmp_path, stories_dir, make, why):
    storage.put(KEY, make(stories_dir))
    with db_sessions() as session, pytest.raises(InvalidRequest, match=why) as err:
        _register(session, storage, tmp_path / "cache")
    assert err.value.param == "storage_key"
    with db_sessions() as session:
        assert session.get(RegisteredModel, "archived-llama") is None


def test_register_checks_the_id_and_task_first(db_sessions: sessionmaker[Session], storage,
                                               tmp_path):
    with db_sessions() as session:
        with pytest.raises(InvalidRequest) as bad_id:
            _register(session, storage, tmp_path / "cache", model_id="../x")
        with pytest.raises(InvalidRequest) as bad_task:
            _register(session, storage, tmp_path / "cache", task="translation")
    assert (bad_id.value.param, bad_task.value.param) == ("model", "task")


# --- the CLI ------------------------------------------------------------------------------------


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEFT_DATABASE_URL", f"sqlite:///{tmp_path / 'speft.db'}")
    monkeypatch.setenv("SPEFT_STORAGE_URL", f"file://{tmp_path / 'storage'}")
    monkeypatch.setenv("SPEFT_MODEL_CACHE_DIR", str(tmp_path / "model-cache"))
    monkeypatch.setenv("SPEFT_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.delenv("SPEFT_API_KEYS", raising=False)
    return tmp_path


def test_cli_registers_a_storage_key_then_the_api_lists_it(env, stories_dir, make_client):
    stored = LocalStorage(env / "storage").put(KEY, tar_folder(stories_dir))
    result = CliRunner().invoke(cli, ["models", "register", "archived-llama", "--storage-key",
                                      KEY, "--task", "causal_lm"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row == {"id": "archived-llama", "object": "model", "task": "causal_lm",
                   "params": STORIES_PARAMS, "dtype": "auto", "path": None,
                   "storage_key": KEY, "sha256": stored.sha256}
    assert (env / "model-cache" / stored.sha256 / "model.safetensors").is_file()
    client = make_client(database_url=f"sqlite:///{env / 'speft.db'}")
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models["archived-llama"]["task"] == "causal_lm"


@pytest.mark.parametrize("args", [[], ["--path", "x", "--storage-key", KEY]])
def test_cli_needs_exactly_one_of_path_and_storage_key(env, args):
    result = CliRunner().invoke(cli, ["models", "register", "x", *args])
    assert result.exit_code == 2
    assert "exactly one of --path and --storage-key" in result.output


def test_cli_reports_a_missing_storage_key(env):
    result = CliRunner().invoke(cli, ["models", "register", "x", "--storage-key", "models/no.tar",
                                      "--task", "causal_lm"])
    assert result.exit_code == 2
    assert "(storage_key)" in result.output and "no object is stored" in result.output
