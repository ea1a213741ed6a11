"""`/healthz` and `/readyz`: liveness always, readiness names the dependency that is down."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


def test_healthz_is_ok(make_client):
    assert make_client().get("/healthz").json() == {"status": "ok"}


def test_readyz_reports_every_check(make_client):
    response = make_client().get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["checks"] == {"database": "ok", "storage": "ok",
                              "broker": "ok"}  # the embedded broker, really probed
    assert body["status"] == "ready"
    assert body["database_pool"]["threads"] == 20 and body["database_pool"]["size"] == 20
    assert body["database_pool"]["saturated"] is False


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_readyz_is_503_when_storage_folder_is_unwritable(make_client, tmp_path: Path):
    client = make_client()
    root = client.app.state.storage.root
    root.chmod(0o500)
    try:
        response = client.get("/readyz")
    finally:
        root.chmod(0o700)
    assert response.status_code == 503
    body = response.json()
    assert body["checks"]["storage"] != "ok" and body["checks"]["database"] == "ok"
    assert body["error"]["param"] == "storage" and "not writable" in body["error"]["message"]


def test_readyz_is_503_when_storage_folder_is_gone(make_client):
    client = make_client()
    root = client.app.state.storage.root
    root.rename(root.with_name("moved-away"))
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["error"]["param"] == "storage"


def test_app_starts_and_readyz_is_503_when_s3_is_unreachable(make_client):
    client = make_client(storage_url="s3://b/p", s3_endpoint_url="http://127.0.0.1:1")
    assert client.get("/healthz").status_code == 200
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["error"]["param"] == "storage"
    assert "not reachable" in response.json()["checks"]["storage"]


def test_readyz_is_503_naming_the_broker_when_redis_is_unreachable(make_client):
    client = make_client(broker_url="redis://127.0.0.1:1/0")
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["error"]["param"] == "broker"
    assert response.json()["checks"]["database"] == "ok"


def test_readyz_runs_the_broker_hook(make_client):
    client = make_client()

    def broker_down() -> None:
        raise ConnectionError("redis refused")

    client.app.state.broker_check = broker_down
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["broker"] == "ConnectionError: redis refused"
    client.app.state.broker_check = lambda: None
    assert client.get("/readyz").json()["checks"]["broker"] == "ok"


def test_openapi_lists_the_routes(make_client):
    paths = make_client().get("/openapi.json").json()["paths"]
    assert {"/v1/files", "/v1/files/{file_id}", "/v1/files/{file_id}/content", "/v1/models",
            "/v1/models/{model_id}", "/healthz", "/readyz"} <= set(paths)
