"""A running job interrupted, with real processes: a pause withdrawn at the moment its worker
takes it, and object storage that refuses for a while or for good.

Real PostgreSQL, a private Redis, real `speft worker` (and `speft serve`) processes, real MiniLM
training, S3 on a moto server that the processes reach through a loopback TCP proxy: the test
takes the proxy down (every connection reset, as an endpoint that went away) or stalls it
(requests wait), and the moto server and its objects stay as they were.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from api.core.models import Checkpoint, JobStatus
from tests.fixtures.cluster import Cluster, s3_cluster_behind_proxy
from tests.fixtures.jobs import SPEC
from tests.fixtures.s3 import _free_port as free_port
from tests.fixtures.tcp_proxy import TcpProxy

pytestmark = pytest.mark.slow

# Heartbeat every 0.5 s, presumed dead after 4 s, a sweep every second: a job left `running`
# with nobody running it would be caught (and, without attempts left, failed) within seconds.
RECOVERY = {"SPEFT_HEARTBEAT_INTERVAL_S": "0.5", "SPEFT_HEARTBEAT_TIMEOUT_S": "4",
            "SPEFT_RECONCILE_INTERVAL_S": "1", "SPEFT_REQUEUE_AFTER_S": "30"}
TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}
WAIT_S = 60.0


@pytest.fixture
def cluster(empty_postgres_url: str, tmp_path: Path, data_dir: Path,
            s3_endpoint: str) -> Iterator[tuple[Cluster, TcpProxy]]:
    """A cluster on S3 behind a proxy the test controls."""
    with s3_cluster_behind_proxy(empty_postgres_url, tmp_path, data_dir, s3_endpoint,
                                 **RECOVERY) as started:
        yield started


def _job(cluster: Cluster, steps: int, **hyperparameters: object) -> str:
    """A queued job of `steps` optimizer steps (batch 16), sent to the workers."""
    job_id = cluster.service.make_job(cluster.service.sst2("train", 16 * steps),
                                      hyperparameters={**SPEC["hyperparameters"],
                                                       **hyperparameters})
    cluster.enqueue(job_id)
    return job_id


def _running_at(step: int):
    return lambda job: job.status == JobStatus.RUNNING and job.progress_step >= step


def _wait(what: str, condition, cluster: Cluster) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"not {what} after {WAIT_S:.0f} s:\n{cluster.output()}"
        time.sleep(0.05)


def test_a_pause_withdrawn_while_the_worker_takes_it_goes_on_from_its_checkpoint(cluster):
    """Pause, and resume while the worker is storing the pause's checkpoint: the API answers
    "pause withdrawn" (running), the worker finishes stopping anyway, then re-queues the job
    itself, and it goes on from that checkpoint to success. Nothing waits for the reconciler,
    and the pause costs no attempt (SPEFT_MAX_ATTEMPTS=1)."""
    cluster, proxy = cluster
    cluster.env.update(SPEFT_MAX_ATTEMPTS="1", SPEFT_DEFAULT_TENANT="acme")  # the jobs' tenant
    port = free_port()
    cluster.start_api(port)
    cluster.start_worker()
    job_id = _job(cluster, steps=16)
    cluster.wait_for(job_id, _running_at(2), "running")
    proxy.hold()  # storage stalls: the pause's checkpoint upload waits in the proxy
    with httpx.Client(base_url=f"http://127.0.0.1:{port}/v1/fine_tuning/jobs/{job_id}",
                      timeout=30) as api:
        paused = api.post("/pause")
        assert paused.status_code == 200 and paused.json()["status"] == "pause_requested", \
            paused.text
        _wait("storing the pause's checkpoint", proxy.held.is_set, cluster)
        resumed = api.post("/resume")
        assert resumed.status_code == 200 and resumed.json()["status"] == "running", resumed.text
        proxy.release()
        job = cluster.wait_for(job_id, lambda j: j.status != JobStatus.RUNNING or j.attempts > 1,
                               "re-queued by its worker")
        assert job.status in (JobStatus.QUEUED, JobStatus.RUNNING), job.status
    job = cluster.wait_for(job_id, lambda j: j.status in TERMINAL, "terminal")
    assert job.status == JobStatus.SUCCEEDED, (job.error_message, cluster.output())
    assert job.attempts == 2 and job.progress_step == job.progress_total == 16
    events = cluster.events(job_id)
    requeued = [e for e in events if e.startswith("job re-queued")]
    assert len(requeued) == 1 and "the pause was withdrawn after its worker had stopped" in \
        requeued[0], events
    step = int(requeued[0].split("stopped at step ")[1].split(";")[0])
    assert f"resumed from step {step}" in events, events
    assert not any("stopped heart-beating" in e for e in events), events


def test_a_storage_outage_at_start_and_mid_run_is_ridden_out(cluster):
    """Storage refuses while the claimed job opens it and reads its training file, and again
    while it stores a checkpoint: each call is retried with back-off until storage answers, and
    the job succeeds in its first attempt with every checkpoint stored."""
    cluster, proxy = cluster
    cluster.start_worker()
    proxy.down()
    job_id = _job(cluster, steps=8, checkpoint_every_steps=2)
    cluster.wait_for(job_id, lambda j: j.status == JobStatus.RUNNING, "claimed")
    _wait("retrying at the start", lambda: len(_retries(cluster)) >= 2, cluster)
    proxy.up()
    cluster.wait_for(job_id, _running_at(1), "training")
    proxy.down()
    _wait("retrying a checkpoint", lambda: any(" put checkpoints/" in r for r in _retries(cluster)),
          cluster)
    time.sleep(3)  # down a while longer: the next retries are refused too
    proxy.up()
    job = cluster.wait_for(job_id, lambda j: j.status in TERMINAL, "terminal")
    assert job.status == JobStatus.SUCCEEDED, (job.error_message, cluster.output())
    assert job.attempts == 1
    with cluster.service.sessions() as session:
        steps = session.scalars(select(Checkpoint.step).where(Checkpoint.job_id == job_id)
                                .order_by(Checkpoint.step)).all()
    assert list(steps) == [2, 4, 6, 8]
    assert not any(e.startswith("job re-queued") for e in cluster.events(job_id))


def _retries(cluster: Cluster) -> list[str]:
    """The storage retries the workers logged."""
    return [line for log in cluster.folder.glob("worker-*.log")
            for line in log.read_text(errors="replace").splitlines()
            if "speft.storage" in line and "refused (try" in line]


def test_storage_down_past_the_retries_requeues_the_job_then_fails_it_saying_why(cluster):
    """Storage goes down for good mid-run: after SPEFT_STORAGE_RETRY_S of retries the job is
    re-queued (it has an attempt left), the next attempt cannot read its inputs either, and the
    job fails with an error that names the storage, never "internal error" alone."""
    cluster, proxy = cluster
    cluster.env.update(SPEFT_STORAGE_RETRY_S="2", SPEFT_MAX_ATTEMPTS="2")
    cluster.start_worker()
    job_id = _job(cluster, steps=8, checkpoint_every_steps=2)
    cluster.wait_for(job_id, _running_at(1), "running")
    proxy.down()
    job = cluster.wait_for(job_id, lambda j: j.status in TERMINAL, "terminal")
    assert job.status == JobStatus.FAILED and job.error_code == "internal_error", cluster.output()
    assert job.error_message.startswith("object storage unavailable: S3 is not reachable")
    assert job.error_message.endswith("gave up after 2 failed attempts"), job.error_message
    assert job.attempts == 2
    events = cluster.events(job_id)
    assert any(e.startswith("job re-queued: object storage unavailable")
               and e.endswith("(failed attempt 1 of 2)") for e in events), events
