"""Job bodies are validated at the edge, and every error names its field."""
from __future__ import annotations

from typing import get_args

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.errors import NotFound, install_error_handlers
from api.schemas.common import TaskName
from api.schemas.jobs import JobCreate
from speft_core.config import TASKS, SpeftConfig, TrainConfig
from speft_core.errors import DatasetFormatError


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/jobs")
    def create(body: JobCreate) -> dict:
        return body.stored_body(body.task or "classification", body.device or "cpu")

    @app.get("/missing")
    def missing() -> None:
        raise NotFound("no such job 'ftjob-x'", param="job_id")

    @app.get("/core")
    def core() -> None:
        raise DatasetFormatError("'label' must be a string or integer, got null", line=7, param="label")

    return TestClient(app)


BODY = {"model": "minilm-l6", "training_file": "file-abc"}


def test_defaults_come_from_the_core_dataclasses(client):
    resp = client.post("/jobs", json=BODY)
    assert resp.status_code == 200
    body = resp.json()
    speft, hyper = body["method"]["speft"], body["hyperparameters"]
    assert speft["metric"] == SpeftConfig.metric and speft["density"] == SpeftConfig.density
    assert hyper["n_epochs"] == TrainConfig.n_epochs and hyper["batch_size"] == TrainConfig.batch_size


@pytest.mark.parametrize("speft,param", [
    ({"density": 0}, "method.speft.density"),
    ({"density": -1}, "method.speft.density"),
    ({"density": 2.5}, "method.speft.density"),
    ({"metric": "nope"}, "method.speft.metric"),
    ({"scope": "row"}, "method.speft.scope"),
    ({"mask": "dynamic", "update_interval": 0}, "method.speft.update_interval"),
    ({"mask": "sometimes"}, "method.speft.mask"),
    ({"update_interval": "often"}, "method.speft.update_interval"),
    ({"bogus": 1}, "method.speft.bogus"),
])
def test_bad_method_settings_are_422_naming_the_field(client, speft, param):
    resp = client.post("/jobs", json={**BODY, "method": {"type": "speft", "speft": speft}})
    assert resp.status_code == 422
    error = resp.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error" and error["message"]


def test_unknown_metric_lists_valid_names(client):
    resp = client.post("/jobs", json={**BODY, "method": {"speft": {"metric": "nope"}}})
    assert "gradient" in resp.json()["error"]["message"] and "synflow" in resp.json()["error"]["message"]


@pytest.mark.parametrize("hyper,param", [
    ({"n_epochs": 0}, "hyperparameters.n_epochs"),
    ({"n_epochs": 10_000}, "hyperparameters.n_epochs"),
    ({"batch_size": 0}, "hyperparameters.batch_size"),
    ({"learning_rate": -1}, "hyperparameters.learning_rate"),
    ({"batch_size": "many"}, "hyperparameters.batch_size"),
    ({"epochs": 3}, "hyperparameters.epochs"),
])
def test_bad_hyperparameters_are_422_naming_the_field(client, hyper, param):
    resp = client.post("/jobs", json={**BODY, "hyperparameters": hyper})
    assert resp.status_code == 422
    assert resp.json()["error"]["param"] == param


def test_missing_and_unknown_top_level_fields(client):
    resp = client.post("/jobs", json={"model": "minilm-l6"})
    assert resp.status_code == 422 and resp.json()["error"]["param"] == "training_file"
    resp = client.post("/jobs", json={**BODY, "colour": "red"})
    assert resp.status_code == 422 and resp.json()["error"]["param"] == "colour"
    resp = client.post("/jobs", json={**BODY, "task": "translation"})
    assert resp.status_code == 422 and resp.json()["error"]["param"] == "task"


def test_api_and_core_errors_share_the_one_shape(client):
    resp = client.get("/missing")
    assert resp.status_code == 404
    assert resp.json() == {"error": {"code": "not_found", "message": "no such job 'ftjob-x'",
                                     "param": "job_id", "type": "invalid_request_error"}}
    resp = client.get("/core")
    assert resp.status_code == 400
    assert resp.json()["error"]["message"].startswith("line 7:")
    assert resp.json()["error"]["param"] == "label"
    resp = client.get("/no-such-route")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"


def test_schema_tasks_match_the_core():
    assert set(get_args(TaskName)) == set(TASKS)
