"""GET /metrics: Prometheus text with request counts by route template and jobs by status."""
from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_requests_by_route_and_jobs_by_status(make_client):
    client = make_client()
    sample = "".join(json.dumps({"text": f"s {i}", "label": "ab"[i % 2]}) + "\n" for i in range(8))
    file_id = client.post("/v1/files", data={"purpose": "fine-tune"},
                          files={"file": ("t.jsonl", sample.encode())}).json()["id"]
    client.app.state.enqueue_job = type("Recorder", (), {"__call__": lambda self, job_id, device: None,
                                                          "check": lambda self: None})()
    job = client.post("/v1/fine_tuning/jobs", json={"model": "minilm-l6", "training_file": file_id})
    assert job.status_code == 201
    for _ in range(3):
        assert client.get(f"/v1/fine_tuning/jobs/{job.json()['id']}").status_code == 200
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
