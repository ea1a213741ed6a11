"""GET /metrics: Prometheus text with request counts by route template and jobs by status."""
from __future__ import annotations

import json
from datetime import UTC

from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families

from api.observability import RequestMetricsMiddleware, RouteTemplates


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _queued_jobs(client: TestClient, count: int) -> list[str]:
    """`count` queued jobs on one small file (nothing is sent to a broker); their ids."""
    sample = "".join(json.dumps({"text": f"s {i}", "label": "ab"[i % 2]}) + "\n" for i in range(8))
    file_id = client.post("/v1/files", data={"purpose": "fine-tune"},
                          files={"file": ("t.jsonl", sample.encode())}).json()["id"]
    client.app.state.enqueue_job = type("Recorder", (), {"__call__": lambda self, job_id, device: None,
                                                          "check": lambda self: None})()
    ids = []
    for _ in range(count):
        job = client.post("/v1/fine_tuning/jobs",
                          json={"model": "minilm-l6", "training_file": file_id})
        assert job.status_code == 201
        ids.append(job.json()["id"])
    return ids


def test_metrics_count_requests_by_route_and_jobs_by_status(make_client):
    client = make_client()
    (job_id,) = _queued_jobs(client, 1)
    for _ in range(3):
        assert client.get(f"/v1/fine_tuning/jobs/{job_id}").status_code == 200
    assert client.get("/v1/fine_tuning/jobs/ftjob-missing").status_code == 404

    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    samples = _samples(resp.text)
    route = "/v1/fine_tuning/jobs/{job_id}"
    key = lambda status: ("speft_http_requests_total",
                          (("method", "GET"), ("route", route), ("status", status)))
    assert samples[key("200")] == 3 and samples[key("404")] == 1
    assert samples[("speft_jobs", (("status", "queued"),))] == 1
    assert samples[("speft_jobs", (("status", "running"),))] == 0
    assert not any("ftjob-" in str(labels) for _, labels in samples)  # ids never become labels


def _route_labels(client) -> set[tuple[str, str]]:
    """(method, route) of every request counted so far."""
    samples = _samples(client.get("/metrics").text)
    return {(dict(labels)["method"], dict(labels)["route"])
            for name, labels in samples if name == "speft_http_requests_total"}


def test_route_label_is_the_matched_template_whatever_the_id_looks_like(make_client):
    """Ids that are also pieces of the path (`f`, `jobs`, `v1`) never rewrite the template."""
    client = make_client()
    for job_id in ("f", "jobs", "v1", "fine_tuning", "%7Bjob_id%7D"):
        assert client.get(f"/v1/fine_tuning/jobs/{job_id}").status_code == 404
        assert client.get(f"/v1/fine_tuning/jobs/{job_id}/events").status_code == 404
    assert _route_labels(client) == {("GET", "/v1/fine_tuning/jobs/{job_id}"),
                                     ("GET", "/v1/fine_tuning/jobs/{job_id}/events")}


def test_unmatched_paths_and_unknown_methods_share_one_label_each(make_client):
    """404s of any path and non-standard methods cannot grow the label sets (one series each)."""
    client = make_client()
    for i in range(20):
        assert client.get(f"/no/such/path-{i}").status_code == 404
        assert client.request(f"X-METHOD-{i}", "/healthz").status_code == 405
    assert client.request("DELETE", "/healthz").status_code == 405
    assert _route_labels(client) == {("GET", "unmatched"), ("other", "/healthz"),
                                     ("DELETE", "/healthz")}


def test_metrics_need_the_token_when_one_is_set(make_client):
    client = make_client(metrics_token="scrape-secret")
    missing = client.get("/metrics")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["code"] == "invalid_metrics_token"
    wrong = client.get("/metrics", headers={"Authorization": "Bearer scrape-secreT"})
    assert wrong.status_code == 401 and "speft_" not in wrong.text
    right = client.get("/metrics", headers={"Authorization": "Bearer scrape-secret"})
    assert right.status_code == 200 and "speft_http_requests_total" in right.text
    assert "scrape-secret" not in repr(client.app.state.settings)


def test_metrics_are_open_when_the_token_is_empty(make_client):
    client = make_client(metrics_token="")
    assert client.app.state.settings.metrics_token is None
    assert client.get("/metrics").status_code == 200


def test_nested_and_twice_included_routers_get_their_full_templates():
    """The template carries every prefix, and a router included twice counts under the prefix
    the request came through."""
    inner = APIRouter()

    @inner.get("/items/{item_id}")
    def read_item(item_id: str) -> dict[str, str]:
        return {"id": item_id}

    outer = APIRouter()
    outer.include_router(inner, prefix="/inner")
    app = FastAPI()
    app.include_router(outer, prefix="/a")
    app.include_router(inner, prefix="/b")
    registry = CollectorRegistry()
    requests = Counter("r", "r", ["method", "route", "status"], registry=registry)
    latency = Histogram("l", "l", ["method", "route"], registry=registry)
    app.add_middleware(RequestMetricsMiddleware, requests=requests, latency=latency,
                       templates=RouteTemplates(app))
    with TestClient(app) as client:
        for path in ("/a/inner/items/a", "/b/items/b", "/b/items/inner"):
            assert client.get(path).status_code == 200
    count = lambda route: registry.get_sample_value(
        "r_total", {"method": "GET", "route": route, "status": "200"})
    assert (count("/a/inner/items/{item_id}"), count("/b/items/{item_id}")) == (1, 2)


def test_metrics_show_the_stalest_running_heartbeat(make_client):
    """`speft_job_heartbeat_age_seconds` is 0 with nothing running, then the age of the oldest
    heartbeat among running jobs (a worker that stopped beating shows as a growing age)."""
    from datetime import datetime, timedelta

    from sqlalchemy import update

    from api.core.models import Job

    client = make_client()
    age = lambda: _samples(client.get("/metrics").text)[("speft_job_heartbeat_age_seconds", ())]
    assert age() == 0
    ids = _queued_jobs(client, 2)
    now = datetime.now(UTC)
    with client.app.state.sessions.begin() as session:
        for job_id, seconds in zip(ids, (300, 20), strict=True):
            session.execute(update(Job).where(Job.id == job_id).values(
                status="running", heartbeat_at=now - timedelta(seconds=seconds)))
    assert 299 <= age() < 360
    with client.app.state.sessions.begin() as session:
        session.execute(update(Job).where(Job.id == ids[0]).values(status="failed"))
    assert 19 <= age() < 80
