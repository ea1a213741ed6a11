"""The control worker beside the training one: in a real `speft worker` with one training slot,
the reconciler and webhook deliveries run on their own threads, never behind a training job.
A SIGKILLed worker's job is re-queued while the next worker trains another job, and reconcile
messages do not pile up; receivers that trickle their answers are given up at the deadline
while a training job starts at once. Real PostgreSQL, a private Redis, real processes (the
`cluster` fixture of test_worker_faults.py: heartbeats every 0.5 s, a worker presumed dead after
4 s of silence, a sweep every second), receivers on 127.0.0.1.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from api.core.models import JobStatus, WebhookDelivery
from api.services.webhooks import create_endpoint, record_event
from tests.faults.test_worker_faults import (  # noqa: F401 - `cluster` is a fixture
    _running_at,
    _training_job,
    cluster,
)
from tests.fixtures.cluster import Cluster
from tests.fixtures.processes import kill
from tests.fixtures.s3 import _free_port as free_port
from tests.fixtures.webhook_receiver import Receiver

pytestmark = pytest.mark.slow

BUSY_STEPS = 80  # a job long enough to hold the one training slot through the checks
PROMPT_S = 45.0  # how soon control work must happen while training runs (loaded CI included)
MAX_QUEUED_SWEEPS = 3  # reconcile messages waiting at any time (one a second are sent)
SLOW_RECEIVERS = 12
WEBHOOK_TIMEOUT_S = 3.0


def _control_queue_length(cluster: Cluster) -> int:
    """Messages waiting in the control queue (a Redis list named after it)."""
    client = redis.Redis.from_url(cluster.env["SPEFT_BROKER_URL"])
    return int(client.llen(cluster.env["SPEFT_QUEUE_PREFIX"] + "control"))


def test_a_dead_workers_job_is_requeued_while_the_next_worker_trains(cluster: Cluster) -> None:
    """SIGKILL a worker mid-job; the next worker (one training slot) trains another job, and
    its control worker re-queues the dead worker's job meanwhile, within seconds."""
    # No re-send of a job still queued while a worker starts: its duplicate message would
    # reach the second worker before the busy job.
    cluster.env.update(SPEFT_REQUEUE_AFTER_S="600")
    lost = _training_job(cluster)
    cluster.enqueue(lost)
    worker = cluster.start_worker()
    cluster.wait_for(lost, _running_at(2, 1), "running")
    kill(worker)
    busy = _training_job(cluster, steps=BUSY_STEPS)
    cluster.enqueue(busy)
    cluster.start_worker()
    cluster.wait_for(busy, _running_at(1, 1), "training on the second worker")
    started = time.monotonic()
    queued_sweeps = []
    while not any("re-queued" in event for event in cluster.events(lost)):
        assert cluster.job(busy).status == JobStatus.RUNNING, \
            f"the sweep waited for the training job to end:\n{cluster.output()}"
        assert time.monotonic() - started < PROMPT_S, cluster.output()
        queued_sweeps.append(_control_queue_length(cluster))
        time.sleep(0.5)
    assert cluster.job(busy).status == JobStatus.RUNNING  # re-queued while the slot was busy
    assert cluster.job(lost).status == JobStatus.QUEUED, (cluster.events(lost), cluster.output())
    for _ in range(6):  # the beat goes on sending one sweep a second; they are taken
        queued_sweeps.append(_control_queue_length(cluster))
        time.sleep(0.5)
    assert cluster.job(busy).status == JobStatus.RUNNING
    assert max(queued_sweeps) <= MAX_QUEUED_SWEEPS, queued_sweeps


def test_slow_receivers_are_given_up_at_the_deadline_and_training_starts_at_once(
        cluster: Cluster, tmp_path: Path) -> None:
    """Twelve endpoints on a receiver that trickles its headers a byte every 0.5 s for two
    minutes: while their deliveries are in flight a training job is claimed at once, and every
    attempt ends within SPEFT_WEBHOOK_TIMEOUT_S (plus a margin) as "timed out"."""
    receiver = Receiver(free_port(), tmp_path / "received.jsonl", trickle="headers",
                        every_s=0.5, for_s=120).start()
    cluster.env.update(SPEFT_WEBHOOK_ALLOW_LOOPBACK="true", SPEFT_WEBHOOK_MAX_RETRIES="0",
                       SPEFT_WEBHOOK_TIMEOUT_S=str(WEBHOOK_TIMEOUT_S))
    with cluster.service.sessions() as session:
        for number in range(SLOW_RECEIVERS):
            create_endpoint(session, tenant_id=cluster.service.tenant_id,
                            url=f"{receiver.url}/{number}", events=None, allow_loopback=True)
        ids = record_event(session, tenant_id=cluster.service.tenant_id,
                           event_type="fine_tuning.job.succeeded", data={"id": "ftjob-x"})
        session.commit()  # unsent: the worker's reconciler sends them
    job_id = _training_job(cluster, steps=3)
    try:
        cluster.start_worker()
        deadline = time.monotonic() + 120
        while not receiver.received():  # deliveries in flight: the receiver is trickling
            assert time.monotonic() < deadline, cluster.output()
            time.sleep(0.1)
        cluster.enqueue(job_id)
        sent = time.monotonic()
        cluster.wait_for(job_id, lambda job: job.status != JobStatus.QUEUED, "claimed")
        claimed_after_s = time.monotonic() - sent

        def deliveries() -> list[WebhookDelivery]:
            with cluster.service.sessions() as session:
                return list(session.scalars(select(WebhookDelivery).options(
                    selectinload(WebhookDelivery.tries)).where(WebhookDelivery.id.in_(ids))))

        while any(d.status == "pending" for d in deliveries()):
            assert time.monotonic() < deadline, cluster.output()
            time.sleep(0.2)
    finally:
        receiver.stop()
    assert claimed_after_s < PROMPT_S / 3, (claimed_after_s, cluster.output())
    attempts = [attempt for d in deliveries() for attempt in d.tries]
    assert len(attempts) == SLOW_RECEIVERS
    assert {attempt.error for attempt in attempts} == {"timed out"}
    assert max(a.duration_ms for a in attempts) < 1000 * (WEBHOOK_TIMEOUT_S + 3), attempts
