"""`/v1/files`: upload validation, storage round-trip, tenant isolation, on both backend stacks."""
from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.core.models import File
from api.core.storage import LocalStorage
from api.services.files import file_storage_key

ALICE = {"Authorization": "Bearer ka"}
BOB = {"Authorization": "Bearer kb"}
KEYS = "ka:alice,kb:bob"


def _head(path: Path, n: int) -> bytes:
    with path.open("rb") as fh:
        return b"".join(fh.readline() for _ in range(n))


def _upload(client: TestClient, content: bytes, *, purpose: str = "fine-tune",
            headers: dict[str, str] | None = None, name: str = "train.jsonl"):
    return client.post("/v1/files", files={"file": (name, content)}, data={"purpose": purpose},
                       headers=headers)


def _file_rows(client: TestClient) -> int:
    """File rows in the app's database, deleted or not."""
    with client.app.state.sessions() as session:
        return session.scalar(select(func.count()).select_from(File))


def _stored_keys(client: TestClient) -> list[str]:
    """Every object in the app's storage (folder or bucket)."""
    storage = client.app.state.storage
    if isinstance(storage, LocalStorage):
        return sorted(str(p.relative_to(storage.root)) for p in storage.root.rglob("*") if p.is_file())
    s3 = boto3.client("s3", endpoint_url=storage.endpoint_url)
    listing = s3.list_objects_v2(Bucket=storage.bucket)
    return sorted(item["Key"] for item in listing.get("Contents", []))


def test_upload_round_trip_detects_task(backend_client: TestClient, data_dir: Path):
    sst2 = _head(data_dir / "sst2" / "train.jsonl", 50)
    alpaca = _head(data_dir / "alpaca200" / "train.jsonl", 20)

    first = _upload(backend_client, sst2, name="sst2.jsonl")
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["object"] == "file" and body["id"].startswith("file-")
    assert (body["task"], body["num_examples"], body["bytes"]) == ("classification", 50, len(sst2))
    assert body["filename"] == "sst2.jsonl" and body["purpose"] == "fine-tune"

    second = _upload(backend_client, alpaca).json()
    assert (second["task"], second["num_examples"]) == ("causal_lm", 20)

    content = backend_client.get(f"/v1/files/{body['id']}/content")
    assert content.status_code == 200 and content.content == sst2
    assert backend_client.get(f"/v1/files/{body['id']}").json() == body
    listed = backend_client.get("/v1/files").json()
    assert [f["id"] for f in listed["data"]] == [second["id"], body["id"]]  # newest first

    deleted = backend_client.delete(f"/v1/files/{body['id']}")
    assert deleted.json() == {"id": body["id"], "object": "file", "deleted": True}
    assert not backend_client.app.state.storage.exists(file_storage_key(body["id"]))
    assert backend_client.get(f"/v1/files/{body['id']}").status_code == 404
    assert backend_client.get(f"/v1/files/{body['id']}/content").status_code == 404
    assert [f["id"] for f in backend_client.get("/v1/files").json()["data"]] == [second["id"]]


def test_bad_jsonl_is_400_naming_the_line_and_nothing_is_stored(backend_client: TestClient,
                                                                 data_dir: Path):
    lines = _head(data_dir / "sst2" / "train.jsonl", 6) + b'{"text": "no label here"}\n'
    response = _upload(backend_client, lines)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["message"].startswith("line 7: ") and "label" in error["message"]
    assert error["param"] == "file"
    assert _file_rows(backend_client) == 0
    assert _stored_keys(backend_client) == []


@pytest.mark.parametrize("content, message", [
    (b'{"text": "ok", "label": 1}\n{"text": "broken"\n', "line 2: invalid JSON"),
    (b"\n\n", "no examples"),
    (b'{"question": "?"}\n', "line 1: cannot tell the task"),
    (b'[1, 2]\n', "line 1: expected a JSON object"),
    (b'{"text": "ok", "label": 1}\r{"text": "ok", "label": 0}\r',
     "line 1: invalid JSON: lines end in a carriage return alone"),
])
def test_invalid_datasets_are_400(make_client, content: bytes, message: str):
    client = make_client()
    response = _upload(client, content)
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]
    assert _stored_keys(client) == []


CHAT_SET = Path(__file__).parents[1] / "data" / "alpaca_chat40" / "train.jsonl"


def _chat(*messages: object) -> bytes:
    return json.dumps({"messages": list(messages)}).encode()


_USER = {"role": "user", "content": "Hi"}
_ASSISTANT = {"role": "assistant", "content": "Yo"}
_GOOD_CHAT = _chat(_USER, _ASSISTANT)


def test_chat_file_uploads_as_causal_lm(make_client):
    client = make_client()
    body = _upload(client, CHAT_SET.read_bytes(), name="chat.jsonl").json()
    assert (body["task"], body["num_examples"]) == ("causal_lm", 40)
    # as OpenAI's file object: status "processed"; status_details (a string) only on failures
    assert body["status"] == "processed" and "status_details" not in body


@pytest.mark.parametrize("bad, reason", [
    (_chat({"role": "robot", "content": "Hi"}, _ASSISTANT),
     "messages[0].role must be one of system, developer, user, assistant, tool, function; "
     "got 'robot'"),
    (_chat({**_USER, "content": ""}, _ASSISTANT), "messages[0].content must not be empty"),
    (_chat(_USER, {**_ASSISTANT, "content": None}),
     "messages[1].content must be a string or an array of text parts, got null"),
    (_chat({**_USER, "content": {"text": "Hi"}}, _ASSISTANT),
     "messages[0].content must be a string or an array of text parts, got an object"),
    (_chat({"role": "system", "content": "S"}, _USER), "the conversation has no assistant message"),
    (_chat(_USER, {**_ASSISTANT, "weight": 0}), "every assistant message has weight 0"),
    (_chat(_USER, {**_ASSISTANT, "weight": 0.5}), "messages[1].weight must be 0 or 1"),
    (_chat(), "'messages' must be a non-empty array"),
    (b'{"prompt": "Hi", "completion": "Yo"}', "a file is either all chat rows ('messages') or none"),
])
def test_bad_chat_lines_are_400_naming_the_line_and_the_reason(make_client, bad: bytes,
                                                               reason: str):
    client = make_client()
    response = _upload(client, _GOOD_CHAT + b"\n\n" + bad + b"\n" + _GOOD_CHAT + b"\n")
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"].startswith("line 3: ") and reason in error["message"], error
    assert error["param"] == "file" and error["type"] == "invalid_request_error"
    assert _file_rows(client) == 0 and _stored_keys(client) == []


TOOL_SET = Path(__file__).parents[1] / "data" / "tool_calls20" / "train.jsonl"


def test_openai_function_calling_files_upload_as_they_are(make_client):
    # tools, tool_calls, tool results, parallel_tool_calls, legacy functions, developer
    # messages, text parts, names and weights: OpenAI's supervised format, unchanged
    client = make_client()
    body = _upload(client, TOOL_SET.read_bytes(), name="tools.jsonl").json()
    assert (body["task"], body["num_examples"], body["status"]) == ("causal_lm", 20, "processed")
    parts = _chat({"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                  {"role": "user", "content": [{"type": "text", "text": "Hi"}], "name": "ann"},
                  {**_ASSISTANT, "weight": 0}, _USER, {**_ASSISTANT, "weight": 1})
    assert _upload(client, parts + b"\n").json()["num_examples"] == 1


def test_an_openai_row_whose_tool_result_answers_no_call_is_400_naming_the_line(make_client):
    client = make_client()
    lines = TOOL_SET.read_bytes().splitlines(keepends=True)
    broken = lines[1].replace(b'"tool_call_id": "call_1"', b'"tool_call_id": "call_9"')
    response = _upload(client, b"".join([lines[0], broken, *lines[2:]]))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"].startswith("line 2: messages[3].tool_call_id 'call_9' answers no "
                                       "pending call"), error
    assert _file_rows(client) == 0 and _stored_keys(client) == []


def test_too_many_lines_is_400(make_client):
    client = make_client(max_file_lines=2)
    response = _upload(client, b'{"text": "a"}\n' * 3)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("line 3: ")


def test_oversize_upload_is_413_and_nothing_is_stored(make_client, data_dir: Path):
    client = make_client(max_upload_bytes=1000)
    response = _upload(client, _head(data_dir / "sst2" / "train.jsonl", 100))
    assert response.status_code == 413
    assert response.json()["error"]["param"] == "file"
    assert _file_rows(client) == 0 and _stored_keys(client) == []


def test_wrong_purpose_is_400(make_client):
    response = _upload(make_client(), b'{"text": "a"}\n', purpose="assistants")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "purpose"


def test_cross_tenant_file_is_404(make_client):
    client = make_client(api_keys=KEYS)
    file_id = _upload(client, b'{"text": "a", "label": "x"}\n', headers=ALICE).json()["id"]
    for method, path in [("GET", f"/v1/files/{file_id}"), ("GET", f"/v1/files/{file_id}/content"),
                         ("DELETE", f"/v1/files/{file_id}")]:
        response = client.request(method, path, headers=BOB)
        assert response.status_code == 404, (method, path)
        assert response.json()["error"]["param"] == "file_id"
    assert client.get("/v1/files", headers=BOB).json()["data"] == []
    assert client.get(f"/v1/files/{file_id}/content", headers=ALICE).status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"},
                                     {"Authorization": "Basic a2E6"}])
def test_missing_or_unknown_key_is_401(make_client, headers: dict[str, str]):
    response = make_client(api_keys=KEYS).get("/v1/files", headers=headers)
    assert response.status_code == 401
    assert set(response.json()["error"]) == {"code", "message", "param", "type"}
    assert response.json()["error"]["type"] == "authentication_error"


def test_keys_sync_is_idempotent_across_restarts(make_client):
    make_client(api_keys=KEYS)
    client = make_client(api_keys=KEYS + ",kc:alice")
    file_id = _upload(client, b'{"text": "a"}\n', headers={"Authorization": "Bearer kc"}).json()["id"]
    assert client.get(f"/v1/files/{file_id}", headers=ALICE).status_code == 200


def test_open_mode_needs_no_key(make_client):
    client = make_client()
    assert _upload(client, b'{"prompt": "", "completion": "hi"}\n').status_code == 200
    assert len(client.get("/v1/files").json()["data"]) == 1


def test_storage_down_is_503(make_client, tmp_path: Path):
    client = make_client(storage_url="s3://b/p", s3_endpoint_url="http://127.0.0.1:1")
    response = _upload(client, b'{"text": "a"}\n')
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "service_unavailable"
    assert response.json()["error"]["type"] == "service_unavailable"
    assert _file_rows(client) == 0
