"""Bad input through real requests, the cases other modules leave out: each is refused with a 4xx
naming the problem (`error.param`), or, where only training can tell, the job fails as
`user_error` naming it.

Already covered elsewhere: oversize upload 413, too many lines, malformed JSON, no examples,
non-object lines (test_files_api.py); out-of-range and unknown settings, huge `n_epochs`
(test_jobs_api.py, test_schemas.py); invalid UTF-8, BOM, field errors (core/test_data.py);
truncated, corrupt, NaN/Inf, out-of-range and wrong-fingerprint deltas on load and apply
(core/test_delta.py); a stored delta that fails its sha256 (test_inference_api.py,
test_adapters_api.py). Here the same corrupt deltas are also served through the API.
"""
from __future__ import annotations

import io
import json
import time
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save as safetensors_save

from api.core.models import File, JobStatus
from api.services.files import _lines
from api.services.jobs import USER_ERROR
from speft_core.data import MAX_LABELS
from speft_core.delta import (
    EXTRA_PREFIX,
    FORMAT,
    INDICES_SUFFIX,
    VALUES_SUFFIX,
    Delta,
    delta_to_bytes,
)
from speft_core.errors import DatasetFormatError
from speft_core.models import bundled_minilm_path, load_model
from speft_core.serving import random_delta
from tests.api.conftest import ClientFactory, RunJob
from tests.api.test_adapters_api import make_adapter
from tests.api.test_files_api import _file_rows, _stored_keys
from tests.api.test_jobs_api import ALICE, KEYS


def jsonl(*rows: dict[str, Any]) -> bytes:
    """Rows as JSONL bytes."""
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def labelled(*labels: str) -> bytes:
    """A classification file with one short text per label."""
    return jsonl(*({"text": f"review number {i}", "label": label}
                   for i, label in enumerate(labels)))


def upload(client: TestClient, content: bytes) -> httpx.Response:
    """POST `content` as a fine-tune file."""
    return client.post("/v1/files", files={"file": ("data.jsonl", content)},
                       data={"purpose": "fine-tune"})


def assert_refused(response: httpx.Response, status: int, param: str | None,
                   fragment: str) -> None:
    """`status` in the one error shape, naming `param`, its message containing `fragment`."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and fragment in error["message"], error


# --- uploads ----------------------------------------------------------------------------------


@pytest.mark.parametrize("content, fragment", [
    (b"", "no examples"),
    ('{"text": "café", "label": "x"}\n'.encode("latin-1"), "line 1: not valid UTF-8"),
    ('{"text": "café", "label": "x"}\n'.encode("utf-16"), "line 1: not valid UTF-8"),
    (labelled("a") + b'{"text": "\xff\xfe", "label": "b"}\n', "line 2: not valid UTF-8"),
])
def test_empty_file_and_wrong_encodings_are_400_naming_the_line(
        make_client: ClientFactory, content: bytes, fragment: str) -> None:
    client = make_client()
    assert_refused(upload(client, content), 400, "file", fragment)
    assert _file_rows(client) == 0 and _stored_keys(client) == []


def test_a_line_over_the_line_limit_is_400_naming_it(make_client: ClientFactory) -> None:
    client = make_client(max_line_bytes=1000)
    at_limit = jsonl({"text": "x" * (1000 - 26), "label": "a"})  # 1,000 bytes and its newline
    assert len(at_limit) == 1001
    response = upload(client, labelled("a", "b") + at_limit)
    assert response.status_code == 200 and response.json()["num_examples"] == 3, response.text
    over = jsonl({"text": "x" * (1000 - 25), "label": "a"})
    assert_refused(upload(client, labelled("a", "b") + over), 400, "file",
                   "line 3: the line is longer than 1000 bytes (SPEFT_MAX_LINE_BYTES)")
    no_newline = b'{"text": "' + b"y" * 5000  # the last line, never ended
    assert_refused(upload(client, labelled("a") + no_newline), 400, "file", "line 2: the line")
    assert _file_rows(client) == 1


def test_the_default_line_limit_is_one_mebibyte(make_client: ClientFactory) -> None:
    client = make_client(max_upload_bytes=4 << 20)
    long_line = jsonl({"text": "word " * 300_000, "label": "a"})  # one 1.5 MB line
    assert_refused(upload(client, labelled("a", "b") + long_line), 400, "file",
                   "line 3: the line is longer than 1048576 bytes")


def test_lines_are_limited_before_they_are_joined() -> None:
    pieces = iter([b"x" * 600] * 10_000)  # one 6 MB line, never ended
    with pytest.raises(DatasetFormatError, match="line 1: the line is longer than 1000 bytes"):
        list(_lines(pieces, max_line_bytes=1000))
    assert len(list(pieces)) == 10_000 - 2  # stopped at the second piece


DEEP = b'{"text": "a", "label": "b", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"


@pytest.mark.parametrize("content, fragment", [
    (labelled("a") + DEEP, "line 2: invalid JSON (nested too deeply)"),
    (b"[" * 100_000 + b"\n", "line 1: invalid JSON (nested too deeply)"),  # the first line
    (labelled("a") + b'{"text": "a", "label": ' + b"7" * 5000 + b"}\n",
     "line 2: invalid JSON (an integer longer than"),
    (b'{"text": "a", "label": ' + b"7" * 5000 + b"}\n", "line 1: invalid JSON (an integer"),
    (labelled("a") + b'{"text": "a\\ud800", "label": "b"}\n', "line 2: 'text' holds a lone"),
    (b'{"prompt": "", "completion": "\\udc00"}\n', "line 1: 'completion' holds a lone surrogate"),
], ids=["nested 100,000 deep", "first line nested", "5,000-digit integer",
        "first line 5,000 digits", "surrogate in a text", "surrogate in a completion"])
def test_json_python_cannot_hold_is_400_naming_the_line(
        make_client: ClientFactory, content: bytes, fragment: str) -> None:
    client = make_client()
    assert_refused(upload(client, content), 400, "file", fragment)
    assert _file_rows(client) == 0 and _stored_keys(client) == []


def test_one_label_too_many_is_400_naming_its_line(make_client: ClientFactory) -> None:
    client = make_client()
    labels = [f"class {i}" for i in range(MAX_LABELS)]
    assert upload(client, labelled(*labels, "class 0")).status_code == 200
    assert_refused(upload(client, labelled(*labels, "class 0", "one more")), 400, "file",
                   f"line {MAX_LABELS + 2}: label 'one more' is one more than the {MAX_LABELS}")


def test_lines_split_across_chunks_are_joined_in_linear_time() -> None:
    chunks = [b'{"a": 1', b"}\n{", b'"b"', b": 2}\n", b"\n", b'{"c": 3}']
    assert list(_lines(chunks)) == [b'{"a": 1}\n', b'{"b": 2}\n', b"\n", b'{"c": 3}']
    line = list(_lines([b"x" * 1000] * 1000 + [b"\n"]))  # one line from 1,000 chunks
    assert line == [b"x" * 1_000_000 + b"\n"]


def test_nul_characters_are_400_on_postgres(empty_postgres_url: str,
                                            make_client: ClientFactory) -> None:
    """Postgres cannot store a NUL in text or JSON (SQLite can): a 400, never a 500."""
    client = make_client(database_url=empty_postgres_url)
    client.app.state.enqueue_job = lambda job_id, device: None
    training_file = upload(client, labelled("a", "b")).json()["id"]
    body = {"model": "minilm-l6", "training_file": training_file}
    for response in (client.get("/v1/fine_tuning/jobs", params={"after": "ftjob-\x00"}),
                     client.get("/v1/files/file-%00"),
                     client.post("/v1/fine_tuning/jobs", json={**body, "metadata": {"k": "\x00"}}),
                     client.post("/v1/fine_tuning/jobs", json={**body, "suffix": None,
                                                               "training_file": "file-\x00"})):
        assert_refused(response, 400, None, "a value cannot be stored: ")
        assert "NUL" in response.text or "\\u0000" in response.text, response.text
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


# --- bounds the OpenAPI schema states (found by tests/api/test_fuzz.py) -------------------------


@pytest.mark.parametrize("path, body, param", [
    ("/v1/fine_tuning/jobs", {"method": {"speft": {"target_modules": []}}},
     "method.speft.target_modules"),
    ("/v1/completions", {"stop": "x" * 257}, "stop"),
    ("/v1/completions", {"stop": ["x" * 257]}, "stop"),
    ("/v1/completions", {"seed": 2**32}, "seed"),
    ("/v1/classifications", {"adapter": [{"id": f"a{i}"} for i in range(9)]}, "adapter"),
])
def test_values_beyond_the_documented_bounds_are_422_naming_the_field(
        make_client: ClientFactory, path: str, body: dict[str, Any], param: str) -> None:
    base = {"/v1/fine_tuning/jobs": {"model": "minilm-l6", "training_file": "file-x"},
            "/v1/completions": {"model": "stories-260k", "prompt": "Once"},
            "/v1/classifications": {"model": "minilm-l6", "input": "fine"}}[path]
    assert_refused(make_client().post(path, json={**base, **body}), 422, param,
                   param.rsplit(".", 1)[-1])


@pytest.mark.parametrize("path, field, value", [
    ("/v1/completions", "temperature", "NaN"),
    ("/v1/completions", "top_p", "Infinity"),
    ("/v1/chat/completions", "temperature", "-Infinity"),
    ("/v1/fine_tuning/jobs", "hyperparameters.learning_rate", "NaN"),
    ("/v1/fine_tuning/jobs", "method.speft.density", "NaN"),
])
def test_a_number_that_is_not_finite_is_refused_as_such(
        make_client: ClientFactory, path: str, field: str, value: str) -> None:
    base = {"/v1/fine_tuning/jobs": {"model": "minilm-l6", "training_file": "file-x"},
            "/v1/completions": {"model": "stories-260k", "prompt": "Once"},
            "/v1/chat/completions": {"model": "stories-260k",
                                     "messages": [{"role": "user", "content": "hi"}]}}[path]
    body = json.dumps({**base, **_nested(field, "__VALUE__")}).replace('"__VALUE__"', value)
    response = make_client().post(path, content=body,
                                  headers={"content-type": "application/json"})
    assert response.status_code in (400, 422), response.text
    error = response.json()["error"]
    assert error["param"] == field and "finite" in error["message"], error


def _nested(dotted: str, value: object) -> dict[str, Any]:
    """{"a": {"b": value}} for "a.b"."""
    *parents, leaf = dotted.split(".")
    body: dict[str, Any] = {leaf: value}
    for parent in reversed(parents):
        body = {parent: body}
    return body


def test_a_composition_naming_an_adapter_twice_is_400(make_client: ClientFactory) -> None:
    twice = [{"id": "adapter-a", "weight": 0.5}, {"id": "adapter-a", "weight": 0.5}]
    response = make_client().post("/v1/classifications",
                                  json={"model": "minilm-l6", "input": "fine", "adapter": twice})
    assert_refused(response, 400, "adapter", "appears twice")


def test_an_empty_purpose_is_422_and_another_purpose_400(make_client: ClientFactory) -> None:
    client = make_client()
    for purpose, status in (("", 422), ("assistants", 400)):
        response = client.post("/v1/files", files={"file": ("d.jsonl", labelled("a", "b"))},
                               data={"purpose": purpose})
        assert_refused(response, status, "purpose", "purpose")


# --- delta files that cannot be served ---------------------------------------------------------


def delta_file(delta: Delta, **replaced: torch.Tensor) -> bytes:
    """`delta` as file bytes with the named tensors replaced, written without the checks of
    `delta_to_bytes` (so a corrupt file can be made)."""
    tensors = {f"{name}{suffix}": tensor for name, (indices, values) in delta.modules.items()
               for suffix, tensor in ((INDICES_SUFFIX, indices), (VALUES_SUFFIX, values))}
    tensors.update({f"{EXTRA_PREFIX}{name}": tensor for name, tensor in delta.extras.items()})
    tensors.update(replaced)
    return safetensors_save(tensors, metadata={**delta.metadata, "format": FORMAT,
                                               "nnz": str(delta.nnz)})


def test_corrupt_stored_deltas_are_422_adapter_invalid_naming_the_problem(
        make_client: ClientFactory) -> None:
    base = load_model(bundled_minilm_path(), "classification", labels=["a", "b"])
    delta = random_delta(base, density=0.001, seed=1, labels=["neg", "pos"],
                         base_model="minilm-l6")
    name, (indices, values) = next(iter(delta.modules.items()))
    numel = base.get_submodule(name).weight.numel()
    out_of_range = torch.cat([indices[:-1], torch.tensor([numel], dtype=indices.dtype)])
    with_nan = values.clone()
    with_nan[0] = float("nan")
    other_base = Delta(delta.modules, delta.extras, {**delta.metadata,
                                                     "base_fingerprint": "f" * 64})
    corrupt = {
        "truncated": (delta_to_bytes(delta)[:-64], "truncated"),
        "another base": (delta_to_bytes(other_base), "trained on another base"),
        "index out of range": (delta_file(delta, **{name + INDICES_SUFFIX: out_of_range}),
                               "out of range"),
        "NaN value": (delta_file(delta, **{name + VALUES_SUFFIX: with_nan}), "NaN or Inf"),
    }
    client = make_client(api_keys=KEYS)
    client.app.state.enqueue_job = lambda job_id, device: None
    for case, (content, fragment) in corrupt.items():
        adapter_id = make_adapter(client, content=content)[1]
        response = client.post("/v1/classifications", headers=ALICE, json={
            "model": "minilm-l6", "adapter": adapter_id, "input": "a fine film"})
        assert_refused(response, 422, "adapter", fragment)
        assert response.json()["error"]["code"] == "adapter_invalid", case


# --- jobs: what only the worker can tell ------------------------------------------------------


SMALL = {"method": {"type": "speft", "speft": {"metric": "magnitude", "density": 500,
                                               "scoring_examples": 8}},
         "hyperparameters": {"n_epochs": 1, "batch_size": 4, "max_length": 16}}


@pytest.mark.parametrize("training, validation, param, fragment", [
    (labelled("pos", "neg"), labelled("pos", "neutral", "meh"), "validation_file",
     "the validation file has 2 label(s) the training file lacks: 'meh', 'neutral' "
     "(the training labels: 'neg', 'pos')"),
    (labelled("pos", "pos", "pos"), None, "training_file", "a single label ('pos')"),
], ids=["labels only in validation", "one class"])
def test_label_sets_a_classifier_cannot_train_on_are_400_at_job_creation(
        make_client: ClientFactory, training: bytes, validation: bytes | None, param: str,
        fragment: str) -> None:
    client = make_client()
    client.app.state.enqueue_job = lambda job_id, device: None
    body: dict[str, Any] = {"model": "minilm-l6", **SMALL,
                            "training_file": upload(client, training).json()["id"]}
    if validation is not None:
        body["validation_file"] = upload(client, validation).json()["id"]
    assert_refused(client.post("/v1/fine_tuning/jobs", json=body), 400, param, fragment)
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


def uploaded_before_labels_were_recorded(client: TestClient, file_id: str) -> str:
    """`file_id`, its recorded labels cleared as for a file uploaded before they were."""
    with client.app.state.sessions.begin() as session:
        session.get(File, file_id).labels = None
    return file_id


@pytest.mark.parametrize("training, validation, change, param, fragment", [
    (labelled("pos", "neg"), labelled("pos", "neutral"), {}, "validation_file",
     "the validation file has 1 label(s) the training file lacks: 'neutral'"),
    (labelled("pos", "pos", "pos"), None, {}, "training_file", "a single label ('pos')"),
    (labelled("pos", "neg"), None, {"hyperparameters": {"max_length": 1024}},
     "hyperparameters.max_length", "max_length 1024 is beyond the 512 positions of minilm-l6"),
    (labelled("pos", "neg"), None,
     {"method": {"type": "speft", "speft": {**SMALL["method"]["speft"],
                                            "target_modules": ["re:(.*)*x"]}}},
     "target_modules", "target pattern 're:(.*)*x' matches no Linear module"),
], ids=["label only in validation, an older upload", "one class, an older upload",
        "max_length beyond positions", "a regex Python's re backtracks on for hours"])
def test_what_only_training_can_tell_fails_the_job_as_user_error(
        make_client: ClientFactory, run_job: RunJob, training: bytes, validation: bytes | None,
        change: dict[str, Any], param: str, fragment: str) -> None:
    client = make_client()
    client.app.state.enqueue_job = lambda job_id, device: None
    body: dict[str, Any] = {"model": "minilm-l6", **SMALL, **change,
                            "training_file": uploaded_before_labels_were_recorded(
                                client, upload(client, training).json()["id"])}
    if validation is not None:
        body["validation_file"] = uploaded_before_labels_were_recorded(
            client, upload(client, validation).json()["id"])
    created = client.post("/v1/fine_tuning/jobs", json=body)
    assert created.status_code == 201, created.text

    started = time.perf_counter()
    run_job(created.json()["id"])
    assert time.perf_counter() - started < 60  # loading MiniLM and failing, not backtracking
    job = client.get(f"/v1/fine_tuning/jobs/{created.json()['id']}").json()
    assert (job["status"], job["error"]["code"]) == (JobStatus.FAILED.value, USER_ERROR)
    assert job["error"]["param"] == param and fragment in job["error"]["message"], job["error"]
    assert job["adapter_id"] is None


@pytest.mark.parametrize("patterns, fragment", [
    (["re:(query)\\1"], "invalid escape sequence"),  # a backreference: RE2 has none
    (["re:(?<=self\\.)query"], "invalid perl operator"),  # lookbehind
    (["re:(a"], "missing )"),
    (["q" * 257], "at most 256 characters"),
    (["query"] * 65, "at most 64 target patterns"),
], ids=["backreference", "lookbehind", "syntax", "too long", "too many"])
def test_target_patterns_are_checked_at_job_creation(
        make_client: ClientFactory, patterns: list[str], fragment: str) -> None:
    client = make_client()
    client.app.state.enqueue_job = lambda job_id, device: None
    body = {"model": "minilm-l6", "training_file": upload(client, labelled("a", "b")).json()["id"],
            "method": {"type": "speft", "speft": {"target_modules": patterns}}}
    response = client.post("/v1/fine_tuning/jobs", json=body)
    assert_refused(response, 400, "method.speft.target_modules", fragment)
    assert response.json()["error"]["code"] == "invalid_targets"
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


def stored_before_the_checks(client: TestClient, content: bytes) -> str:
    """A file whose bytes are `content`, as one uploaded before the upload checked them: a good
    file is uploaded, then its object and recorded size and sha256 are replaced."""
    file_id = upload(client, labelled("a", "b")).json()["id"]
    storage = client.app.state.storage
    with client.app.state.sessions() as session:
        row = session.get(File, file_id)
        stored = storage.put(row.storage_key, io.BytesIO(content), max_bytes=len(content))
        row.bytes, row.sha256 = stored.size, stored.sha256
        session.commit()
    return file_id


@pytest.mark.parametrize("content, param, fragment", [
    (labelled("a", "b") + b'{"text": "a\\ud800", "label": "b"}\n', "text",
     "line 3: 'text' holds a lone surrogate"),
    (labelled("a", "b") + DEEP, None, "line 3: invalid JSON (nested too deeply)"),
    (labelled("a", "b") + b'{"text": "a", "label": ' + b"7" * 5000 + b"}\n", None,
     "line 3: invalid JSON (an integer longer than"),
    (labelled(*(f"c{i}" for i in range(MAX_LABELS + 1))), "label",
     f"line {MAX_LABELS + 1}: label 'c{MAX_LABELS}' is one more than"),
], ids=["surrogate", "nested 100,000 deep", "5,000-digit integer", "one label too many"])
def test_a_file_stored_before_the_checks_fails_its_job_as_user_error(
        make_client: ClientFactory, run_job: RunJob, content: bytes, param: str | None,
        fragment: str) -> None:
    client = make_client()
    client.app.state.enqueue_job = lambda job_id, device: None
    body = {"model": "minilm-l6", **SMALL,
            "training_file": stored_before_the_checks(client, content)}
    created = client.post("/v1/fine_tuning/jobs", json=body)
    assert created.status_code == 201, created.text

    run_job(created.json()["id"])
    job = client.get(f"/v1/fine_tuning/jobs/{created.json()['id']}").json()
    assert (job["status"], job["error"]["code"]) == (JobStatus.FAILED.value, USER_ERROR), job
    assert job["error"]["param"] == param and fragment in job["error"]["message"], job["error"]
