"""A paused job whose checkpoints were deleted resumes from what is left (or from scratch) and
saves those steps again: deleted checkpoints do not block a step's new one."""
from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from api.core.models import Checkpoint, JobStatus
from api.core.storage.local import LocalStorage
from api.core.unit_of_work import unit_of_work
from api.services.checkpoints import record_checkpoint
from tests.api.conftest import ClientFactory, RunJob
from tests.api.test_job_transitions import make_job
from tests.api.test_checkpoints_api import sst2
from tests.api.test_jobs_api import ALICE, KEYS, upload


@pytest.mark.parametrize("delete", ["newest", "all"])
def test_resume_after_deleting_a_paused_jobs_checkpoints_saves_those_steps_again(
        make_client: ClientFactory, run_job: RunJob, data_dir: Path, monkeypatch, delete: str):
    from worker import recorder

    client = make_client(api_keys=KEYS)
    client.app.state.enqueue_job = lambda job_id, device: None
    monkeypatch.setattr(recorder, "CANCEL_POLL_S", 0.0)
    body = {"model": "minilm-l6", "training_file": upload(client, sst2(data_dir, "train", 64)),
            "method": {"type": "speft", "speft": {"metric": "magnitude", "density": 2000,
                                                  "scoring_examples": 16}},
            "hyperparameters": {"n_epochs": 2, "batch_size": 16, "max_length": 32,
                                "checkpoint_every_steps": 2}}
    job_id = client.post("/v1/fine_tuning/jobs", json=body, headers=ALICE).json()["id"]
    on_step = recorder.JobRecorder.on_step

    def pause_at_step_5(self, report):
        on_step(self, report)
        if report.step == 5:
            client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=ALICE)

    monkeypatch.setattr(recorder.JobRecorder, "on_step", pause_at_step_5)
    run_job(job_id)
    checkpoints = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints",
                             headers=ALICE).json()["data"]
    assert [c["step_number"] for c in checkpoints] == [5, 4, 2]
    doomed = checkpoints if delete == "all" else checkpoints[:2]  # steps 5 and 4
    for checkpoint in doomed:
        answer = client.delete(f"/v1/fine_tuning/jobs/{job_id}/checkpoints/{checkpoint['id']}",
                               headers=ALICE)
        assert answer.status_code == 200, answer.text

    monkeypatch.setattr(recorder.JobRecorder, "on_step", on_step)
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/resume", headers=ALICE).status_code == 200
    run_job(job_id)
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=ALICE).json()
    assert job["status"] == "succeeded", job
    steps = [c["step_number"] for c in client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints",
                                                  headers=ALICE).json()["data"]]
    assert 4 in steps and 8 in steps  # step 4 saved again, after its deleted one
    events = [e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{job_id}/events",
                                               headers=ALICE).json()["data"]]
    assert ("resumed from step 2" in events) == (delete == "newest")


def test_a_step_gets_one_live_checkpoint_and_any_number_of_deleted_ones(db_sessions, tmp_path):
    storage = LocalStorage(tmp_path / "storage")
    job_id = make_job(db_sessions, JobStatus.RUNNING)

    def save(step: int) -> str:
        with db_sessions() as session, unit_of_work(session):
            row = record_checkpoint(session, storage=storage, job_id=job_id, attempt=0, step=step,
                                    metrics={}, delta=b"delta", state=b"state", keep=None)
            return row.id

    first = save(2)
    second = save(2)  # an attempt resumed from an older state: the new one replaces the old
    with db_sessions() as session:
        rows = {row.id: row for row in session.scalars(select(Checkpoint))}
    assert rows[first].deleted_at is not None and rows[second].deleted_at is None
    assert not (tmp_path / "storage" / rows[first].storage_key).exists()

    with db_sessions() as session:  # the database itself keeps one live row per step
        twin = Checkpoint(tenant_id=rows[second].tenant_id, job_id=job_id, base_model="minilm-l6",
                          step=2, attempt=0, metrics={}, bytes=1, sha256="0" * 64,
                          storage_key="checkpoints/twin.safetensors")
        session.add(twin)
        with pytest.raises(IntegrityError):
            session.commit()
