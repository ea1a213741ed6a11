"""Faults injected into real processes: workers SIGKILLed mid-training, Redis restarted with jobs
queued and running, 1,000 jobs created at once. Real PostgreSQL, a private Redis broker, real
`speft worker` processes (prefork pool, embedded beat running the reconciler), real training
(MiniLM; a tiny BERT for the 1,000 jobs), a real `speft serve` where the API is used.

Recovery is sped up by settings only (heartbeat every 0.5 s, presumed dead after 4 s of silence,
a reconciler sweep every second, queued jobs re-sent after 6 s); the code paths are the ones a
deployment runs.
"""
from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from sqlalchemy import func, select
from sqlalchemy.orm import selectinload
from standardwebhooks.webhooks import Webhook

from api.core.models import (
    Adapter,
    Job,
    JobStatus,
    RegisteredModel,
    WebhookDelivery,
    utcnow,
)
from api.core.storage import LocalStorage
from api.services.job_runs import adapter_id_for, attempt_key
from api.services.webhooks import create_endpoint
from speft_core.delta import load_delta
from speft_core.models import load_tokenizer, resolve_model
from tests.fixtures.cluster import Cluster, running_cluster
from tests.fixtures.jobs import SPEC
from tests.fixtures.processes import kill
from tests.fixtures.s3 import _free_port as free_port
from tests.fixtures.webhook_receiver import Receiver

pytestmark = pytest.mark.slow

KILLS = 5
TRAIN_STEPS = 12  # 192 sst2 lines at batch 16
RECOVERY = {"SPEFT_HEARTBEAT_INTERVAL_S": "0.5", "SPEFT_HEARTBEAT_TIMEOUT_S": "4",
            "SPEFT_RECONCILE_INTERVAL_S": "1", "SPEFT_REQUEUE_AFTER_S": "6",
            "SPEFT_MAX_ATTEMPTS": str(KILLS + 2)}
TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}


@pytest.fixture
def cluster(empty_postgres_url: str, tmp_path: Path, data_dir: Path) -> Iterator[Cluster]:
    """A fresh migrated PostgreSQL database, local storage, a private Redis; the processes are
    stopped afterwards."""
    with running_cluster(empty_postgres_url, tmp_path, data_dir,
                         storage=LocalStorage(tmp_path / "storage"),
                         SPEFT_STORAGE_URL=f"file://{tmp_path / 'storage'}",
                         **RECOVERY) as started:
        yield started


def _training_job(cluster: Cluster, steps: int = TRAIN_STEPS) -> str:
    lines = cluster.service.sst2("train", 16 * steps)
    return cluster.service.make_job(lines)


def _running_at(step: int, attempt: int):
    return lambda job: (job.status == JobStatus.RUNNING and job.attempts == attempt
                        and job.progress_step >= step)


def _assert_exactly_one_adapter(cluster: Cluster, job: Job) -> None:
    """One adapter row, one delta object (the winning attempt's), and it verifies."""
    with cluster.service.sessions() as session:
        adapters = session.scalars(select(Adapter).where(Adapter.job_id == job.id)).all()
    assert len(adapters) == 1 and adapters[0].id == job.adapter_id == adapter_id_for(job.id)
    winning_key = attempt_key(job.adapter_id, job.attempts)
    assert adapters[0].storage_key == winning_key
    assert cluster.adapter_objects() == [Path(winning_key).name]
    delta = load_delta(cluster.service.storage.get(winning_key, sha256=adapters[0].sha256))
    assert delta.nnz == adapters[0].nnz


def test_a_job_survives_its_worker_being_killed_five_times(cluster: Cluster) -> None:
    """SIGKILL the whole worker (pool child and beat included) at a random step, five times;
    each time a new worker's reconciler re-queues the job, and it ends succeeded exactly once."""
    rng = random.Random(20261123)
    job_id = _training_job(cluster)
    cluster.enqueue(job_id)
    killed_at = []
    for attempt in range(1, KILLS + 1):
        worker = cluster.start_worker()
        step = rng.randint(2, TRAIN_STEPS - 2)
        cluster.wait_for(job_id, _running_at(step, attempt), f"running attempt {attempt}")
        kill(worker)
        killed_at.append(cluster.job(job_id).progress_step)
    cluster.start_worker()
    job = cluster.wait_for(job_id, lambda j: j.status in TERMINAL, "terminal")
    assert job.status == JobStatus.SUCCEEDED, (job.error_code, job.error_message, cluster.output())
    assert job.attempts == KILLS + 1 and job.progress_step == TRAIN_STEPS
    assert all(2 <= step < TRAIN_STEPS for step in killed_at), killed_at
    _assert_exactly_one_adapter(cluster, job)
    events = cluster.events(job_id)
    assert sum("re-queued" in e and "stopped heart-beating" in e for e in events) == KILLS
    assert events.count("job succeeded") == 1


def test_a_killed_job_resumes_from_its_last_checkpoint_and_ends_as_an_unkilled_one(
        cluster: Cluster) -> None:
    """SIGKILL the worker after the step-6 checkpoint: the next worker resumes from step 6
    (not 0), and the adapter equals, bit for bit, that of the same job run without a kill."""
    lines = cluster.service.sst2("train", 16 * TRAIN_STEPS)
    hyper = {**SPEC["hyperparameters"], "checkpoint_every_steps": 3}
    killed, calm = (cluster.service.make_job(lines, hyperparameters=hyper) for _ in range(2))
    cluster.enqueue(killed)
    worker = cluster.start_worker()
    cluster.wait_for(killed, _running_at(8, 1), "running past the step-6 checkpoint")
    kill(worker)
    cluster.start_worker()
    job = cluster.wait_for(killed, lambda j: j.status in TERMINAL, "terminal")
    assert job.status == JobStatus.SUCCEEDED, (job.error_code, job.error_message, cluster.output())
    assert job.attempts == 2 and job.progress_step == TRAIN_STEPS
    events = cluster.events(killed)
    resumed = [e for e in events if e.startswith("resumed from step")]
    assert resumed in (["resumed from step 6"], ["resumed from step 9"]), events
    cluster.enqueue(calm)
    other = cluster.wait_for(calm, lambda j: j.status in TERMINAL, "terminal")
    assert other.status == JobStatus.SUCCEEDED and other.attempts == 1
    deltas = []
    for finished in (job, other):
        with cluster.service.sessions() as session:
            row = session.get(Adapter, finished.adapter_id)
        deltas.append(load_delta(cluster.service.storage.get(row.storage_key, sha256=row.sha256)))
    for name, (indices, values) in deltas[1].modules.items():
        assert torch.equal(deltas[0].modules[name][0], indices), name
        assert torch.equal(deltas[0].modules[name][1], values), name
    for name, tensor in deltas[1].extras.items():
        assert torch.equal(deltas[0].extras[name], tensor), name


def test_a_webhook_receiver_that_is_down_for_a_while_still_gets_the_event(
        cluster: Cluster, tmp_path: Path) -> None:
    """The job succeeds while its receiver is down; the worker's delivery task fails, backs
    off, and delivers, signed, once the receiver is up."""
    receiver = Receiver(free_port(), tmp_path / "received.jsonl")
    with cluster.service.sessions() as session:
        endpoint = create_endpoint(session, tenant_id=cluster.service.tenant_id,
                                   url=receiver.url, events=None, allow_loopback=True)
        session.commit()
        secret = endpoint.secret
    cluster.env.update(SPEFT_WEBHOOK_ALLOW_LOOPBACK="true", SPEFT_WEBHOOK_BACKOFF_S="1")
    job_id = _training_job(cluster, steps=3)
    cluster.enqueue(job_id)
    cluster.start_worker()
    job = cluster.wait_for(job_id, lambda j: j.status in TERMINAL, "terminal")
    assert job.status == JobStatus.SUCCEEDED, cluster.output()

    def delivery() -> WebhookDelivery:
        with cluster.service.sessions() as session:
            return session.scalars(select(WebhookDelivery).options(
                selectinload(WebhookDelivery.tries))
                .where(WebhookDelivery.job_id == job_id)).one()

    deadline = time.monotonic() + 60
    while len(delivery().tries) < 2:  # refused while the receiver is down
        assert time.monotonic() < deadline, cluster.output()
        time.sleep(0.2)
    receiver.start()
    try:
        while delivery().status != "delivered":
            assert time.monotonic() < deadline, (delivery().status, cluster.output())
            time.sleep(0.2)
    finally:
        receiver.stop()
    tries = delivery().tries
    assert all(t.status_code is None and t.error == "connection failed" for t in tries[:-1])
    assert tries[-1].status_code == 204 and len(receiver.received()) == 1
    got = receiver.received()[0]
    payload = Webhook(secret).verify(got["body"], got["headers"])
    assert payload["type"] == "fine_tuning.job.succeeded" and payload["data"]["id"] == job_id


def test_no_job_stays_queued_when_redis_restarts_with_jobs_queued_and_running(
        cluster: Cluster) -> None:
    """Redis (no persistence) restarts while one job trains and two wait in its queue: their
    messages are gone; the reconciler re-sends them and every job succeeds once."""
    job_ids = [_training_job(cluster, steps=8) for _ in range(3)]
    for job_id in job_ids:
        cluster.enqueue(job_id)
    cluster.start_worker()  # one pool process: one job runs, two wait in Redis
    running = cluster.wait_for(job_ids[0], _running_at(2, 1), "running")
    assert running.status == JobStatus.RUNNING
    assert all(cluster.job(j).status == JobStatus.QUEUED for j in job_ids[1:])
    restarted = utcnow()
    cluster.redis.restart()
    jobs = [cluster.wait_for(j, lambda job: job.status in TERMINAL, "terminal") for j in job_ids]
    assert [j.status for j in jobs] == [JobStatus.SUCCEEDED] * 3, cluster.output()
    with cluster.service.sessions() as session:
        adapters = session.scalar(select(func.count()).select_from(Adapter)
                                  .where(Adapter.job_id.in_(job_ids)))
    assert adapters == 3 and len(cluster.adapter_objects()) == 3
    for job_id in job_ids[1:]:  # their messages were lost with Redis: sent again after it
        assert any("sent again" in e for e in cluster.events(job_id, since=restarted)), \
            cluster.events(job_id)


def _tiny_bert_folder(folder: Path) -> Path:
    """A tiny random BERT classifier with MiniLM's tokenizer, saved as an HF folder."""
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = load_tokenizer(resolve_model("minilm-l6", "classification").path)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_thousand_jobs_created_at_once_all_end_and_the_counts_match(cluster: Cluster) -> None:
    """1,000 jobs POSTed concurrently (32 clients) to a real API, trained by a real worker on a
    tiny BERT for one step each: every accepted job ends succeeded, once, with one adapter."""
    jobs_wanted = 1000
    cluster.env.update(SPEFT_RATE_LIMIT="", SPEFT_MAX_ACTIVE_JOBS_PER_TENANT="0",
                       SPEFT_REQUEUE_AFTER_S="60")
    folder = _tiny_bert_folder(cluster.folder / "tiny-bert")
    with cluster.service.sessions() as session:
        session.add(RegisteredModel(id="tiny-bert", task="classification", params=1_000_000,
                                    local_path=str(folder)))
        session.commit()
    port = free_port()
    cluster.start_api(port)
    base = f"http://127.0.0.1:{port}/v1"
    by_label = {json.loads(line)["label"]: line for line in cluster.service.sst2("train", 16)}
    training = "\n".join(by_label.values()) + "\n"  # one example of each label
    with httpx.Client(base_url=base, timeout=60) as client:
        uploaded = client.post("/files", data={"purpose": "fine-tune"},
                               files={"file": ("two.jsonl", training.encode())})
        assert uploaded.status_code == 200, uploaded.text
        body = {"model": "tiny-bert", "training_file": uploaded.json()["id"],
                "method": {"type": "speft", "speft": {"metric": "magnitude", "density": 0.05,
                                                      "scoring_examples": 2}},
                "hyperparameters": {"n_epochs": 1, "batch_size": 2, "max_length": 16}}
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=32) as pool:
            answers = list(pool.map(lambda _: client.post("/fine_tuning/jobs", json=body),
                                    range(jobs_wanted)))
        created_s = time.monotonic() - started
    assert [a.status_code for a in answers] == [201] * jobs_wanted, answers[0].text
    accepted = {a.json()["id"] for a in answers}
    cluster.start_worker(concurrency=2)
    deadline = time.monotonic() + 600
    while True:
        with cluster.service.sessions() as session:
            statuses = {status: count for status, count in session.execute(
                select(Job.status, func.count()).where(Job.id.in_(accepted))
                .group_by(Job.status))}
        if sum(n for s, n in statuses.items() if s in TERMINAL) == jobs_wanted:
            break
        assert time.monotonic() < deadline, f"{statuses} after 600 s:\n{cluster.output()}"
        time.sleep(1)
    drained_s = time.monotonic() - started
    with cluster.service.sessions() as session:
        jobs_in_db = session.scalar(select(func.count()).select_from(Job))
        adapters = session.scalar(select(func.count()).select_from(Adapter)
                                  .where(Adapter.job_id.in_(accepted)))
        ran_twice = session.scalar(select(func.count()).select_from(Job).where(Job.attempts != 1))
    assert statuses == {JobStatus.SUCCEEDED: jobs_wanted}
    assert jobs_in_db == len(accepted) == adapters == jobs_wanted
    assert ran_twice == 0 and len(cluster.adapter_objects()) == jobs_wanted
    print(f"\n{jobs_wanted} jobs: created in {created_s:.1f} s, all succeeded after "
          f"{drained_s:.1f} s")
