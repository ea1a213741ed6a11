"""`speft models register`: server-side model folders, confined to SPEFT_MODELS_DIR."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from api.cli import app as cli
from speft_core.delta import load_delta


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


def test_a_model_registered_in_bfloat16_trains_and_serves_in_it(env, make_client, run_job,
                                                                data_dir):
    result = CliRunner().invoke(cli, ["models", "register", "bf16-llama", "--path", "tiny-llama",
                                      "--task", "causal_lm", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["dtype"] == "bfloat16"
    client = make_client(database_url=f"sqlite:///{env / 'speft.db'}")
    client.app.state.enqueue_job = lambda job_id, device: None
    assert client.get("/v1/models/bf16-llama").json()["dtype"] == "bfloat16"
    assert client.get("/v1/models/minilm-l6").json()["dtype"] == "auto"

    lines = (data_dir / "tinyshakespeare" / "train.jsonl").read_bytes().splitlines()[:32]
    file_id = client.post("/v1/files", data={"purpose": "fine-tune"},
                          files={"file": ("t.jsonl", b"\n".join(lines) + b"\n")}).json()["id"]
    created = client.post("/v1/fine_tuning/jobs", json={  # no dtype: 'auto', the model's own
        "model": "bf16-llama", "training_file": file_id,
        "method": {"type": "speft", "speft": {"metric": "gradient", "density": 0.01,
                                              "scoring_examples": 8}},
        "hyperparameters": {"n_epochs": 1, "batch_size": 8, "max_length": 32}})
    assert created.status_code == 201, created.text
    run_job(created.json()["id"])
    job = client.get(f"/v1/fine_tuning/jobs/{created.json()['id']}").json()
    assert job["status"] == "succeeded", job
    adapter = job["fine_tuned_model"]
    delta = load_delta(client.get(f"/v1/adapters/{adapter}/content").content)
    assert delta.metadata["base_dtype"] == "bfloat16"
    assert {values.dtype for _, values in delta.modules.values()} == {torch.float32}

    served = client.post("/v1/completions", json={"model": "bf16-llama", "adapter": adapter,
                                                   "prompt": "First Citizen:", "max_tokens": 4,
                                                   "temperature": 0})
    assert served.status_code == 200, served.text  # the base is held in bfloat16, as trained
