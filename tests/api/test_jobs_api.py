"""`/v1/fine_tuning/jobs`: creation checks, idempotency, enqueue after commit, paging, cancel, events
and metrics, tenant isolation; plus one job really sent to the embedded broker."""
from __future__ import annotations

import base64
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.core.models import Job, JobStatus
from api.services.jobs import claim_job, finish_failed, record_eval, record_progress
from tests.api.conftest import ClientFactory

ALICE = {"Authorization": "Bearer ka"}
BOB = {"Authorization": "Bearer kb"}
KEYS = "ka:alice,kb:bob"
CLASSIFICATION = b"".join(json.dumps({"text": f"text {i}", "label": i % 2}).encode() + b"\n"
                          for i in range(8))
CAUSAL_LM = b"".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}).encode() + b"\n"
                     for i in range(8))


class EnqueueRecorder:
    """Stands in for the broker: records job ids (and their devices) and checks each row is
    already committed."""

    def __init__(self, client: TestClient) -> None:
        self.client, self.sent, self.devices = client, [], {}

    def __call__(self, job_id: str, device: str) -> None:
        self.devices[job_id] = device
        with self.client.app.state.sessions() as session:  # a NEW session sees only committed rows
            status = session.scalar(select(Job.status).where(Job.id == job_id))
        assert status == JobStatus.QUEUED, f"{job_id} not committed as queued before enqueue"
        self.sent.append(job_id)


@pytest.fixture
def client(make_client: ClientFactory) -> TestClient:
    """Two tenants (alice, bob); enqueue replaced by an EnqueueRecorder."""
    client = make_client(api_keys=KEYS)
    client.app.state.enqueue_job = EnqueueRecorder(client)
    return client


def upload(client: TestClient, content: bytes = CLASSIFICATION,
           headers: dict[str, str] = ALICE) -> str:
    """Upload a dataset; its id."""
    response = client.post("/v1/files", files={"file": ("d.jsonl", content)},
                           data={"purpose": "fine-tune"}, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()["id"]


def create(client: TestClient, body: dict[str, Any], headers: dict[str, str] = ALICE) -> Any:
    """POST a job."""
    return client.post("/v1/fine_tuning/jobs", json=body, headers=headers)


@pytest.fixture
def body(client: TestClient) -> dict[str, Any]:
    """A valid job body on alice's classification file."""
    return {"model": "minilm-l6", "training_file": upload(client)}


def test_create_is_201_queued_and_enqueued_once_after_commit(client, body):
    response = create(client, {**body, "suffix": "sst2", "metadata": {"k": "v"},
                               "method": {"type": "speft", "speft": {"density": 0.05}}})
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["object"] == "fine_tuning.job" and job["id"].startswith("ftjob-")
    assert (job["status"], job["model"], job["task"]) == ("queued", "minilm-l6", "classification")
    assert job["training_file"] == body["training_file"] and job["validation_file"] is None
    assert job["method"]["speft"]["density"] == 0.05 and job["method"]["type"] == "speft"
    assert job["hyperparameters"]["n_epochs"] >= 1
    assert job["error"] is None and job["adapter_id"] is None
    assert job["progress"] | {"step": 0, "total_steps": None, "phase": None} == job["progress"]
    assert isinstance(job["created_at"], int) and job["started_at"] is None
    assert (job["suffix"], job["metadata"]) == ("sst2", {"k": "v"})
    assert client.app.state.enqueue_job.sent == [job["id"]]
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=ALICE).json() == job


def test_validation_file_and_causal_lm_task(client):
    train, valid = upload(client, CAUSAL_LM), upload(client, CAUSAL_LM)
    response = create(client, {"model": "stories-260k", "training_file": train,
                               "validation_file": valid})
    assert response.status_code == 201, response.text
    assert (response.json()["task"], response.json()["validation_file"]) == ("causal_lm", valid)


def test_enqueue_failure_still_creates_a_queued_job(client, body):
    def broker_down(job_id: str, device: str) -> None:
        raise ConnectionError("broker refused")

    client.app.state.enqueue_job = broker_down
    response = create(client, body)
    assert response.status_code == 201 and response.json()["status"] == "queued"
    events = client.get(f"/v1/fine_tuning/jobs/{response.json()['id']}/events",
                        headers=ALICE).json()["data"]
    assert events[-1]["message"] == "enqueue failed" and events[-1]["level"] == "warning"
    assert "broker refused" in events[-1]["data"]["error"]


@pytest.mark.parametrize("change,status,param", [
    ({"method": {"type": "speft", "speft": {"metric": "nope"}}}, 422, "method.speft.metric"),
    ({"method": {"type": "speft", "speft": {"density": 0}}}, 422, "method.speft.density"),
    ({"method": {"type": "speft", "speft": {"density": 1.5}}}, 422, "method.speft.density"),
    ({"method": {"type": "speft", "speft": {"density": -3}}}, 422, "method.speft.density"),
    ({"hyperparameters": {"batch_size": 0}}, 422, "hyperparameters.batch_size"),
    ({"hyperparameters": {"batch_size": 100_000}}, 422, "hyperparameters.batch_size"),
    ({"hyperparameters": {"n_epochs": 0}}, 422, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"n_epochs": 10_000}}, 422, "hyperparameters.n_epochs"),
    ({"model": "no-such-model"}, 400, "model"),
    ({"training_file": "file-doesnotexist"}, 400, "training_file"),
    ({"validation_file": "file-doesnotexist"}, 400, "validation_file"),
    ({"task": "causal_lm"}, 400, "training_file"),
])
def test_bad_job_is_refused_naming_the_field(client, body, change, status, param):
    response = create(client, {**body, **change})
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param
    assert client.app.state.enqueue_job.sent == []
    assert client.get("/v1/fine_tuning/jobs", headers=ALICE).json()["data"] == []


def test_unknown_model_lists_valid_ids(client, body):
    message = create(client, {**body, "model": "gpt-9"}).json()["error"]["message"]
    assert "minilm-l6" in message and "stories-260k" in message


def test_wrong_task_file_says_both_tasks(client, body):
    lm_file = upload(client, CAUSAL_LM)
    error = create(client, {**body, "training_file": lm_file}).json()["error"]
    assert error["param"] == "training_file"
    assert error["message"] == (f"file {lm_file} is causal_lm data; "
                                "the job's task is classification")


def test_other_tenants_and_deleted_files_are_unknown(client, body):
    bobs = upload(client, headers=BOB)
    response = create(client, {**body, "training_file": bobs})
    assert response.status_code == 400 and response.json()["error"]["param"] == "training_file"
    client.delete(f"/v1/files/{body['training_file']}", headers=ALICE)
    response = create(client, body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "training_file"


def test_idempotency_key_replays_the_same_job_and_refuses_another_body(client, body):
    key = {**ALICE, "Idempotency-Key": "abc-1"}
    first = create(client, body, headers=key)
    assert first.status_code == 201
    replay = create(client, body, headers=key)
    assert replay.status_code == 200 and replay.json() == first.json()
    assert client.app.state.enqueue_job.sent == [first.json()["id"]]  # enqueued once

    other = create(client, {**body, "suffix": "other"}, headers=key)
    assert other.status_code == 409
    assert other.json()["error"]["param"] == "Idempotency-Key"

    bobs_body = {"model": "minilm-l6", "training_file": upload(client, headers=BOB)}
    bobs = create(client, bobs_body, headers={**BOB, "Idempotency-Key": "abc-1"})
    assert bobs.status_code == 201 and bobs.json()["id"] != first.json()["id"]  # keys per tenant


def test_list_pages_newest_first_with_after_limit_and_status(client, body):
    ids = [create(client, body).json()["id"] for _ in range(5)]
    newest_first = ids[::-1]
    client.post(f"/v1/fine_tuning/jobs/{ids[1]}/cancel", headers=ALICE)

    page = client.get("/v1/fine_tuning/jobs?limit=2", headers=ALICE).json()
    assert [j["id"] for j in page["data"]] == newest_first[:2] and page["has_more"] is True
    page = client.get(f"/v1/fine_tuning/jobs?limit=2&after={newest_first[1]}",
                      headers=ALICE).json()
    assert [j["id"] for j in page["data"]] == newest_first[2:4] and page["has_more"] is True
    page = client.get(f"/v1/fine_tuning/jobs?limit=2&after={newest_first[3]}",
                      headers=ALICE).json()
    assert [j["id"] for j in page["data"]] == newest_first[4:] and page["has_more"] is False
    everything = client.get("/v1/fine_tuning/jobs", headers=ALICE).json()
    assert [j["id"] for j in everything["data"]] == newest_first and not everything["has_more"]

    cancelled = client.get("/v1/fine_tuning/jobs?status=cancelled", headers=ALICE).json()
    assert [j["id"] for j in cancelled["data"]] == [ids[1]]
    queued = client.get(f"/v1/fine_tuning/jobs?status=queued&after={ids[2]}",
                        headers=ALICE).json()
    assert [j["id"] for j in queued["data"]] == [ids[0]]
    assert client.get("/v1/fine_tuning/jobs", headers=BOB).json()["data"] == []


@pytest.mark.parametrize("query,status,param", [
    ("limit=0", 422, "limit"), ("limit=101", 422, "limit"), ("status=sleeping", 422, "status"),
    ("after=ftjob-nosuchjob", 400, "after"),
])
def test_bad_list_query_is_refused_naming_it(client, query, status, param):
    response = client.get(f"/v1/fine_tuning/jobs?{query}", headers=ALICE)
    assert response.status_code == status and response.json()["error"]["param"] == param


def test_other_tenants_job_as_cursor_is_400(client, body):
    job_id = create(client, body).json()["id"]
    response = client.get(f"/v1/fine_tuning/jobs?after={job_id}", headers=BOB)
    assert response.status_code == 400 and response.json()["error"]["param"] == "after"


def test_cancel_queued_job_then_cancel_again_is_409(client, body):
    job_id = create(client, body).json()["id"]
    response = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=ALICE)
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert response.json()["finished_at"] is not None
    again = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=ALICE)
    assert again.status_code == 409 and again.json()["error"]["param"] == "job_id"


def test_cancel_running_job_requests_cancellation(client, body):
    job_id = create(client, body).json()["id"]
    with client.app.state.sessions.begin() as session:
        claim_job(session, job_id=job_id, worker="w1")
    for _ in range(2):  # asking twice is harmless while the worker stops
        response = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=ALICE)
        assert response.status_code == 200 and response.json()["status"] == "cancel_requested"


def test_failed_job_shows_its_error(client, body):
    job_id = create(client, body).json()["id"]
    with client.app.state.sessions.begin() as session:
        finish_failed(session, job_id=job_id, code="user_error", message="bad data", param="label")
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=ALICE).json()
    assert job["status"] == "failed"
    assert job["error"] == {"code": "user_error", "message": "bad data", "param": "label"}
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=ALICE).status_code == 409


def test_events_oldest_first_and_metrics_merged_by_step(client, body):
    job_id = create(client, body).json()["id"]
    with client.app.state.sessions.begin() as session:  # what a worker would write
        claim_job(session, job_id=job_id, worker="w1")
        for step in (1, 2):
            record_progress(session, job_id=job_id, step=step, total=4, train_loss=1.0 / step,
                            lr=1e-3, grad_norm=0.5)
        record_eval(session, job_id=job_id, step=2, metrics={"eval_loss": 0.4,
                                                             "eval_accuracy": 0.75})
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=ALICE).json()
    assert [e["message"] for e in events["data"]] == [
        "job created", "job queued", "job started", "evaluation at step 2"]
    first = events["data"][0]
    assert set(first) == {"id", "object", "level", "type", "message", "data", "created_at"}
    assert (first["type"], first["level"], first["data"]) == (
        "status", "info", {"status": "validating_files"})
    assert events["data"][-1]["data"] == {"step": 2, "eval_loss": 0.4, "eval_accuracy": 0.75}

    metrics = client.get(f"/v1/fine_tuning/jobs/{job_id}/metrics", headers=ALICE).json()
    assert metrics["data"] == [
        {"step": 1, "train_loss": 1.0, "lr": 1e-3, "grad_norm": 0.5,
         "eval_loss": None, "eval_accuracy": None},
        {"step": 2, "train_loss": 0.5, "lr": 1e-3, "grad_norm": 0.5,
         "eval_loss": 0.4, "eval_accuracy": 0.75},
    ]
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=ALICE).json()
    assert job["status"] == "running"
    assert (job["progress"]["step"], job["progress"]["total_steps"]) == (2, 4)
    assert isinstance(job["started_at"], int)


@pytest.mark.parametrize("method,suffix", [
    ("get", ""), ("post", "/cancel"), ("get", "/events"), ("get", "/metrics"),
])
def test_cross_tenant_job_is_404(client, body, method, suffix):
    job_id = create(client, body).json()["id"]
    response = getattr(client, method)(f"/v1/fine_tuning/jobs/{job_id}{suffix}", headers=BOB)
    assert response.status_code == 404 and response.json()["error"]["param"] == "job_id"
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=ALICE).json()["status"] == "queued"


def test_job_really_reaches_the_embedded_broker(make_client: ClientFactory, tmp_path: Path):
    client = make_client()  # open mode, default enqueue: kombu's SQLite transport beside the DB
    training_file = upload(client, headers={})
    response = create(client, {"model": "minilm-l6", "training_file": training_file}, headers={})
    assert response.status_code == 201, response.text
    with sqlite3.connect(tmp_path / "broker.sqlite") as broker:
        rows = broker.execute(
            "SELECT q.name, m.payload FROM kombu_message m JOIN kombu_queue q ON q.id = m.queue_id"
        ).fetchall()
    assert len(rows) == 1
    queue, payload = rows[0]
    message = json.loads(payload)
    assert queue == client.app.state.settings.queue_for("cpu")
    assert message["headers"]["task"] == "speft.run_job"
    args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    assert args == [response.json()["id"]]


def test_each_device_kind_has_its_own_broker_queue(make_client: ClientFactory, tmp_path: Path):
    client = make_client(queue_prefix="speft-")  # real embedded broker
    training_file = upload(client, headers={})
    ids = {device: create(client, {"model": "minilm-l6", "training_file": training_file,
                                   "device": device}, headers={}).json()["id"]
           for device in ("cuda", "cpu")}
    with sqlite3.connect(tmp_path / "broker.sqlite") as broker:
        rows = broker.execute(
            "SELECT q.name, m.payload FROM kombu_message m JOIN kombu_queue q ON q.id = m.queue_id"
        ).fetchall()
    sent = {json.loads(base64.b64decode(json.loads(payload)["body"]))[0][0]: queue
            for queue, payload in rows}
    assert sent == {ids["cuda"]: "speft-cuda", ids["cpu"]: "speft-cpu"}


def test_device_defaults_to_the_setting_and_is_shown(make_client: ClientFactory):
    client = make_client(api_keys=KEYS, default_device="cuda")
    client.app.state.enqueue_job = recorder = EnqueueRecorder(client)
    training_file = upload(client)
    implicit = create(client, {"model": "minilm-l6", "training_file": training_file}).json()
    explicit = create(client, {"model": "minilm-l6", "training_file": training_file,
                               "device": "cpu"}).json()
    assert (implicit["device"], explicit["device"]) == ("cuda", "cpu")
    assert recorder.devices == {implicit["id"]: "cuda", explicit["id"]: "cpu"}
    assert client.get(f"/v1/fine_tuning/jobs/{implicit['id']}", headers=ALICE).json()[
        "device"] == "cuda"


def test_unknown_device_is_422_naming_it(client, body):
    response = create(client, {**body, "device": "tpu"})
    assert response.status_code == 422 and response.json()["error"]["param"] == "device"
    assert client.get("/v1/fine_tuning/jobs", headers=ALICE).json()["data"] == []


def test_create_replay_and_page_on_both_backends(backend_settings: dict[str, Any],
                                                 make_client: ClientFactory):
    client = make_client(api_keys=KEYS, **backend_settings)
    client.app.state.enqueue_job = EnqueueRecorder(client)
    body = {"model": "minilm-l6", "training_file": upload(client)}
    key = {**ALICE, "Idempotency-Key": "k"}
    first = create(client, body, headers=key)
    assert first.status_code == 201 and create(client, body, headers=key).status_code == 200
    assert create(client, {**body, "suffix": "x"}, headers=key).status_code == 409
    second = create(client, body).json()["id"]
    page = client.get(f"/v1/fine_tuning/jobs?limit=1&after={second}", headers=ALICE).json()
    assert [j["id"] for j in page["data"]] == [first.json()["id"]] and not page["has_more"]
    assert client.app.state.enqueue_job.sent == [first.json()["id"], second]


def test_auto_hyperparameters_are_chosen_from_the_training_set_and_shown(client):
    lines = b"".join(json.dumps({"text": f"text {i}", "label": i % 2}).encode() + b"\n"
                     for i in range(1500))
    body = {"model": "minilm-l6", "training_file": upload(client, lines),
            "hyperparameters": {"n_epochs": "auto", "batch_size": "auto",
                                "learning_rate": "auto", "max_length": 16}}
    created = client.post("/v1/fine_tuning/jobs", json=body, headers=ALICE)
    assert created.status_code == 201, created.text
    hyper = created.json()["hyperparameters"]
    assert (hyper["n_epochs"], hyper["batch_size"], hyper["learning_rate"]) == (2, 32, 0.01)
    events = client.get(f"/v1/fine_tuning/jobs/{created.json()['id']}/events",
                        headers=ALICE).json()["data"]
    chosen = next(e for e in events if e["message"] == "auto hyperparameters chosen")["data"]
    assert chosen["n_epochs"] == 2 and chosen["training_examples"] == 1500
    small = client.post("/v1/fine_tuning/jobs", headers=ALICE, json={
        "model": "minilm-l6", "training_file": upload(client),
        "hyperparameters": {"batch_size": "auto"}}).json()["hyperparameters"]
    assert small["batch_size"] == 4 and small["n_epochs"] == 3  # 8 examples; n_epochs as given
    bad = client.post("/v1/fine_tuning/jobs", headers=ALICE, json={
        "model": "minilm-l6", "training_file": upload(client),
        "hyperparameters": {"n_epochs": "many"}})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "hyperparameters.n_epochs"


def test_early_stopping_without_a_validation_file_is_a_400_naming_it(client):
    answer = client.post("/v1/fine_tuning/jobs", headers=ALICE, json={
        "model": "minilm-l6", "training_file": upload(client),
        "hyperparameters": {"early_stopping": {"patience": 2}}})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "hyperparameters.early_stopping"
    zero = client.post("/v1/fine_tuning/jobs", headers=ALICE, json={
        "model": "minilm-l6", "training_file": upload(client),
        "hyperparameters": {"checkpoint_every_steps": 0}})
    assert zero.status_code == 422
    assert zero.json()["error"]["param"] == "hyperparameters.checkpoint_every_steps"
