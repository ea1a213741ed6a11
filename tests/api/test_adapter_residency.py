"""What an inference request finds of its adapter in this API process: a checkpoint served by id
is listed in `/v1/adapters/loaded` like an adapter, and an adapter deleted while a request loads
it cold is a 404 for that request, as it would have been a moment earlier."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api.core.storage import LocalStorage
from api.services.checkpoints import record_checkpoint
from api.services.jobs import claim_job
from speft_core.delta import Delta, delta_to_bytes
from speft_core.models import bundled_minilm_path, load_model
from speft_core.serving import random_delta
from tests.api.conftest import ClientFactory
from tests.api.test_adapters_api import make_adapter
from tests.api.test_jobs_api import ALICE, BOB, KEYS, create, upload

TEXTS = ["a lovely film"]


@pytest.fixture(scope="module")
def delta_bytes() -> bytes:
    """A synthetic MiniLM classification adapter's delta file."""
    base = load_model(bundled_minilm_path(), "classification", labels=["a", "b"])
    delta: Delta = random_delta(base, density=0.01, seed=1, labels=["neg", "pos"],
                                base_model="minilm-l6", scale=0.05)
    return delta_to_bytes(delta)


@pytest.fixture
def client(make_client: ClientFactory) -> TestClient:
    """Two tenants (alice, bob); enqueue is a no-op."""
    client = make_client(api_keys=KEYS)
    client.app.state.enqueue_job = lambda job_id, device: None
    return client


def make_checkpoint(client: TestClient, delta: bytes) -> str:
    """A checkpoint of a running alice job holding `delta`, as its worker records it; its id."""
    job_id = create(client, {"model": "minilm-l6", "training_file": upload(client)}).json()["id"]
    with client.app.state.sessions.begin() as session:
        assert claim_job(session, job_id=job_id, worker="w1")
        row = record_checkpoint(session, storage=client.app.state.storage, job_id=job_id,
                                attempt=1, step=2, metrics={}, delta=delta, state=b"state",
                                keep=None)
        assert row is not None
        return row.id


def loaded_ids(client: TestClient, headers: dict[str, str]) -> list[str]:
    response = client.get("/v1/adapters/loaded", headers=headers)
    assert response.status_code == 200, response.text
    return [row["id"] for row in response.json()["data"]]


@pytest.mark.parametrize("field", ["model", "adapter"])
def test_a_checkpoint_served_by_id_is_listed_as_loaded(client, delta_bytes, field):
    checkpoint_id = make_checkpoint(client, delta_bytes)
    body = ({"model": checkpoint_id} if field == "model"
            else {"model": "minilm-l6", "adapter": checkpoint_id})
    served = client.post("/v1/classifications", json={**body, "input": TEXTS}, headers=ALICE)
    assert served.status_code == 200, served.text
    response = client.get("/v1/adapters/loaded", headers=ALICE).json()
    row = next((row for row in response["data"] if row["id"] == checkpoint_id), None)
    assert row is not None, response
    assert row["model"] == "minilm-l6" and row["bytes"] > 0 and row["bytes"] <= response[
        "resident_bytes"]
    assert checkpoint_id not in loaded_ids(client, BOB)  # another tenant's is not listed


class DeletedUnderTheLoad(LocalStorage):
    """The app's storage folder, where reading adapter `doomed`'s delta file first deletes that
    adapter through the API (as its owner would, in the middle of another request's cold load)."""

    client: TestClient
    doomed: str = ""

    def get(self, key: str, *, sha256: str | None = None) -> bytes:
        """Delete `doomed` through DELETE /v1/adapters/{id} when its file is read, then read."""
        if self.doomed and key == f"adapters/{self.doomed}.safetensors":
            doomed, self.doomed = self.doomed, ""
            deleted = self.client.delete(f"/v1/adapters/{doomed}", headers=ALICE)
            assert deleted.status_code == 200, deleted.text
        return super().get(key, sha256=sha256)


@pytest.mark.parametrize("field", ["model", "adapter"])
def test_an_adapter_deleted_while_it_loads_cold_is_404(client, delta_bytes, tmp_path, field):
    storage = DeletedUnderTheLoad(tmp_path / "storage")  # the client's storage folder
    storage.client, client.app.state.storage = client, storage
    kept = make_adapter(client, content=delta_bytes)[1]
    storage.doomed = doomed = make_adapter(client, content=delta_bytes)[1]
    body = {"model": doomed} if field == "model" else {"model": "minilm-l6", "adapter": doomed}
    response = client.post("/v1/classifications", json={**body, "input": TEXTS}, headers=ALICE)
    assert response.status_code == 404, response.text
    assert response.json() == {"error": {"code": "not_found", "message": f"no such adapter: "
                                         f"{doomed}", "param": field,
                                         "type": "invalid_request_error"}}
    assert not storage.doomed  # the delete did run between the lookup and the load
    assert doomed not in loaded_ids(client, ALICE)
    assert client.post("/v1/classifications", json={"model": kept, "input": TEXTS},
                       headers=ALICE).status_code == 200
