"""A file an unfinished job uses cannot be deleted (409 naming the job), also when the job is
created while the delete runs (the file rows are locked by both); a file gone anyway fails the
job as `user_error` naming the field (tests/worker/test_tasks.py), never `internal_error`."""
from __future__ import annotations

import threading
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from api.core.models import Job, JobStatus
from api.errors import Conflict
from api.schemas.jobs import JobCreate
from api.services import files, job_creation
from tests.api.conftest import ClientFactory
from tests.api.test_bad_input import assert_refused, labelled, upload


@pytest.fixture
def client(backend_client: TestClient) -> TestClient:
    backend_client.app.state.enqueue_job = lambda job_id, device: None
    return backend_client


def _job(client: TestClient, **files_: str) -> str:
    response = client.post("/v1/fine_tuning/jobs", json={"model": "minilm-l6", **files_})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _set_status(client: TestClient, job_id: str, status: JobStatus) -> None:
    with client.app.state.sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(status=status))


@pytest.mark.parametrize("status", [JobStatus.VALIDATING_FILES, JobStatus.QUEUED,
                                    JobStatus.RUNNING, JobStatus.CANCEL_REQUESTED])
@pytest.mark.parametrize("field", ["training_file", "validation_file"])
def test_a_file_an_unfinished_job_uses_is_409_naming_the_job(
        client: TestClient, status: JobStatus, field: str) -> None:
    used, other = (upload(client, labelled("a", "b")).json()["id"] for _ in range(2))
    job_id = _job(client, **({"training_file": used} if field == "training_file"
                             else {"training_file": other, "validation_file": used}))
    _set_status(client, job_id, status)
    response = client.delete(f"/v1/files/{used}")
    assert_refused(response, 409, "file_id", f"in use by job {job_id}")
    assert response.json()["error"]["code"] == "conflict"
    assert client.get(f"/v1/files/{used}").status_code == 200
    assert client.get(f"/v1/files/{used}/content").content == labelled("a", "b")


@pytest.mark.parametrize("status", [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED])
def test_a_file_only_finished_jobs_used_can_be_deleted(client: TestClient,
                                                      status: JobStatus) -> None:
    used = upload(client, labelled("a", "b")).json()["id"]
    _set_status(client, _job(client, training_file=used), status)
    assert client.delete(f"/v1/files/{used}").status_code == 200
    assert client.get(f"/v1/files/{used}").status_code == 404


def test_a_cancelled_job_frees_its_file(client: TestClient) -> None:
    used = upload(client, labelled("a", "b")).json()["id"]
    job_id = _job(client, training_file=used)
    assert client.delete(f"/v1/files/{used}").status_code == 409
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").status_code == 200
    assert client.delete(f"/v1/files/{used}").status_code == 200


def test_a_job_created_while_its_file_is_deleted_never_outlives_the_file(
        empty_postgres_url: str, make_client: ClientFactory) -> None:
    """On PostgreSQL: the creation holds the file row locked until its commit; the delete waits
    for it and then sees the job (409). Without the locks, both commit: a queued job on a
    deleted file."""
    client = make_client(database_url=empty_postgres_url)
    sessions: sessionmaker[Session] = client.app.state.sessions
    file_id = upload(client, labelled("a", "b")).json()["id"]
    tenant_id = _tenant_id(client)
    outcome: dict[str, Any] = {}
    with sessions() as creating:
        job, _ = job_creation.create_job(creating, tenant_id=tenant_id, idempotency_key=None,
                                         body=JobCreate(model="minilm-l6",
                                                        training_file=file_id))

        def delete() -> None:
            with sessions() as deleting:
                try:
                    files.delete_file(deleting, storage=client.app.state.storage,
                                      tenant_id=tenant_id, file_id=file_id)
                    deleting.commit()
                    outcome["deleted"] = True
                except Conflict as err:
                    outcome["conflict"] = err.message

        deleter = threading.Thread(target=delete)
        deleter.start()
        deleter.join(timeout=1.0)
        assert deleter.is_alive(), "the delete did not wait for the job's creation"
        creating.commit()
    deleter.join(timeout=30)
    assert outcome == {"conflict": outcome.get("conflict")} and job.id in outcome["conflict"]
    assert client.get(f"/v1/files/{file_id}").status_code == 200


def test_a_delete_that_wins_the_race_makes_the_creation_400(
        empty_postgres_url: str, make_client: ClientFactory) -> None:
    client = make_client(database_url=empty_postgres_url)
    client.app.state.enqueue_job = lambda job_id, device: None
    sessions: sessionmaker[Session] = client.app.state.sessions
    file_id = upload(client, labelled("a", "b")).json()["id"]
    tenant_id = _tenant_id(client)
    outcome: dict[str, Any] = {}
    with sessions() as deleting:
        files.delete_file(deleting, storage=client.app.state.storage, tenant_id=tenant_id,
                          file_id=file_id)

        def create() -> None:
            outcome["response"] = client.post("/v1/fine_tuning/jobs", json={
                "model": "minilm-l6", "training_file": file_id})

        creator = threading.Thread(target=create)
        creator.start()
        creator.join(timeout=1.0)
        assert creator.is_alive(), "the creation did not wait for the delete"
        deleting.commit()
    creator.join(timeout=30)
    assert_refused(outcome["response"], 400, "training_file", f"no such file: {file_id}")


def _tenant_id(client: TestClient) -> str:
    return client.app.state.open_tenant.id
