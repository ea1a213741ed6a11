"""Security over HTTP: per-tenant rate limits and job quotas (429 with Retry-After), every endpoint
walked with another tenant's key (404, never 403/200/500) and with no key (401), and untrusted
strings kept out of storage keys and model paths."""
from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from httpx import Response
from typer.testing import CliRunner

from api.cli import app as cli
from api.core.models import Checkpoint, File, Job, RegisteredModel, WebhookEndpoint, utcnow
from api.services.files import file_storage_key
from api.services.quotas import QUOTA_RETRY_AFTER_S
from tests.api.conftest import ClientFactory
from tests.api.test_adapters_api import DELTA, make_adapter
from tests.api.test_jobs_api import ALICE, BOB, CLASSIFICATION, KEYS, create, upload

UNAUTHENTICATED_PATHS = {"/healthz", "/readyz", "/metrics"}
# Path parameters naming objects every tenant shares (base models): the same answer for all.
SHARED_PATH_PARAMS = {"model_id"}
CAUSAL_MODEL = "tiny-causal"  # a registered causal_lm row (no weights: never loaded here)


def assert_error(response: Response, status: int, code: str) -> dict[str, Any]:
    """`response` is `status` with the one error shape and `code`; the error object."""
    assert response.status_code == status, (response.request.url, response.text)
    error = response.json()["error"]
    assert set(error) == {"code", "message", "param", "type"} and error["code"] == code, error
    return error


def operations(client: TestClient) -> Iterator[tuple[str, str]]:
    """(method, path template) of every operation in the app's OpenAPI schema."""
    for path, methods in client.app.openapi()["paths"].items():
        for method in methods:
            yield method, path


def path_params(path: str) -> list[str]:
    """The `{name}` parameters of a path template."""
    return re.findall(r"{(\w+)}", path)


def fill(path: str, ids: dict[str, str]) -> str:
    """The path template with its parameters replaced from `ids` (shared ones by any value)."""
    return re.sub(r"{(\w+)}", lambda match: ids.get(match[1], "minilm-l6"), path)


# --- rate limit -----------------------------------------------------------------------------------


def test_rate_limit_is_429_with_retry_after_and_other_tenants_go_on(
        make_client: ClientFactory) -> None:
    client = make_client(api_keys=KEYS, rate_limit="3/minute")
    assert all(client.get("/v1/files", headers=ALICE).status_code == 200 for _ in range(3))
    limited = client.get("/v1/models", headers=ALICE)  # every authenticated route counts
    error = assert_error(limited, 429, "rate_limited")
    assert error["type"] == "rate_limit_error" and "3 per 1 minute" in error["message"]
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert client.get("/v1/files", headers=BOB).status_code == 200
    for path in UNAUTHENTICATED_PATHS:  # never limited
        assert client.get(path).status_code in (200, 503)


def test_rate_limit_off_when_empty(make_client: ClientFactory) -> None:
    client = make_client(api_keys=KEYS, rate_limit="")
    assert client.app.state.rate_limiter is None
    assert all(client.get("/v1/files", headers=ALICE).status_code == 200 for _ in range(5))


@pytest.fixture
def redis_url() -> str:
    """A Redis database on the local server (skipped where none runs, unless CI=true)."""
    url = os.environ.get("SPEFT_TEST_REDIS", "redis://127.0.0.1:6379/13")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis not reachable at {url}: {err}")
        pytest.skip(f"Redis not reachable at {url}: {err}")
    return url


def test_rate_limit_in_redis_is_shared_by_api_processes(make_client: ClientFactory,
                                                        redis_url: str) -> None:
    settings = {"api_keys": KEYS, "rate_limit": "3/minute", "rate_limit_storage_url": redis_url}
    first, second = make_client(**settings), make_client(**settings)  # one database, two apps
    assert first.get("/v1/files", headers=ALICE).status_code == 200
    assert second.get("/v1/files", headers=ALICE).status_code == 200
    assert first.get("/v1/files", headers=ALICE).status_code == 200
    assert_error(second.get("/v1/files", headers=ALICE), 429, "rate_limited")


def test_rate_limit_storage_down_lets_requests_through(make_client: ClientFactory) -> None:
    client = make_client(api_keys=KEYS, rate_limit="1/minute",
                         rate_limit_storage_url="redis://127.0.0.1:1/0")
    assert all(client.get("/v1/files", headers=ALICE).status_code == 200 for _ in range(3))


# --- unfinished-job quota -------------------------------------------------------------------------


def test_job_quota_counts_unfinished_jobs_from_the_database(
        backend_settings: dict[str, Any], make_client: ClientFactory) -> None:
    client = make_client(**backend_settings, api_keys=KEYS, max_active_jobs_per_tenant=2)
    client.app.state.enqueue_job = lambda job_id, device: None
    body = {"model": "minilm-l6", "training_file": upload(client)}
    first = create(client, body, headers={**ALICE, "Idempotency-Key": "one"})
    assert first.status_code == 201 and create(client, body).status_code == 201

    refused = create(client, body)
    error = assert_error(refused, 429, "quota_exceeded")
    assert error["param"] == "max_active_jobs_per_tenant" and "2 unfinished jobs" in (
        error["message"])
    assert refused.headers["Retry-After"] == str(QUOTA_RETRY_AFTER_S)
    assert len(client.get("/v1/fine_tuning/jobs", headers=ALICE).json()["data"]) == 2
    replay = create(client, body, headers={**ALICE, "Idempotency-Key": "one"})
    assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]
    bob_body = {"model": "minilm-l6", "training_file": upload(client, headers=BOB)}
    assert create(client, bob_body, headers=BOB).status_code == 201

    cancelled = client.post(f"/v1/fine_tuning/jobs/{first.json()['id']}/cancel", headers=ALICE)
    assert cancelled.json()["status"] == "cancelled"
    assert create(client, body).status_code == 201  # a slot freed
    assert_error(create(client, body), 429, "quota_exceeded")


# --- every endpoint as another tenant, and with no key ---------------------------------------


@pytest.fixture
def alice_objects(make_client: ClientFactory) -> tuple[TestClient, dict[str, str]]:
    """Alice's file, job and adapter (ids by path parameter name) in a two-tenant app."""
    client = make_client(api_keys=KEYS)
    client.app.state.enqueue_job = lambda job_id, device: None
    job_id, adapter_id = make_adapter(client)
    stored = client.app.state.storage.put("checkpoints/alice.safetensors", DELTA)
    with client.app.state.sessions.begin() as session:
        session.add(RegisteredModel(id=CAUSAL_MODEL, task="causal_lm", params=1,
                                    created_at=utcnow()))
        job = session.get(Job, job_id)
        checkpoint = Checkpoint(tenant_id=job.tenant_id, job_id=job_id, base_model="minilm-l6",
                                step=1, attempt=1, metrics={}, bytes=stored.size,
                                sha256=stored.sha256, storage_key="checkpoints/alice.safetensors")
        session.add(checkpoint)
        endpoint = WebhookEndpoint(tenant_id=job.tenant_id, url="https://example.com/hook",
                                   secret="whsec_c2VjcmV0", events=["fine_tuning.job.succeeded"])
        session.add(endpoint)
        session.flush()
        checkpoint_id, endpoint_id = checkpoint.id, endpoint.id
    return client, {"file_id": upload(client), "job_id": job_id, "adapter_id": adapter_id,
                    "checkpoint_id": checkpoint_id, "endpoint_id": endpoint_id}


def collection_requests(ids: dict[str, str]) -> dict[tuple[str, str], dict[str, Any]]:
    """For each operation without a path id: request arguments naming Alice's objects."""
    job = {"model": "minilm-l6", "training_file": ids["file_id"]}
    return {
        ("post", "/v1/files"): {"files": {"file": ("d.jsonl", CLASSIFICATION)},
                                "data": {"purpose": "fine-tune"}},
        ("post", "/v1/fine_tuning/jobs"): {"json": job},
        ("post", "/v1/classifications"): {"json": {"model": "minilm-l6", "input": "hi",
                                                   "adapter": ids["adapter_id"]}},
        ("post", "/v1/completions"): {"json": {"model": CAUSAL_MODEL, "prompt": "hi",
                                               "adapter": ids["adapter_id"]}},
        ("post", "/v1/webhooks"): {"json": {"url": "https://example.com/hook"}},
        ("post", "/v1/chat/completions"): {"json": {  # `model` may name the adapter itself
            "model": ids["adapter_id"], "messages": [{"role": "user", "content": "hi"}]}},
    }


def missing(ids: dict[str, str]) -> dict[str, str]:
    """Ids of the same kinds that exist for nobody."""
    return {name: f"{value.split('-')[0]}-{uuid.uuid4().hex[:24]}" for name, value in ids.items()}


def outcome(response: Response) -> tuple[int, str | None, str | None]:
    """Status, error code and error param: what tells one answer from another."""
    error = response.json().get("error") or {}
    return response.status_code, error.get("code"), error.get("param")


def test_every_endpoint_hides_another_tenants_objects(alice_objects) -> None:
    client, ids = alice_objects
    walked: set[str] = set()
    for method, path in operations(client):
        params = path_params(path)
        unknown = set(params) - set(ids) - SHARED_PATH_PARAMS
        assert not unknown, f"{method} {path}: add an object for {unknown} to this walk"
        if path in UNAUTHENTICATED_PATHS or (params and set(params) <= SHARED_PATH_PARAMS):
            continue
        if params:  # Alice's object by id: exactly as if it did not exist, never 403/200/500
            assert_error(client.request(method, fill(path, ids), headers=BOB), 404, "not_found")
            walked.update(params)
        elif method == "get":  # a list: Bob's own, none of Alice's
            listed = client.get(path, headers=BOB)
            assert listed.status_code == 200, (path, listed.text)
            assert not any(value in listed.text for value in ids.values()), path
        else:  # a body naming Alice's objects: answered as if they did not exist
            requests = collection_requests(ids)
            assert (method, path) in requests, f"{method} {path}: add a request to this walk"
            as_bob = client.request(method, path, headers=BOB, **requests[(method, path)])
            as_nobody = client.request(method, path, headers=BOB,
                                       **collection_requests(missing(ids))[(method, path)])
            assert outcome(as_bob) == outcome(as_nobody), (path, as_bob.text, as_nobody.text)
            assert as_bob.status_code not in (403, 500), (path, as_bob.text)
    assert walked == set(ids)
    assert client.get(f"/v1/adapters/{ids['adapter_id']}", headers=ALICE).status_code == 200


def test_every_endpoint_needs_a_key(alice_objects) -> None:
    client, ids = alice_objects
    for method, path in operations(client):
        if path in UNAUTHENTICATED_PATHS:
            continue
        for headers in ({}, {"Authorization": "Bearer not-a-key"}):
            response = client.request(method, fill(path, ids), headers=headers)
            assert_error(response, 401, "invalid_api_key")
            assert response.headers["WWW-Authenticate"] == "Bearer"


# --- untrusted strings: storage keys and model paths ----------------------------------------------


def test_upload_filename_never_reaches_the_storage_key(make_client: ClientFactory,
                                                       tmp_path: Path) -> None:
    client = make_client(api_keys=KEYS)
    name = "../../escaped.jsonl"
    uploaded = client.post("/v1/files", files={"file": (name, CLASSIFICATION)},
                           data={"purpose": "fine-tune"}, headers=ALICE).json()
    with client.app.state.sessions() as session:
        row = session.get(File, uploaded["id"])
    assert row is not None and row.storage_key == file_storage_key(uploaded["id"])
    assert uploaded["filename"] == name and not list(tmp_path.rglob("escaped*"))
    content = client.get(f"/v1/files/{uploaded['id']}/content", headers=ALICE)
    assert content.headers["content-disposition"] == (
        f'attachment; filename="{uploaded["id"]}.jsonl"')
    assert_error(client.get("/v1/files/..%2F..%2Fspeft.db", headers=ALICE), 404, "not_found")


def test_model_folder_reached_through_a_symlink_is_outside_the_models_dir(
        tmp_path: Path) -> None:
    root, outside = tmp_path / "models", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    env = {"SPEFT_DATABASE_URL": f"sqlite:///{tmp_path / 'speft.db'}", "SPEFT_API_KEYS": "",
           "SPEFT_MODELS_DIR": str(root)}
    for path in ("linked", str(root / "linked"), "linked/../../outside"):
        result = CliRunner().invoke(cli, ["models", "register", "x", "--path", path,
                                          "--task", "causal_lm"], env=env)
        assert result.exit_code == 2 and "outside SPEFT_MODELS_DIR" in result.output, path
