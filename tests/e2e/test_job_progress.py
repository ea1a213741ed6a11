"""What a user sees of a running job, on a real `speft serve` and `speft worker` (embedded
stack): `speft jobs create --wait` names each phase as the job enters it, and a job whose worker
was killed says so (`progress.stale`) instead of showing an estimated finish that has passed."""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from api.cli import app as cli
from api.cli import client_commands
from tests.api.test_job_phases import wait_for
from tests.e2e.test_service_flow import Stack, _embedded_env, running_stack
from tests.fixtures.processes import kill

pytestmark = pytest.mark.slow

HEARTBEAT_TIMEOUT_S = 4.0  # the API calls a running job stale after this much silence


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    env = _embedded_env(tmp_path, f"progress-{uuid.uuid4().hex[:8]}")
    env.update(SPEFT_HEARTBEAT_INTERVAL_S="0.5",
               SPEFT_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_TIMEOUT_S))
    with running_stack(env, None, tmp_path) as running:
        yield running


def _training_file(client: httpx.Client, data_dir: Path, lines: int) -> str:
    content = b"".join((data_dir / "sst2" / "train.jsonl").read_bytes()
                       .splitlines(keepends=True)[:lines])
    answer = client.post("/v1/files", data={"purpose": "fine-tune"},
                         files={"file": ("train.jsonl", content)})
    assert answer.status_code == 200, answer.text
    return answer.json()["id"]


def test_jobs_create_wait_names_each_phase_as_the_job_enters_it(
        stack: Stack, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_commands, "POLL_INTERVAL_S", 0.2)
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        training = _training_file(client, data_dir, 256)
    result = CliRunner().invoke(cli, [
        "jobs", "create", "--model", "minilm-l6", "--training-file", training, "--metric",
        "gradient", "--epochs", "1", "--batch-size", "16", "--max-length", "32", "--wait"],
        env={"SPEFT_BASE_URL": stack.url, "SPEFT_API_KEY": ""})
    assert result.exit_code == 0, f"{result.output}\n{stack.output()}"
    job_id = result.output.split("created ", 1)[1].split()[0]
    shown = [line.removeprefix(f"{job_id}: ").strip() for line in result.output.splitlines()
             if line.startswith(f"{job_id}: ")]
    expected = ["loading", "scoring_salience", "selecting_mask", "training"]
    assert [phase for phase in shown if phase in expected][:4] == expected, result.output


def test_a_job_whose_worker_was_killed_shows_stale_progress_and_no_estimate(
        stack: Stack, data_dir: Path) -> None:
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        created = client.post("/v1/fine_tuning/jobs", json={
            "model": "minilm-l6", "training_file": _training_file(client, data_dir, 480),
            "method": {"type": "speft", "speft": {"metric": "magnitude", "density": 2000,
                                                  "scoring_examples": 32,
                                                  "head_warmup_steps": 0}},
            "hyperparameters": {"n_epochs": 1, "batch_size": 16, "max_length": 32}})
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        training = wait_for(client, job_id, lambda job: job["progress"]["step"] >= 3
                            and job["estimated_finish"] is not None, "training with an estimate",
                            stack.output)
        assert training["progress"]["phase"] == "training"
        assert training["progress"]["stale"] is False
        assert training["estimated_finish"] >= time.time() - 1  # never in the past
        kill(stack.processes["worker"])  # the machine is lost: no worker, no reconciler
        dead = wait_for(client, job_id, lambda job: job["progress"]["stale"],
                        "stale after its worker was killed", stack.output)
    assert dead["status"] == "running"  # until a reconciler re-queues or fails it
    assert dead["estimated_finish"] is None and dead["progress"]["phase_estimated_finish"] is None
    assert dead["progress"]["heartbeat_at"] <= time.time() - HEARTBEAT_TIMEOUT_S
    assert client_commands.job_phase(dead).startswith("no word from its worker since ")
