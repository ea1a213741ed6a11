"""A job's checkpoints through the API: listed in OpenAI's shape, pruned to keep_checkpoints
(the best kept), downloaded, served by id like an adapter, deleted; the job's adapter is the
best one. The job runs in-process through the worker's own run_job."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from speft_core.delta import load_delta
from tests.api.conftest import ClientFactory, RunJob
from tests.api.test_jobs_api import ALICE, BOB, KEYS, upload


def sst2(data_dir: Path, split: str, count: int) -> bytes:
    return b"".join((data_dir / "sst2" / f"{split}.jsonl").read_bytes().splitlines(True)[:count])


def test_checkpoints_are_listed_pruned_served_and_deleted(make_client: ClientFactory,
                                                          run_job: RunJob, data_dir: Path):
    client = make_client(api_keys=KEYS)
    client.app.state.enqueue_job = lambda job_id, device: None
    body = {"model": "minilm-l6", "training_file": upload(client, sst2(data_dir, "train", 64)),
            "validation_file": upload(client, sst2(data_dir, "dev", 32)),
            "method": {"type": "speft", "speft": {"metric": "magnitude", "density": 2000,
                                                  "scoring_examples": 16}},
            "hyperparameters": {"n_epochs": 2, "batch_size": 16, "max_length": 32,
                                "checkpoint_every_steps": 2, "keep_checkpoints": 2,
                                "learning_rate": 3e-3}}
    job_id = client.post("/v1/fine_tuning/jobs", json=body, headers=ALICE).json()["id"]
    run_job(job_id)
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=ALICE).json()
    assert job["status"] == "succeeded", job

    listing = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=ALICE).json()
    data = listing["data"]
    steps = [c["step_number"] for c in data]
    assert steps == sorted(steps, reverse=True) and steps[:2] == [8, 6]  # newest first
    assert listing["first_id"] == data[0]["id"] and listing["last_id"] == data[-1]["id"]
    for checkpoint in data:
        assert checkpoint["object"] == "fine_tuning.job.checkpoint"
        assert checkpoint["fine_tuning_job_id"] == job_id
        assert checkpoint["fine_tuned_model_checkpoint"] == checkpoint["id"]
        assert set(checkpoint["metrics"]) == {"train_loss", "valid_loss", "valid_accuracy"}
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=ALICE).json()["data"]
    created = [e for e in events if e["message"] == "checkpoint created"]
    assert [e["data"]["step"] for e in created] == [2, 4, 6, 8]
    losses = {e["data"]["step"]: e["data"]["metrics"]["valid_loss"] for e in created}
    best_step = min(losses, key=lambda step: (losses[step], step))
    assert set(steps) == {8, 6, best_step}  # pruned to the newest two, plus the best
    assert job["result_step"] == best_step
    storage_root = Path(client.app.state.storage.root) / "checkpoints"
    assert len(list(storage_root.glob("*.safetensors"))) == len(steps)
    assert len(list(storage_root.glob("*.state"))) == len(steps)

    # the job's adapter is the best checkpoint's delta (select: best is the default)
    best = next(c for c in data if c["step_number"] == best_step)
    content = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints/{best['id']}/content",
                         headers=ALICE)
    assert content.status_code == 200 and len(content.content) == best["bytes"]
    adapter = load_delta(client.get(f"/v1/adapters/{job['fine_tuned_model']}/content",
                                    headers=ALICE).content)
    for name, (indices, values) in load_delta(content.content).modules.items():
        assert torch.equal(adapter.modules[name][0], indices)
        assert torch.equal(adapter.modules[name][1], values)

    newest = data[0]["id"]
    for field in ({"model": "minilm-l6", "adapter": newest}, {"model": newest}):
        served = client.post("/v1/classifications", json={**field, "input": "a fine film"},
                             headers=ALICE)
        assert served.status_code == 200, served.text
    assert client.post("/v1/classifications", json={"model": newest, "input": "x"},
                       headers=BOB).status_code == 404  # another tenant's
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints",
                      headers=BOB).status_code == 404

    deleted = client.delete(f"/v1/fine_tuning/jobs/{job_id}/checkpoints/{newest}", headers=ALICE)
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    after = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=ALICE).json()
    assert newest not in {c["id"] for c in after["data"]}
    assert client.post("/v1/classifications", json={"model": newest, "input": "x"},
                       headers=ALICE).status_code == 404
    assert len(list(storage_root.glob("*"))) == 2 * (len(steps) - 1)  # delta and state gone


def test_pause_checkpoints_and_stops_and_resume_continues_to_the_same_adapter(
        make_client: ClientFactory, run_job: RunJob, data_dir: Path, monkeypatch):
    from worker import recorder

    client = make_client(api_keys=KEYS)
    client.app.state.enqueue_job = lambda job_id, device: None
    monkeypatch.setattr(recorder, "CANCEL_POLL_S", 0.0)
    body = {"model": "minilm-l6", "training_file": upload(client, sst2(data_dir, "train", 64)),
            "method": {"type": "speft", "speft": {"metric": "magnitude", "density": 2000,
                                                  "scoring_examples": 16}},
            "hyperparameters": {"n_epochs": 2, "batch_size": 16, "max_length": 32}}
    paused_id, calm_id = (client.post("/v1/fine_tuning/jobs", json=body, headers=ALICE).json()["id"]
                          for _ in range(2))
    on_step = recorder.JobRecorder.on_step

    def pause_at_step_3(self, report):
        on_step(self, report)
        if self.job_id == paused_id and report.step == 3:
            answer = client.post(f"/v1/fine_tuning/jobs/{paused_id}/pause", headers=ALICE)
            assert answer.json()["status"] == "pause_requested", answer.text

    monkeypatch.setattr(recorder.JobRecorder, "on_step", pause_at_step_3)
    run_job(paused_id)
    job = client.get(f"/v1/fine_tuning/jobs/{paused_id}", headers=ALICE).json()
    assert job["status"] == "paused", job
    steps = [c["step_number"] for c in client.get(
        f"/v1/fine_tuning/jobs/{paused_id}/checkpoints", headers=ALICE).json()["data"]]
    assert steps == [3]  # the pause's checkpoint (the epoch's would be at step 4)
    assert client.post(f"/v1/fine_tuning/jobs/{paused_id}/pause",
                       headers=ALICE).json()["status"] == "paused"  # idempotent
    assert client.post(f"/v1/fine_tuning/jobs/{calm_id}/resume",
                       headers=ALICE).status_code == 409  # queued, not paused

    resumed = client.post(f"/v1/fine_tuning/jobs/{paused_id}/resume", headers=ALICE)
    assert resumed.status_code == 200 and resumed.json()["status"] == "queued", resumed.text
    run_job(paused_id)
    run_job(calm_id)
    jobs = [client.get(f"/v1/fine_tuning/jobs/{j}", headers=ALICE).json()
            for j in (paused_id, calm_id)]
    assert [j["status"] for j in jobs] == ["succeeded", "succeeded"], jobs
    # 64 examples of up to 32 tokens, twice; the resumed job counts the paused attempt's too
    assert 64 * 2 * 4 < jobs[0]["trained_tokens"] == jobs[1]["trained_tokens"] <= 64 * 2 * 32
    assert jobs[0]["estimated_finish"] is None
    events = [e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{paused_id}/events",
                                               headers=ALICE).json()["data"]]
    assert "job paused at step 3" in events and "resumed from step 3" in events
    deltas = [load_delta(client.get(f"/v1/adapters/{j['fine_tuned_model']}/content",
                                    headers=ALICE).content) for j in jobs]
    for name, (indices, values) in deltas[1].modules.items():
        assert torch.equal(deltas[0].modules[name][0], indices)
        assert torch.equal(deltas[0].modules[name][1], values)
    assert client.post(f"/v1/fine_tuning/jobs/{paused_id}/pause",
                       headers=ALICE).status_code == 409  # finished


def test_a_succeeded_job_has_its_per_step_metrics_as_a_csv_result_file(
        make_client: ClientFactory, run_job: RunJob, data_dir: Path):
    import csv
    import io

    client = make_client(api_keys=KEYS)
    client.app.state.enqueue_job = lambda job_id, device: None
    job_id = client.post("/v1/fine_tuning/jobs", headers=ALICE, json={
        "model": "minilm-l6", "training_file": upload(client, sst2(data_dir, "train", 32)),
        "validation_file": upload(client, sst2(data_dir, "dev", 16)),
        "method": {"type": "speft", "speft": {"metric": "magnitude", "density": 500,
                                              "scoring_examples": 8}},
        "hyperparameters": {"n_epochs": 2, "batch_size": 16, "max_length": 16}}).json()["id"]
    run_job(job_id)
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=ALICE).json()
    assert job["status"] == "succeeded" and len(job["result_files"]) == 1
    file_id = job["result_files"][0]
    meta = client.get(f"/v1/files/{file_id}", headers=ALICE).json()
    assert meta["purpose"] == "fine-tune-results" and meta["filename"] == "step_metrics.csv"
    rows = list(csv.DictReader(io.StringIO(
        client.get(f"/v1/files/{file_id}/content", headers=ALICE).text)))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    metrics = client.get(f"/v1/fine_tuning/jobs/{job_id}/metrics", headers=ALICE).json()["data"]
    assert [float(r["train_loss"]) for r in rows] == pytest.approx(
        [m["train_loss"] for m in metrics])
    assert [bool(r["valid_loss"]) for r in rows] == [False, True, False, True]  # epoch ends
    assert client.get(f"/v1/files/{file_id}", headers=BOB).status_code == 404
