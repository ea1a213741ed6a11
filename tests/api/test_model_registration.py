"""`speft models register`: server-side model folders, confined to SPEFT_MODELS_DIR."""
from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from api.cli import app as cli


@pytest.fixture()
def env(tmp_path, stories_dir, monkeypatch):
    root = tmp_path / "models"
    shutil.copytree(stories_dir, root / "tiny-llama")
    (tmp_path / "outside").mkdir()
    shutil.copytree(stories_dir, tmp_path / "outside" / "llama")
    monkeypatch.setenv("SPEFT_DATABASE_URL", f"sqlite:///{tmp_path / 'speft.db'}")
    monkeypatch.setenv("SPEFT_STORAGE_URL", f"file://{tmp_path / 'storage'}")
    monkeypatch.setenv("SPEFT_MODELS_DIR", str(root))
    monkeypatch.delenv("SPEFT_API_KEYS", raising=False)
    return tmp_path


def test_register_a_folder_inside_the_models_dir_then_list_it(env, make_client):
    result = CliRunner().invoke(cli, ["models", "register", "my-llama", "--path", "tiny-llama",
                                      "--task", "causal_lm"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["id"] == "my-llama" and row["params"] == 260_032
    client = make_client(database_url=f"sqlite:///{env / 'speft.db'}")
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models["my-llama"]["task"] == "causal_lm"


@pytest.mark.parametrize("path,why", [
    ("../outside/llama", "outside SPEFT_MODELS_DIR"),
    ("{abs_outside}", "outside SPEFT_MODELS_DIR"),
    ("missing", "not a HF model folder"),
])
def test_register_refuses_escapes_and_non_models(env, path, why):
    path = path.format(abs_outside=env / "outside" / "llama")
    result = CliRunner().invoke(cli, ["models", "register", "x", "--path", path, "--task",
                                      "causal_lm"])
    assert result.exit_code == 2
    assert why in result.output and "(path)" in result.output


def test_register_refuses_a_bad_id_and_task(env):
    bad_id = CliRunner().invoke(cli, ["models", "register", "../x", "--path", "tiny-llama"])
    assert bad_id.exit_code == 2 and "(model)" in bad_id.output
    bad_task = CliRunner().invoke(cli, ["models", "register", "x", "--path", "tiny-llama",
                                        "--task", "translation"])
    assert bad_task.exit_code == 2 and "(task)" in bad_task.output
