"""`/v1/models`: the built-in base models registered at startup."""
from __future__ import annotations

from fastapi.testclient import TestClient

from api.services.models import register_builtin_models


def test_models_list_minilm_with_task_and_params(make_client):
    body = make_client().get("/v1/models").json()
    assert body["object"] == "list"
    models = {m["id"]: m for m in body["data"]}
    minilm = models["minilm-l6"]
    assert minilm["object"] == "model" and minilm["task"] == "classification"
    assert abs(minilm["params"] - 22.7e6) < 0.1e6


def test_get_model_and_unknown_model_is_404(make_client):
    client: TestClient = make_client()
    assert client.get("/v1/models/minilm-l6").json()["id"] == "minilm-l6"
    response = client.get("/v1/models/gpt-9")
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "model"


def test_registration_is_idempotent(make_client):
    client = make_client()
    created = client.get("/v1/models/minilm-l6").json()["created"]
    with client.app.state.sessions.begin() as session:
        register_builtin_models(session)
    assert client.get("/v1/models/minilm-l6").json()["created"] == created
    assert len([m for m in client.get("/v1/models").json()["data"] if m["id"] == "minilm-l6"]) == 1


def test_models_need_a_key_when_keys_are_configured(make_client):
    client = make_client(api_keys="ka:alice")
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer ka"}).status_code == 200
