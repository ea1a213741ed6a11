"""A running job's phase over HTTP, and a stop requested while it scores salience: the worker's
real `run_job` on MiniLM, in a thread, beside the app serving the same database."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.conftest import ClientFactory, RunJob
from tests.api.test_jobs_api import create, upload

SCORED = 1024  # the default scoring_examples: scoring them takes minutes on a busy CPU
WAIT_S = 300.0
STOPPED_WITHIN_S = 20.0  # a cancel poll (2 s) and one scoring micro-batch, on a loaded machine


def wait_for(client: httpx.Client, job_id: str, done: Callable[[dict[str, Any]], bool],
             what: str, output: Callable[[], str] = str) -> dict[str, Any]:
    """GET the job until `done(job)`; fail saying `what` (and `output()`) after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while True:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if done(job):
            return job
        assert time.monotonic() < deadline, f"not {what} after {WAIT_S:.0f} s: {job}\n{output()}"
        time.sleep(0.1)


@pytest.mark.parametrize("action, ended", [("cancel", "cancelled"), ("pause", "paused")])
def test_a_stop_asked_during_salience_scoring_ends_the_job_within_seconds(
        make_client: ClientFactory, run_job: RunJob, data_dir: Path, action: str,
        ended: str) -> None:
    client = make_client()
    client.app.state.enqueue_job = lambda job_id, device: None
    lines = (data_dir / "sst2" / "train.jsonl").read_bytes().splitlines(keepends=True)[:SCORED]
    job_id = create(client, {
        "model": "minilm-l6", "training_file": upload(client, b"".join(lines), headers={}),
        "method": {"type": "speft", "speft": {"metric": "gradient", "scoring_batch_size": 8,
                                              "head_warmup_steps": 0}},
        "hyperparameters": {"n_epochs": 1, "batch_size": 16, "max_length": 32}},
        headers={}).json()["id"]
    worker = threading.Thread(target=run_job, args=(job_id,))
    worker.start()
    try:
        scoring = wait_for(client, job_id, lambda job: job["progress"]["phase"] == (
            "scoring_salience") and job["progress"]["phase_step"] > 0, "scoring salience")
        progress = scoring["progress"]
        assert (progress["phase_total"], progress["total_steps"]) == (SCORED, SCORED // 16)
        assert progress["phase_step"] < SCORED and progress["stale"] is False
        asked = time.monotonic()
        answer = client.post(f"/v1/fine_tuning/jobs/{job_id}/{action}", headers={})
        assert answer.status_code == 200, answer.text
        worker.join(timeout=WAIT_S)
        stopped_after = time.monotonic() - asked
    finally:
        worker.join()
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == ended and stopped_after < STOPPED_WITHIN_S, (job, stopped_after)
    assert (job["progress"]["phase"], job["estimated_finish"]) == (None, None)
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]
    messages = [event["message"] for event in events]
    assert "phase: scoring_salience" in messages
    assert "mask selected" not in messages  # stopped inside scoring, not after it
