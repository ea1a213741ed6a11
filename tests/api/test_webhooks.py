"""Webhooks: endpoints through the API (at most 20 a tenant, also under concurrent creates), and
deliveries to a real receiver process: signed as Standard Webhooks says, retried until it answers
2xx, every attempt listed without network detail, and each attempt over within
SPEFT_WEBHOOK_TIMEOUT_S however slowly the receiver answers. URL safety: test_webhook_urls.py."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from standardwebhooks.webhooks import Webhook

from api.core.config import Settings, get_settings
from api.core.models import WebhookDelivery
from api.main import create_app
from api.services.webhooks import MAX_ENDPOINTS_PER_TENANT, record_event
from tests.api.conftest import ClientFactory, RunJob
from tests.api.test_jobs_api import ALICE, BOB, KEYS, upload
from tests.fixtures.s3 import _free_port as free_port
from tests.fixtures.servers import uvicorn_in_thread
from tests.fixtures.webhook_receiver import Receiver

TIMEOUT_S = 2.0  # SPEFT_WEBHOOK_TIMEOUT_S in the attempt tests
MARGIN_S = 3.0  # what a loaded test machine may add to it


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


@pytest.fixture
def deliver(make_client: ClientFactory, run_job: RunJob,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], dict[str, Any]]]:
    """`deliver(url)`: one final attempt of a new delivery to a new endpoint at `url`, by the
    worker's task in this process (SPEFT_WEBHOOK_TIMEOUT_S=2, loopback allowed); the delivery
    as the API lists it, plus the attempt's wall time in `wall_s`."""
    from worker import webhooks as delivery

    monkeypatch.setenv("SPEFT_WEBHOOK_ALLOW_LOOPBACK", "true")
    monkeypatch.setenv("SPEFT_WEBHOOK_TIMEOUT_S", str(TIMEOUT_S))
    get_settings.cache_clear()
    client = make_client(api_keys=KEYS, webhook_allow_loopback=True)

    def run(url: str) -> dict[str, Any]:
        endpoint = client.post("/v1/webhooks", headers=ALICE, json={"url": url}).json()
        with client.app.state.sessions() as session:
            tenant_id = session.get(delivery.WebhookEndpoint, endpoint["id"]).tenant_id
            [delivery_id] = record_event(session, tenant_id=tenant_id,
                                         event_type="fine_tuning.job.succeeded", data={"id": 1})
            session.commit()
        started = time.monotonic()
        delivery.deliver_webhook.apply(args=[delivery_id],
                                       retries=delivery.deliver_webhook.max_retries)
        wall_s = time.monotonic() - started
        [listed] = client.get(f"/v1/webhooks/{endpoint['id']}/deliveries",
                              headers=ALICE).json()["data"]
        return {**listed, "wall_s": wall_s}

    yield run
    get_settings.cache_clear()


def test_a_failed_attempt_is_listed_without_network_detail(deliver):
    listed = deliver(f"http://127.0.0.1:{free_port()}/hooks")  # nothing listens there
    assert listed["status"] == "failed"
    assert [a["error"] for a in listed["attempts"]] == ["connection failed"]
    assert listed["attempts"][0]["status_code"] is None


def _deliver_to_trickling(deliver: Callable[[str], dict[str, Any]], folder: Path,
                          what: str) -> tuple[dict[str, Any], list[float]]:
    """Deliver to a receiver that trickles its `what` (headers or body) a byte every 0.3 s
    for 40 s: the delivery listed, and how long the receiver had trickled when hung up on."""
    receiver = Receiver(free_port(), folder / "received.jsonl", trickle=what, every_s=0.3,
                        for_s=40).start()
    try:
        listed = deliver(receiver.url)
        deadline = time.monotonic() + 15
        while not receiver.hang_ups() and time.monotonic() < deadline:
            time.sleep(0.1)
        return listed, receiver.hang_ups()
    finally:
        receiver.stop()


def test_a_receiver_that_trickles_its_headers_is_given_up_at_the_deadline(deliver, tmp_path):
    """No single read ever waits 2 s, yet the attempt ends within SPEFT_WEBHOOK_TIMEOUT_S, as
    "timed out", and the receiver sees the hang-up."""
    listed, hang_ups = _deliver_to_trickling(deliver, tmp_path, "headers")
    assert [a["error"] for a in listed["attempts"]] == ["timed out"]
    assert listed["wall_s"] < TIMEOUT_S + MARGIN_S, listed
    assert hang_ups and hang_ups[0] < TIMEOUT_S + MARGIN_S, hang_ups


def test_the_body_of_an_answer_is_never_read(deliver, tmp_path):
    """200 with a 100,000-byte body trickled: the status is all that counts, so the delivery
    is delivered at once and the connection closed."""
    listed, hang_ups = _deliver_to_trickling(deliver, tmp_path, "body")
    assert listed["status"] == "delivered" and listed["attempts"][0]["status_code"] == 200
    assert listed["wall_s"] < TIMEOUT_S + MARGIN_S, listed
    assert hang_ups and hang_ups[0] < TIMEOUT_S + MARGIN_S, hang_ups


def test_the_endpoint_limit_holds_under_concurrent_creates(backend_settings: dict[str, Any]):
    """40 clients create endpoints at once through a real server: exactly 20 exist, the other
    creates are a 400 naming `url`."""
    wanted = 2 * MAX_ENDPOINTS_PER_TENANT
    app = create_app(Settings(**backend_settings, api_keys=KEYS, webhook_allow_loopback=True))
    with uvicorn_in_thread(app) as base, httpx.Client(base_url=base, headers=ALICE,
                                                      timeout=120) as client:
        with ThreadPoolExecutor(max_workers=wanted) as pool:
            answers = list(pool.map(lambda i: client.post(
                "/v1/webhooks", json={"url": f"http://127.0.0.1:9/hook/{i}"}), range(wanted)))
        listed = client.get("/v1/webhooks").json()["data"]
    codes = sorted(answer.status_code for answer in answers)
    limit = MAX_ENDPOINTS_PER_TENANT
    assert codes == [201] * limit + [400] * (wanted - limit), \
        [answer.text for answer in answers if answer.status_code not in (201, 400)][:3]
    assert len(listed) == MAX_ENDPOINTS_PER_TENANT
    refused = [a.json()["error"] for a in answers if a.status_code == 400]
    assert all(e["param"] == "url" and "at most 20" in e["message"] for e in refused), refused[0]
