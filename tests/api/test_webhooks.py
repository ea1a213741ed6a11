"""Webhooks: endpoints through the API, URL safety, and deliveries to a real receiver process
(signed as Standard Webhooks says, retried until it answers 2xx, every attempt listed)."""
from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select
from standardwebhooks.webhooks import Webhook

from api.core.config import get_settings
from api.core.models import WebhookDelivery
from tests.api.conftest import ClientFactory, RunJob
from tests.api.test_jobs_api import ALICE, BOB, KEYS, upload
from tests.fixtures.s3 import _free_port as free_port
from tests.fixtures.webhook_receiver import Receiver


@pytest.mark.parametrize("url, fragment", [
    ("ftp://example.com/hook", "http:// or https://"),
    ("http:///nohost", "http:// or https://"),
    ("http://10.1.2.3/hook", "non-public address 10.1.2.3"),
    ("http://169.254.169.254/latest/meta-data", "non-public address 169.254.169.254"),
    ("http://user:pw@example.com/", "credentials"),
    ("http://127.0.0.1:9/hook", "SPEFT_WEBHOOK_ALLOW_LOOPBACK"),
])
def test_unsafe_urls_are_a_400_naming_the_url(make_client: ClientFactory, url, fragment):
    client = make_client(api_keys=KEYS)
    answer = client.post("/v1/webhooks", json={"url": url}, headers=ALICE)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "url" and fragment in answer.json()["error"]["message"]


def test_endpoints_show_their_secret_once_and_belong_to_their_tenant(make_client: ClientFactory):
    client = make_client(api_keys=KEYS, webhook_allow_loopback=True)
    created = client.post("/v1/webhooks", headers=ALICE, json={
        "url": "http://127.0.0.1:9/hook",
        "events": ["fine_tuning.job.succeeded", "fine_tuning.job.checkpoint.created"]})
    assert created.status_code == 201, created.text
    endpoint = created.json()
    assert endpoint["secret"].startswith("whsec_") and endpoint["id"].startswith("whep-")
    Webhook(endpoint["secret"])  # a valid Standard Webhooks secret
    listed = client.get("/v1/webhooks", headers=ALICE).json()["data"]
    assert [e["id"] for e in listed] == [endpoint["id"]] and "secret" not in listed[0]
    assert client.get(f"/v1/webhooks/{endpoint['id']}", headers=BOB).status_code == 404
    assert client.get("/v1/webhooks", headers=BOB).json()["data"] == []
    bad = client.post("/v1/webhooks", headers=ALICE,
                      json={"url": "http://127.0.0.1:9/", "events": ["job.done"]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "events"
    assert client.delete(f"/v1/webhooks/{endpoint['id']}", headers=ALICE).status_code == 200
    assert client.get(f"/v1/webhooks/{endpoint['id']}", headers=ALICE).status_code == 404


def test_a_finished_job_is_delivered_signed_after_retries(make_client: ClientFactory,
                                                          run_job: RunJob, data_dir: Path,
                                                          tmp_path: Path, monkeypatch):
    from worker import webhooks as delivery

    monkeypatch.setenv("SPEFT_WEBHOOK_ALLOW_LOOPBACK", "true")
    get_settings.cache_clear()
    receiver = Receiver(free_port(), tmp_path / "received.jsonl", fail_first=2).start()
    try:
        client = make_client(api_keys=KEYS, webhook_allow_loopback=True)
        client.app.state.enqueue_job = lambda job_id, device: None
        endpoint = client.post("/v1/webhooks", headers=ALICE, json={
            "url": receiver.url, "events": ["fine_tuning.job.succeeded",
                                            "fine_tuning.job.checkpoint.created"]}).json()
        lines = b"".join((data_dir / "sst2" / "train.jsonl").read_bytes().splitlines(True)[:32])
        job_id = client.post("/v1/fine_tuning/jobs", headers=ALICE, json={
            "model": "minilm-l6", "training_file": upload(client, lines),
            "method": {"type": "speft", "speft": {"metric": "magnitude", "density": 500,
                                                  "scoring_examples": 8}},
            "hyperparameters": {"n_epochs": 1, "batch_size": 16, "max_length": 16}}).json()["id"]
        run_job(job_id)
        with client.app.state.sessions() as session:
            deliveries = session.scalars(select(WebhookDelivery).where(
                WebhookDelivery.job_id == job_id).order_by(WebhookDelivery.created_at)).all()
            ids = [(d.id, d.event_type) for d in deliveries]
        assert [kind for _, kind in ids] == ["fine_tuning.job.checkpoint.created",
                                             "fine_tuning.job.succeeded"]
        for delivery_id, _ in ids:  # the worker's task, run here; Celery retries it eagerly
            assert delivery.deliver_webhook.apply(args=[delivery_id]).get() == "delivered"
    finally:
        receiver.stop()
    received = receiver.received()
    assert [r["status"] for r in received] == [500, 500, 204, 204]  # two failures, then both
    verifier = Webhook(endpoint["secret"])
    succeeded = received[-1]
    payload = verifier.verify(succeeded["body"], succeeded["headers"])  # raises when forged
    assert payload["type"] == "fine_tuning.job.succeeded"
    assert payload["data"]["id"] == job_id and payload["data"]["status"] == "succeeded"
    assert payload["data"]["fine_tuned_model"].startswith("adapter-")
    assert {r["headers"]["webhook-id"] for r in received[:3]} == {ids[0][0]}  # retries keep it
    with pytest.raises(Exception, match="signature"):
        verifier.verify(succeeded["body"].replace("succeeded", "failed"), succeeded["headers"])
    listed = client.get(f"/v1/webhooks/{endpoint['id']}/deliveries", headers=ALICE).json()["data"]
    by_id = {d["id"]: d for d in listed}
    first = by_id[ids[0][0]]
    assert first["status"] == "delivered"
    assert [a["status_code"] for a in first["attempts"]] == [500, 500, 204]
    assert [a["number"] for a in first["attempts"]] == [1, 2, 3]
