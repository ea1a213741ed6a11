"""`/v1/adapters`: list, read, verified download, delete, and tenant isolation."""
from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.services.jobs import claim_job, finish_succeeded
from tests.api.conftest import ClientFactory
from tests.api.test_jobs_api import ALICE, BOB, CLASSIFICATION, KEYS, create, upload

DELTA = b"not really safetensors, but bytes are bytes" * 100


@pytest.fixture
def client(make_client: ClientFactory) -> TestClient:
    """Two tenants (alice, bob); enqueue is a no-op."""
    client = make_client(api_keys=KEYS)
    client.app.state.enqueue_job = lambda job_id, device: None
    return client


def make_adapter(client: TestClient, *, content: bytes = DELTA, model: str = "minilm-l6",
                 training: bytes = CLASSIFICATION) -> tuple[str, str]:
    """A succeeded alice job on `model` (trained on `training`) with `content` stored as its
    adapter, as a worker leaves it; (job id, adapter id)."""
    job_id = create(client, {"model": model,
                             "training_file": upload(client, training)}).json()["id"]
    adapter_id = f"adapter-{job_id.removeprefix('ftjob-')}"
    key = f"adapters/{adapter_id}.safetensors"
    stored = client.app.state.storage.put(key, content)
    with client.app.state.sessions.begin() as session:
        claim_job(session, job_id=job_id, worker="w1")
        assert finish_succeeded(session, job_id=job_id, adapter_id=adapter_id, storage_key=key,
                                nnz=123, density=0.01, metric="gradient", bytes=stored.size,
                                sha256=stored.sha256, eval={"eval_accuracy": 0.9},
                                trainable_params=123)
    return job_id, adapter_id


def test_adapter_round_trip_and_delete(client):
    job_id, adapter_id = make_adapter(client)
    adapter: dict[str, Any] = client.get(f"/v1/adapters/{adapter_id}", headers=ALICE).json()
    assert adapter == {
        "id": adapter_id, "object": "adapter", "job_id": job_id, "base_model": "minilm-l6",
        "nnz": 123, "density": 0.01, "metric": "gradient", "bytes": len(DELTA),
        "sha256": adapter["sha256"], "eval": {"eval_accuracy": 0.9},
        "created_at": adapter["created_at"],
    }
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=ALICE).json()
    assert (job["status"], job["adapter_id"], job["trainable_params"]) == (
        "succeeded", adapter_id, 123)
    assert client.get("/v1/adapters", headers=ALICE).json() == {"object": "list",
                                                                "data": [adapter]}

    content = client.get(f"/v1/adapters/{adapter_id}/content", headers=ALICE)
    assert content.status_code == 200 and content.content == DELTA
    assert (content.headers["content-disposition"]
            == f'attachment; filename="{adapter_id}.safetensors"')

    deleted = client.delete(f"/v1/adapters/{adapter_id}", headers=ALICE)
    assert deleted.json() == {"id": adapter_id, "object": "adapter", "deleted": True}
    assert not client.app.state.storage.exists(f"adapters/{adapter_id}.safetensors")
    assert client.get(f"/v1/adapters/{adapter_id}", headers=ALICE).status_code == 404
    assert client.get(f"/v1/adapters/{adapter_id}/content", headers=ALICE).status_code == 404
    assert client.get("/v1/adapters", headers=ALICE).json()["data"] == []
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=ALICE).json()["adapter_id"] == (
        adapter_id)  # the job keeps its record


@pytest.mark.parametrize("method,suffix", [("get", ""), ("get", "/content"), ("delete", "")])
def test_cross_tenant_adapter_is_404(client, method, suffix):
    _, adapter_id = make_adapter(client)
    response = getattr(client, method)(f"/v1/adapters/{adapter_id}{suffix}", headers=BOB)
    assert response.status_code == 404 and response.json()["error"]["param"] == "adapter_id"
    assert client.get("/v1/adapters", headers=BOB).json()["data"] == []
    assert client.get(f"/v1/adapters/{adapter_id}/content", headers=ALICE).content == DELTA


def test_corrupt_adapter_download_is_aborted(client):
    _, adapter_id = make_adapter(client)
    client.app.state.storage.put(f"adapters/{adapter_id}.safetensors", b"x" * len(DELTA))
    # The mismatch shows at the end of the stream: the response is cut off, never completed.
    with pytest.raises(Exception, match="checksum|response already started"):
        client.get(f"/v1/adapters/{adapter_id}/content", headers=ALICE)
