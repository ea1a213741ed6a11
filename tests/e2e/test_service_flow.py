"""End to end: a real `speft serve` and `speft worker` (two processes) train a job over REST.

Parametrized over two stacks:
- `production`: PostgreSQL, Redis broker (own queue), S3 storage (moto), API keys.
- `embedded`: SQLite file, embedded SQLite broker, file:// storage, open mode.

The adapter downloaded from the service is loaded with speft_core, applied to the base MiniLM
classifier (its predictions change) and reverted (the base comes back bit for bit); the service's
own `/v1/classifications` with that adapter answers what the base with it merged answers.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

from api.client import SpeftClient
from speft_core.delta import Delta, apply_delta, load_delta, merge_delta, revert_delta
from speft_core.models import load_model, load_tokenizer, registered_models
from tests.fixtures.processes import service_env, spawn_cli, stop, unavailable, wait_ready
from tests.fixtures.s3 import S3_TEST_CREDENTIALS, _free_port

READY_TIMEOUT_S = 60.0
JOB_TIMEOUT_S = 180.0
TERMINAL = {"succeeded", "failed", "cancelled"}
API_KEY = "e2e-key"
REDIS_DB = 13
TRAIN_LINES = 96
DEV_LINES = 48
DENSITY = 0.01


@dataclass
class Stack:
    """A running deployment: its base URL, the key to call it with, and its processes."""

    url: str
    api_key: str | None
    processes: dict[str, subprocess.Popen[bytes]]
    logs: dict[str, Path]

    def output(self) -> str:
        """Both processes' output, for failure messages."""
        parts = []
        for name, path in self.logs.items():
            text = path.read_text(errors="replace") if path.exists() else "(no log)"
            parts.append(f"----- {name} (exit {self.processes[name].poll()}) -----\n{text[-8000:]}")
        return "\n".join(parts)


def _redis_up() -> bool:
    try:
        return bool(redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def _production_env(request: pytest.FixtureRequest, queue: str) -> dict[str, str]:
    if not _redis_up():
        unavailable("Redis is not reachable on 127.0.0.1:6379")
    database_url = request.getfixturevalue("postgres_url")  # skips/fails itself when down
    endpoint = request.getfixturevalue("s3_endpoint")
    storage_url = request.getfixturevalue("s3_storage_url")
    env = service_env()
    env.update(S3_TEST_CREDENTIALS)
    env.update(SPEFT_DATABASE_URL=database_url,
               SPEFT_BROKER_URL=f"redis://127.0.0.1:6379/{REDIS_DB}",
               SPEFT_QUEUE_PREFIX=f"{queue}-", SPEFT_STORAGE_URL=storage_url,
               SPEFT_S3_ENDPOINT_URL=endpoint, SPEFT_API_KEYS=f"{API_KEY}:acme")
    return env


def _embedded_env(tmp: Path, queue: str) -> dict[str, str]:
    env = service_env()
    env.update(SPEFT_DATABASE_URL=f"sqlite:///{tmp / 'db' / 'speft.db'}",
               SPEFT_STORAGE_URL=f"file://{tmp / 'storage'}", SPEFT_BROKER_URL="",
               SPEFT_QUEUE_PREFIX=f"{queue}-", SPEFT_API_KEYS="")
    (tmp / "db").mkdir()
    return env


@contextlib.contextmanager
def running_stack(env: dict[str, str], api_key: str | None, tmp: Path) -> Iterator[Stack]:
    """A real `speft serve` (started first: it migrates the database) and a real `speft worker`
    on `env`, logs in `tmp`, stopped afterwards."""
    port = _free_port()
    logs = {"serve": tmp / "serve.log", "worker": tmp / "worker.log"}
    handles = {name: path.open("wb") for name, path in logs.items()}
    processes: dict[str, subprocess.Popen[bytes]] = {}
    stack = Stack(f"http://127.0.0.1:{port}", api_key, processes, logs)
    try:
        processes["serve"] = spawn_cli(["serve", "--port", str(port)], env, tmp,
                                       handles["serve"])
        wait_ready(stack.url, list(processes.values()), stack.output, READY_TIMEOUT_S)
        processes["worker"] = spawn_cli(["worker", "--device", "cpu", "--loglevel", "WARNING"],
                                        env, tmp, handles["worker"])
        yield stack
    finally:
        for process in reversed(list(processes.values())):
            stop(process)
        for handle in handles.values():
            handle.close()


@pytest.fixture(params=["production", "embedded"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    """A real API process and a real worker process for one stack, stopped afterwards."""
    queue = f"e2e-{uuid.uuid4().hex[:8]}"
    if request.param == "production":
        env, api_key = _production_env(request, queue), API_KEY
    else:
        env, api_key = _embedded_env(tmp_path, queue), None
    try:
        with running_stack(env, api_key, tmp_path) as running:
            yield running
    finally:
        if request.param == "production":  # the queue's kombu keys, left in Redis by Celery
            client = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
            keys = list(client.scan_iter(match=f"*{queue}*"))
            if keys:
                client.delete(*keys)


def _head(source: Path, lines: int, out: Path) -> Path:
    text = source.read_text(encoding="utf-8").splitlines()[:lines]
    out.write_text("\n".join(text) + "\n", encoding="utf-8")
    return out


def _wait_job(client: SpeftClient, stack: Stack, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        job = client.get_job(job_id)
        if job["status"] in TERMINAL:
            return job
        if stack.processes["worker"].poll() is not None:
            pytest.fail(f"the worker exited while {job_id} was {job['status']}:\n{stack.output()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{job_id} still {job['status']} after {JOB_TIMEOUT_S:.0f}s:\n"
                        f"{stack.output()}")
        time.sleep(0.5)


def _logits(model: torch.nn.Module, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits.clone()


def _assert_served_like_merged(served: dict[str, Any], delta: Delta, path: Path,
                               texts: list[str]) -> None:
    """The service's answer equals the base with the downloaded delta merged (head included)."""
    model = load_model(path, "classification", labels=delta.labels).eval()
    merge_delta(model, delta)
    encoded = load_tokenizer(path)(texts, padding=True, truncation=True, max_length=512,
                                   return_tensors="pt")
    with torch.inference_mode():
        want = torch.softmax(model(**encoded).logits.float(), -1)
    assert [row["index"] for row in served["data"]] == list(range(len(texts)))
    got = torch.tensor([[row["probs"][label] for label in delta.labels]
                        for row in served["data"]])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert [row["label"] for row in served["data"]] == [delta.labels[i]
                                                        for i in want.argmax(-1).tolist()]


def test_train_download_apply_revert(stack: Stack, data_dir: Path, tmp_path: Path) -> None:
    train = _head(data_dir / "sst2" / "train.jsonl", TRAIN_LINES, tmp_path / "train.jsonl")
    dev = _head(data_dir / "sst2" / "dev.jsonl", DEV_LINES, tmp_path / "dev.jsonl")
    with SpeftClient(stack.url, stack.api_key, timeout=30) as client:
        train_file = client.upload_file(train)
        dev_file = client.upload_file(dev)
        assert train_file["num_examples"] == TRAIN_LINES
        assert dev_file["num_examples"] == DEV_LINES
        job = client.create_job({
            "model": "minilm-l6", "training_file": train_file["id"],
            "validation_file": dev_file["id"],
            "method": {"type": "speft", "speft": {"metric": "gradient", "density": DENSITY,
                                                  "scoring_examples": 64}},
            "hyperparameters": {"n_epochs": 1, "batch_size": 16, "learning_rate": 5e-3,
                                "max_length": 32},
        })
        job = _wait_job(client, stack, job["id"])
        assert job["status"] == "succeeded", f"{job}\n{stack.output()}"
        assert job["adapter_id"]

        metrics = client.job_metrics(job["id"])
        assert any(row.get("train_loss") is not None for row in metrics), metrics
        events = client._json("GET", f"/v1/fine_tuning/jobs/{job['id']}/events")
        assert events["data"], events

        adapter = client.get_adapter(job["adapter_id"])
        assert adapter["object"] == "adapter" and adapter["job_id"] == job["id"]
        assert adapter["base_model"] == "minilm-l6"
        assert adapter["metric"] == "gradient"
        assert len(adapter["sha256"]) == 64
        delta_path = tmp_path / "delta.safetensors"
        written = client.download_adapter(adapter["id"], delta_path)
        served_texts = [json.loads(line)["text"] for line in dev.read_text().splitlines()[:3]]
        served = client._json("POST", "/v1/classifications", json={
            "model": "minilm-l6", "adapter": adapter["id"], "input": served_texts})

    data = delta_path.read_bytes()
    assert written == len(data) == adapter["bytes"]
    assert hashlib.sha256(data).hexdigest() == adapter["sha256"]
    delta = load_delta(data)
    assert delta.metadata["metric"] == "gradient"
    assert adapter["nnz"] == delta.nnz > 0
    assert sorted(delta.labels) == ["negative", "positive"]

    source = registered_models()["minilm-l6"]
    _assert_served_like_merged(served, delta, source.path, served_texts)
    torch.manual_seed(0)
    model = load_model(source.path, "classification", labels=delta.labels).eval()
    tokenizer = load_tokenizer(source.path)
    targeted = sum(model.get_submodule(name).weight.numel() for name in delta.modules)
    assert delta.nnz == pytest.approx(DENSITY * targeted, rel=0.02, abs=2)

    texts = [json.loads(line)["text"] for line in dev.read_text().splitlines()[:8]]
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base_logits = _logits(model, tokenizer, texts)
    apply_delta(model, delta)
    tuned_logits = _logits(model, tokenizer, texts)
    assert not torch.allclose(base_logits, tuned_logits)
    assert not torch.allclose(base_logits.softmax(-1), tuned_logits.softmax(-1), atol=1e-3)
    revert_delta(model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    assert torch.equal(_logits(model, tokenizer, texts), base_logits)
    worker_log = stack.logs["worker"].read_text(errors="replace")
    assert "Traceback" not in worker_log, worker_log
