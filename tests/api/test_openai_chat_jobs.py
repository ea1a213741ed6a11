"""A team leaving OpenAI: its function-calling training file, uploaded and trained unchanged,
with no length setting (max_length "auto"). The job runs in-process through the worker."""
from __future__ import annotations

from pathlib import Path

from tests.api.conftest import ClientFactory, RunJob
from tests.api.test_jobs_api import ALICE, KEYS, upload

TOOL_SET = Path(__file__).parents[1] / "data" / "tool_calls20" / "train.jsonl"


def test_an_openai_function_calling_file_trains_with_no_length_setting(
        make_client: ClientFactory, run_job: RunJob, stories_dir: Path):
    client = make_client(api_keys=KEYS)
    client.app.state.enqueue_job = lambda job_id, device: None
    body = {"model": "stories-260k", "training_file": upload(client, TOOL_SET.read_bytes()),
            "hyperparameters": {"n_epochs": 2, "batch_size": 10}}
    created = client.post("/v1/fine_tuning/jobs", json=body, headers=ALICE)
    assert created.is_success, created.text
    assert created.json()["hyperparameters"]["max_length"] == "auto"
    run_job(created.json()["id"])
    job = client.get(f"/v1/fine_tuning/jobs/{created.json()['id']}", headers=ALICE).json()
    assert job["status"] == "succeeded", job
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=ALICE).json()["data"]
    assert not [e for e in events if "dropped" in e["message"]]  # each is 183-451 tokens


def test_max_length_auto_or_an_integer_is_accepted_and_anything_else_is_a_422(
        make_client: ClientFactory):
    client = make_client(api_keys=KEYS)
    client.app.state.enqueue_job = lambda job_id, device: None
    file_id = upload(client, TOOL_SET.read_bytes())
    for value, accepted in (("auto", True), (256, True), ("long", False), (1, False)):
        response = client.post("/v1/fine_tuning/jobs", headers=ALICE, json={
            "model": "stories-260k", "training_file": file_id,
            "hyperparameters": {"max_length": value}})
        assert response.is_success == accepted, (value, response.text)
        if not accepted:
            assert response.status_code == 422, response.text
            assert response.json()["error"]["param"] == "hyperparameters.max_length"
