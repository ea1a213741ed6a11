"""Request bodies at the door (api/request_limits.py) and what no stored value can break:
lone surrogates are a 400 naming their path before any handler runs, and a surrogate already
stored still renders; bodies over their route's limit are a 413 naming `body`, by Content-Length
and by counting a chunked body, tested through a real uvicorn server; metadata has OpenAI's
limits."""
from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from api.core.config import Settings
from api.main import create_app
from tests.api.conftest import ClientFactory
from tests.api.test_bad_input import assert_refused, labelled, upload
from tests.api.test_files_api import _file_rows, _stored_keys
from tests.fixtures.servers import uvicorn_in_thread

SURROGATE_BODY = '"\\ud800"'  # a JSON escape that decodes to a lone surrogate


def raw_post(client: TestClient, path: str, text: str) -> httpx.Response:
    """POST `text` as the JSON body, byte for byte (no client-side re-encoding)."""
    return client.post(path, content=text.encode("ascii"),
                       headers={"Content-Type": "application/json"})


@pytest.fixture
def client(make_client: ClientFactory) -> TestClient:
    """An open-mode client whose enqueue records the jobs sent."""
    client = make_client()
    client.app.state.sent = []
    client.app.state.enqueue_job = lambda job_id, device: client.app.state.sent.append(job_id)
    return client


@pytest.fixture
def training_file(client: TestClient) -> str:
    return upload(client, labelled("a", "b")).json()["id"]


JOB = '{"model": "minilm-l6", "training_file": "%s", '


@pytest.mark.parametrize("path, body, param", [
    ("/v1/fine_tuning/jobs", JOB + '"metadata": {"k": %s}}', "metadata.k"),
    ("/v1/fine_tuning/jobs", JOB + '"metadata": {%s: "v"}}', "metadata"),
    ("/v1/fine_tuning/jobs", JOB + '"suffix": %s}', "suffix"),
    ("/v1/completions", '{"model": "%s", "prompt": %s}', "prompt"),
    ("/v1/classifications", '{"model": "%s", "input": ["fine", %s]}', "input[1]"),
    ("/v1/chat/completions", '{"model": "%s", "messages": [{"role": "user", "content": %s}]}',
     "messages[0].content"),
])
def test_a_lone_surrogate_in_a_json_body_is_400_naming_its_path_before_any_handler(
        client: TestClient, training_file: str, path: str, body: str, param: str) -> None:
    response = raw_post(client, path, body % (training_file, SURROGATE_BODY))
    assert_refused(response, 400, param, "lone surrogate")
    assert client.app.state.sent == []
    listing = client.get("/v1/fine_tuning/jobs")
    assert listing.status_code == 200 and listing.json()["data"] == [], listing.text


def test_a_surrogate_pair_and_an_escaped_backslash_are_ordinary_text(
        client: TestClient, training_file: str) -> None:
    body = (JOB % training_file) + '"metadata": {"emoji": "\\ud83d\\ude00", "text": "\\\\ud800"}}'
    response = raw_post(client, "/v1/fine_tuning/jobs", body)
    assert response.status_code == 201, response.text
    assert response.json()["metadata"] == {"emoji": "\U0001f600", "text": "\\ud800"}


@pytest.mark.parametrize("depth", [900, 100_000])
def test_a_deeply_nested_body_with_a_surrogate_escape_is_4xx_not_500(
        client: TestClient, training_file: str, depth: int) -> None:
    """The surrogate check walks without recursion and leaves bodies JSON cannot hold to the
    route (a body under the recursion limit is named; a deeper one is the route's 4xx)."""
    nested = "[" * depth + SURROGATE_BODY + "]" * depth
    response = raw_post(client, "/v1/fine_tuning/jobs",
                        (JOB % training_file) + f'"metadata": {{"k": {nested}}}}}')
    assert 400 <= response.status_code < 500, response.text
    assert client.app.state.sent == []


def test_a_surrogate_already_stored_never_breaks_a_listing(
        client: TestClient, training_file: str, tmp_path: Path) -> None:
    """A row written before the door check (or by another path) still renders: escaped."""
    created = client.post("/v1/fine_tuning/jobs", json={
        "model": "minilm-l6", "training_file": training_file, "metadata": {"k": "v"}})
    job_id = created.json()["id"]
    with sqlite3.connect(tmp_path / "speft.db") as db:
        (spec,) = db.execute("SELECT spec FROM jobs WHERE id = ?", (job_id,)).fetchone()
        stored = json.loads(spec)
        stored["metadata"] = {"k": "\ud800", "\udfff": "v"}
        db.execute("UPDATE jobs SET spec = ? WHERE id = ?", (json.dumps(stored), job_id))
    for path in ("/v1/fine_tuning/jobs", f"/v1/fine_tuning/jobs/{job_id}"):
        response = client.get(path)
        assert response.status_code == 200, response.text
        assert b'"k":"\\ud800"' in response.content  # escaped, as JSON allows
        job = response.json()["data"][0] if "data" in response.json() else response.json()
        assert job["metadata"]["k"] == "\ud800" and len(job["metadata"]) == 2


@pytest.mark.parametrize("path, status", [
    ("/v1/fine_tuning/jobs?after=%ED%A0%80", 400),
    ("/v1/fine_tuning/jobs?after=%ED%A0", 400),
    ("/v1/fine_tuning/jobs/ftjob-%ED%A0%80", 404),
    ("/v1/fine_tuning/jobs/%ED%A0%80/events", 404),
    ("/v1/files/file-%ED%A0%80", 404),
    ("/v1/adapters/%ED%A0%80", 404),
])
def test_surrogate_bytes_in_query_strings_and_path_ids_are_4xx(
        client: TestClient, path: str, status: int) -> None:
    response = client.get(path)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] in ("invalid_request", "not_found")


# --- metadata: OpenAI's limits ----------------------------------------------------------------


@pytest.mark.parametrize("metadata, param", [
    ({f"k{i}": "v" for i in range(17)}, "metadata"),
    ({"k" * 65: "v"}, "metadata"),
    ({"k": "v" * 513}, "metadata.k"),
])
def test_metadata_beyond_openais_limits_is_422_naming_metadata(
        client: TestClient, training_file: str, metadata: dict[str, str], param: str) -> None:
    response = client.post("/v1/fine_tuning/jobs", json={
        "model": "minilm-l6", "training_file": training_file, "metadata": metadata})
    assert_refused(response, 422, param, "")
    assert client.app.state.sent == []


def test_metadata_at_openais_limits_is_accepted(client: TestClient, training_file: str) -> None:
    metadata = {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)}
    response = client.post("/v1/fine_tuning/jobs", json={
        "model": "minilm-l6", "training_file": training_file, "metadata": metadata})
    assert response.status_code == 201, response.text
    assert response.json()["metadata"] == metadata


def test_the_openapi_schema_states_the_metadata_and_suffix_limits(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    create = schemas["JobCreate"]["properties"]
    assert create["metadata"]["maxProperties"] == 16
    assert create["metadata"]["propertyNames"] == {"maxLength": 64}
    assert create["metadata"]["additionalProperties"]["maxLength"] == 512
    assert create["suffix"]["anyOf"][0]["maxLength"] == 64


# --- body limits, through a real HTTP server --------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """A real uvicorn server (in a thread) with a 4,000-byte JSON limit and 2,000-byte uploads;
    (base URL, app)."""
    app = create_app(Settings(database_url=f"sqlite:///{tmp_path / 'speft.db'}",
                              storage_url=f"file://{tmp_path / 'storage'}",
                              max_json_body_bytes=4000, max_upload_bytes=2000))
    app.state.enqueue_job = lambda job_id, device: None
    with uvicorn_in_thread(app) as base:
        yield base, app


def _chunks(data: bytes, size: int = 500) -> Iterator[bytes]:
    """`data` in pieces: httpx sends a generator chunked, without Content-Length."""
    for start in range(0, len(data), size):
        yield data[start:start + size]


def _job_body(training_file: str, value_bytes: int) -> bytes:
    return json.dumps({"model": "minilm-l6", "training_file": training_file,
                       "metadata": {"k": "v" * value_bytes}}).encode()


def test_json_bodies_over_the_limit_are_413_naming_body_with_or_without_content_length(
        server: tuple[str, Any]) -> None:
    url, _ = server
    with httpx.Client(base_url=url, timeout=30) as http:
        training_file = http.post("/v1/files", files={"file": ("d.jsonl", labelled("a", "b"))},
                                  data={"purpose": "fine-tune"}).json()["id"]
        headers = {"Content-Type": "application/json"}
        small = _job_body(training_file, 100)
        assert http.post("/v1/fine_tuning/jobs", content=small, headers=headers).status_code == 201
        chunked_small = http.post("/v1/fine_tuning/jobs", content=_chunks(small, 50),
                                  headers=headers)
        assert chunked_small.status_code == 201, chunked_small.text
        big = _job_body(training_file, 5000)
        for content in (big, _chunks(big)):  # Content-Length up front; chunked, counted
            response = http.post("/v1/fine_tuning/jobs", content=content, headers=headers)
            assert_refused(response, 413, "body", "limit of 4000 bytes")
        huge = http.post("/v1/fine_tuning/jobs", content=_chunks(b"x" * 20_000_000, 65536),
                         headers=headers)  # 20 MB streamed: refused after the first 4 kB
        assert_refused(huge, 413, "body", "limit of 4000 bytes")
        jobs = http.get("/v1/fine_tuning/jobs").json()["data"]
        assert len(jobs) == 2


def test_uploads_over_their_limit_are_413_and_nothing_is_stored(
        server: tuple[str, Any], tmp_path: Path) -> None:
    url, _ = server
    with httpx.Client(base_url=url, timeout=30) as http:
        just_over = http.post("/v1/files", files={"file": ("d.jsonl", labelled(*"ab" * 60))},
                              data={"purpose": "fine-tune"})  # ~3 kB: storage refuses the file
        assert_refused(just_over, 413, "file", "larger than 2000 bytes")
        boundary = "b0undary"
        part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n"
                f"fine-tune\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
                f"filename=\"d.jsonl\"\r\n\r\n").encode()
        body = part + labelled(*"ab" * 20_000) + f"\r\n--{boundary}--\r\n".encode()
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        for content in (body, _chunks(body, 65536)):  # ~1 MB, over 2000 + multipart framing
            response = http.post("/v1/files", content=content, headers=headers)
            assert_refused(response, 413, "body", "larger than this route's limit")
    with sqlite3.connect(tmp_path / "speft.db") as db:
        assert db.execute("SELECT count(*) FROM files").fetchone() == (0,)
    assert not [p for p in (tmp_path / "storage").rglob("*") if p.is_file()]


def test_every_route_documents_the_413(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path, operations in paths.items():
        if path.startswith("/v1/"):
            for method, operation in operations.items():
                assert "413" in operation["responses"], (method, path)


def test_413s_from_the_door_are_counted_in_metrics(client: TestClient) -> None:
    response = client.post("/v1/fine_tuning/jobs", content=b"x" * (1024 * 1024 + 1),
                           headers={"Content-Type": "application/json"})
    assert_refused(response, 413, "body", "limit of 1048576 bytes")
    assert 'status="413"' in client.get("/metrics").text
    assert _file_rows(client) == 0 and _stored_keys(client) == []
