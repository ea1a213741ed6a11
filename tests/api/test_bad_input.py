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

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save as safetensors_save

from api.core.config import get_settings
from api.core.db import dispose_engine
from api.core.models import JobStatus
from api.services.files import _lines
from api.services.jobs import USER_ERROR
from speft_core.delta import (
    EXTRA_PREFIX,
    FORMAT,
    INDICES_SUFFIX,
    VALUES_SUFFIX,
    Delta,
    delta_to_bytes,
)
from speft_core.models import bundled_minilm_path, load_model
from speft_core.serving import random_delta
from tests.api.conftest import ClientFactory
from tests.api.test_adapters_api import make_adapter
from tests.api.test_files_api import _file_rows, _stored_keys
from tests.api.test_jobs_api import ALICE, KEYS
from worker import tasks

RunJob = Callable[[str], None]


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


def test_a_long_line_is_bounded_by_the_upload_limit_alone(make_client: ClientFactory) -> None:
    client = make_client(max_upload_bytes=4 << 20)
    long_line = labelled("a", "b") + jsonl({"text": "word " * 600_000, "label": "a"})  # 3 MB
    response = upload(client, long_line)
    assert response.status_code == 200, response.text
    assert response.json()["num_examples"] == 3
    assert client.get(f"/v1/files/{response.json()['id']}/content").content == long_line

    too_long = jsonl({"text": "word " * 900_000, "label": "a"})  # one 4.5 MB line
    assert_refused(upload(client, too_long), 413, "file", "larger than")
    assert _file_rows(client) == 1


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


@pytest.fixture
def run_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunJob]:
    """The worker's run_job, in process, on the database and storage of `make_client`'s app."""
    monkeypatch.setenv("SPEFT_DATABASE_URL", f"sqlite:///{tmp_path / 'speft.db'}")
    monkeypatch.setenv("SPEFT_STORAGE_URL", f"file://{tmp_path / 'storage'}")
    get_settings.cache_clear()
    dispose_engine()
    tasks.get_storage.cache_clear()
    try:
        yield tasks.run_job.run
    finally:
        dispose_engine(close=True)
        tasks.get_storage.cache_clear()
        monkeypatch.undo()
        get_settings.cache_clear()


SMALL = {"method": {"type": "speft", "speft": {"metric": "magnitude", "density": 500,
                                               "scoring_examples": 8}},
         "hyperparameters": {"n_epochs": 1, "batch_size": 4, "max_length": 16}}


@pytest.mark.parametrize("training, validation, change, param, fragment", [
    (labelled("pos", "neg"), labelled("pos", "neutral"), {}, "label",
     "line 2: label 'neutral' is not in the training labels"),
    (labelled("pos", "pos", "pos"), None, {}, "training_file", "a single label ('pos')"),
    (labelled("pos", "neg"), None, {"hyperparameters": {"max_length": 1024}},
     "hyperparameters.max_length", "max_length 1024 is beyond the 512 positions of minilm-l6"),
], ids=["label only in validation", "one class", "max_length beyond positions"])
def test_what_only_training_can_tell_fails_the_job_as_user_error(
        make_client: ClientFactory, run_job: RunJob, training: bytes, validation: bytes | None,
        change: dict[str, Any], param: str, fragment: str) -> None:
    client = make_client()
    client.app.state.enqueue_job = lambda job_id, device: None
    body: dict[str, Any] = {"model": "minilm-l6", **SMALL, **change,
                            "training_file": upload(client, training).json()["id"]}
    if validation is not None:
        body["validation_file"] = upload(client, validation).json()["id"]
    created = client.post("/v1/fine_tuning/jobs", json=body)
    assert created.status_code == 201, created.text

    run_job(created.json()["id"])
    job = client.get(f"/v1/fine_tuning/jobs/{created.json()['id']}").json()
    assert (job["status"], job["error"]["code"]) == (JobStatus.FAILED.value, USER_ERROR)
    assert job["error"]["param"] == param and fragment in job["error"]["message"], job["error"]
    assert job["adapter_id"] is None
