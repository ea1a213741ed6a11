"""The `speft` CLI against a real `speft serve` process (tmp SQLite, tmp storage, open mode)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from api.cli import app
from api.cli.client_commands import job_body
from api.cli.launcher import is_loopback, worker_devices
from tests.fixtures.s3 import _free_port

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 30.0
JOBS_ROUTES = (REPO / "api" / "routes" / "jobs.py").exists()

runner = CliRunner()


def _server_env(tmp: Path) -> dict[str, str]:
    """The environment of a throwaway open-mode server on tmp SQLite, storage and broker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPEFT_")}
    env.update(SPEFT_DATABASE_URL=f"sqlite:///{tmp / 'speft.db'}",
               SPEFT_STORAGE_URL=f"file://{tmp / 'storage'}", SPEFT_API_KEYS="",
               SPEFT_BROKER_URL="", SPEFT_MODELS_DIR="", SPEFT_WEBHOOK_ALLOW_LOOPBACK="true")
    return env


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of a real `speft serve` subprocess, stopped after the module."""
    tmp = tmp_path_factory.mktemp("cli-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp / "serve.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "api.cli", "serve", "--port", str(port)],
                               cwd=REPO, env=_server_env(tmp), stdout=log,
                               stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"speft serve exited: {(tmp / 'serve.log').read_text()}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"speft serve did not answer: {(tmp / 'serve.log').read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=15)
        log.close()


def speft(url: str, *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process against `url`: (exit code, stdout, stderr)."""
    result = runner.invoke(app, list(args), env={"SPEFT_BASE_URL": url, "SPEFT_API_KEY": ""})
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def sst2_subset(data_dir: Path, tmp_path: Path) -> Path:
    """The first 40 lines of sst2 train."""
    lines = (data_dir / "sst2" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:40]
    path = tmp_path / "sst2-small.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_files_upload_prints_the_file(server_url: str, sst2_subset: Path) -> None:
    code, stdout, _ = speft(server_url, "files", "upload", str(sst2_subset))
    assert code == 0
    file = json.loads(stdout)
    assert file["id"].startswith("file-") and file["num_examples"] == 40


def test_bad_upload_names_the_line_and_exits_1(server_url: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "positive"}\nnot json\n', encoding="utf-8")
    code, _, stderr = speft(server_url, "files", "upload", str(bad))
    assert code == 1
    assert "error" in stderr and "line 2" in stderr


def test_jobs_list_works_when_empty(server_url: str) -> None:
    if not JOBS_ROUTES:
        pytest.skip("api/routes/jobs.py is not there yet")
    code, stdout, _ = speft(server_url, "jobs", "list")
    assert code == 0 and "0 job(s)" in stdout


@pytest.mark.skipif(not JOBS_ROUTES, reason="api/routes/jobs.py is not there yet")
def test_jobs_create_then_get(server_url: str, sst2_subset: Path) -> None:
    _, stdout, _ = speft(server_url, "files", "upload", str(sst2_subset))
    file_id = json.loads(stdout)["id"]
    code, stdout, stderr = speft(server_url, "jobs", "create", "--model", "minilm-l6",
                                 "--training-file", file_id, "--epochs", "1")
    assert code == 0, stderr
    job = json.loads(stdout)
    code, stdout, _ = speft(server_url, "jobs", "get", job["id"])
    assert code == 0 and json.loads(stdout)["id"] == job["id"]


def test_unknown_job_is_a_clear_error(server_url: str) -> None:
    code, _, stderr = speft(server_url, "jobs", "get", "ftjob-missing")
    assert code == 1 and "error" in stderr


def test_closed_port_names_the_base_url() -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    code, _, stderr = speft(url, "jobs", "list")
    assert code == 1
    assert "cannot reach the speft API" in stderr and url in stderr


def test_serve_refuses_a_public_host_in_open_mode(tmp_path: Path) -> None:
    env = {k: v for k, v in _server_env(tmp_path).items() if k.startswith("SPEFT_")}
    result = runner.invoke(app, ["serve", "--host", "0.0.0.0"], env=env)
    assert result.exit_code == 2
    assert "open mode binds to 127.0.0.1 only; set SPEFT_API_KEYS" in result.stderr


def test_loopback_hosts() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")


def test_job_body_flags_override_the_spec(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"model": "minilm-l6", "training_file": "file-a",
                                "method": {"type": "speft", "speft": {"density": 0.5}},
                                "hyperparameters": {"n_epochs": 3}}), encoding="utf-8")
    body = job_body(spec, {"density": 0.01, "n_epochs": None, "batch_size": 8,
                           "training_file": "file-b", "device": "cuda"})
    assert body["method"]["speft"]["density"] == 0.01
    assert body["hyperparameters"] == {"n_epochs": 3, "batch_size": 8}
    assert (body["training_file"], body["device"]) == ("file-b", "cuda")


def test_worker_device_resolution() -> None:
    assert worker_devices("auto", cuda_available=False) == ["cpu"]
    assert worker_devices("auto", cuda_available=True) == ["cuda"]
    assert worker_devices("all", cuda_available=False) == ["cpu"]
    assert worker_devices("all", cuda_available=True) == ["cpu", "cuda"]
    assert worker_devices("cuda", cuda_available=True) == ["cuda"]
    with pytest.raises(ValueError, match="no CUDA device"):
        worker_devices("cuda", cuda_available=False)
    with pytest.raises(ValueError, match="expected cpu, cuda, auto or all"):
        worker_devices("tpu", cuda_available=True)


def test_worker_refuses_cuda_without_a_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    env = {k: v for k, v in _server_env(tmp_path).items() if k.startswith("SPEFT_")}
    result = runner.invoke(app, ["worker", "--device", "cuda"], env=env)
    assert result.exit_code == 2
    assert "error (--device):" in result.stderr and "no CUDA device" in result.stderr


def test_jobs_pause_resume_and_checkpoints(server_url: str, sst2_subset: Path) -> None:
    _, stdout, _ = speft(server_url, "files", "upload", str(sst2_subset))
    _, stdout, _ = speft(server_url, "jobs", "create", "--model", "minilm-l6",
                         "--training-file", json.loads(stdout)["id"])
    job_id = json.loads(stdout)["id"]  # no worker runs here: it stays queued
    code, stdout, stderr = speft(server_url, "jobs", "pause", job_id)
    assert code == 0 and json.loads(stdout)["status"] == "paused", stderr
    code, stdout, _ = speft(server_url, "jobs", "checkpoints", job_id)
    assert code == 0 and "0 checkpoint(s)" in stdout
    code, stdout, _ = speft(server_url, "jobs", "resume", job_id)
    assert code == 0 and json.loads(stdout)["status"] == "queued"
    code, _, stderr = speft(server_url, "jobs", "resume", job_id)
    assert code == 1 and "only a paused job can be resumed" in stderr


def test_webhooks_create_list_deliveries_delete(server_url: str) -> None:
    code, stdout, stderr = speft(server_url, "webhooks", "create", "http://127.0.0.1:9/hook",
                                 "--event", "fine_tuning.job.failed")
    assert code == 0, stderr
    endpoint = json.loads(stdout)
    assert endpoint["secret"].startswith("whsec_")
    assert endpoint["events"] == ["fine_tuning.job.failed"]
    code, stdout, _ = speft(server_url, "webhooks", "list")
    assert code == 0 and endpoint["id"] in stdout and "whsec_" not in stdout
    code, stdout, _ = speft(server_url, "webhooks", "deliveries", endpoint["id"])
    assert code == 0 and "0 deliveries" in stdout
    code, _, stderr = speft(server_url, "webhooks", "create", "ftp://example.com/")
    assert code == 1 and "url" in stderr
    code, stdout, _ = speft(server_url, "webhooks", "delete", endpoint["id"])
    assert code == 0 and json.loads(stdout)["deleted"] is True
