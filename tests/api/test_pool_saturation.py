"""200 concurrent requests of mixed kinds against a real `speft serve` on PostgreSQL: no 5xx, the
second tenant is answered within a bound, and the pools are visible on /metrics and /readyz.

Before the fix the connection taken at authentication was held while the request waited for one
of AnyIO's 40 threads, and 40 threads shared 30 connections: requests timed out on the pool
(503 "QueuePool limit of size 20 overflow 10 reached") while another tenant waited for minutes.
Now authentication has its own short transaction, inference releases its connection before the
model runs, and the thread limit equals the pool size, so requests queue for a thread, in order.
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from speft_core.delta import delta_to_bytes
from speft_core.models import bundled_minilm_path, load_model
from speft_core.serving.synthetic import random_delta
from tests.api.conftest import start_client
from tests.api.test_adapters_api import make_adapter
from tests.api.test_api_faults import Api
from tests.fixtures.processes import service_env, stop
from tests.fixtures.s3 import _free_port

pytestmark = pytest.mark.slow

ALICE = {"Authorization": "Bearer ka"}
BOB = {"Authorization": "Bearer kb"}
REQUESTS = 200  # in flight at once
SECOND_TENANT_BOUND_S = 15.0  # each of bob's requests, answered behind ~190 of alice's (2 cores)
BURST_BOUND_S = 90.0  # every request answered
KEYS = "ka:alice,kb:bob"
TIMED_OUT = 0  # the status recorded for a request not answered in time
TEXTS = ["a fine day", "a dull film"]


def _seed_adapter(folder: Path, database_url: str) -> str:
    """Alice's MiniLM classification adapter (a synthetic delta, as a finished job leaves it),
    written by an in-process app on the server's database and storage; its id."""
    base = load_model(bundled_minilm_path(), "classification", labels=["a", "b"])
    delta = random_delta(base, density=0.01, seed=1, labels=["neg", "pos"],
                         base_model="minilm-l6", scale=0.05)
    with ExitStack() as stack:
        client = start_client(stack, folder, database_url=database_url, api_keys=KEYS)
        client.app.state.enqueue_job = lambda job_id, device: None
        return make_adapter(client, content=delta_to_bytes(delta))[1]


def _mix(classify: dict[str, Any]) -> list[tuple[str, str, dict[str, str], dict | None]]:
    """(method, path, headers, json) of the burst: alice's models, jobs and classifications,
    and ten of bob's file listings spread through it."""
    kinds = [("GET", "/v1/models", ALICE, None), ("GET", "/v1/fine_tuning/jobs", ALICE, None),
             ("POST", "/v1/classifications", ALICE, classify), ("GET", "/v1/models", ALICE, None)]
    mix = [kinds[i % len(kinds)] for i in range(REQUESTS)]
    for i in range(0, REQUESTS, REQUESTS // 10):
        mix[i + 7] = ("GET", "/v1/files", BOB, None)
    return mix


async def _burst(url: str, classify: dict[str, Any]) -> tuple[list[tuple[str, int, float]], int]:
    """Send the mix at once: (path, status, seconds) of each, and /readyz's status mid-burst."""
    limits = httpx.Limits(max_connections=REQUESTS + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits,
                                 timeout=BURST_BOUND_S + 30) as client:
        async def one(method: str, path: str, headers: dict[str, str],
                      body: dict | None) -> tuple[str, int, float]:
            started = time.monotonic()
            try:
                response = await client.request(method, path, headers=headers, json=body)
            except httpx.TimeoutException:
                return path, TIMED_OUT, time.monotonic() - started
            return path, response.status_code, time.monotonic() - started

        tasks = [asyncio.create_task(one(*request)) for request in _mix(classify)]
        await asyncio.sleep(1.0)
        ready = (await client.get("/readyz")).status_code
        return await asyncio.gather(*tasks), ready


def test_200_concurrent_mixed_requests_get_no_5xx_and_the_other_tenant_is_served(
        empty_postgres_url: str, tmp_path: Path):
    classify = {"model": "minilm-l6", "input": TEXTS,
                "adapter": _seed_adapter(tmp_path, empty_postgres_url)}
    env = service_env(SPEFT_DATABASE_URL=empty_postgres_url,
                      SPEFT_STORAGE_URL=f"file://{tmp_path / 'storage'}", SPEFT_API_KEYS=KEYS,
                      SPEFT_RATE_LIMIT="", SPEFT_MAX_ACTIVE_JOBS_PER_TENANT="0")
    server = Api(f"http://127.0.0.1:{_free_port()}", env, tmp_path)
    try:
        server.start()
        warm = httpx.post(f"{server.url}/v1/classifications", json=classify, headers=ALICE,
                          timeout=120)  # model and adapter load once, before the burst
        assert warm.status_code == 200, warm.text

        started = time.monotonic()
        results, ready_mid_burst = asyncio.run(_burst(server.url, classify))
        elapsed = time.monotonic() - started

        bob = [seconds for path, _, seconds in results if path == "/v1/files"]
        print(f"burst of {REQUESTS}: {elapsed:.1f} s; the second tenant's slowest {max(bob):.2f} s")
        statuses = Counter(status for _, status, _ in results)
        failures = [(path, status) for path, status, _ in results
                    if status >= 500 or status == TIMED_OUT]
        assert not failures, f"{len(failures)} 5xx or unanswered of {REQUESTS}: " \
                             f"{Counter(failures)}\n{server.output()[-3000:]}"
        assert statuses == Counter({200: REQUESTS}), statuses
        assert len(bob) == 10 and max(bob) < SECOND_TENANT_BOUND_S, bob
        assert elapsed < BURST_BOUND_S
        assert ready_mid_burst == 200  # serving, so ready

        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        for gauge in ("speft_db_pool_connections_in_use", "speft_db_pool_overflow",
                      "speft_db_pool_waiting", "speft_threadpool_busy", "speft_threadpool_size"):
            assert f"\n{gauge} " in metrics, gauge
        pool = httpx.get(f"{server.url}/readyz", timeout=10).json()["database_pool"]
        assert pool["threads"] == pool["size"] == 20  # SPEFT_DB_POOL_SIZE sizes both
        assert pool["size"] + pool["max_overflow"] >= pool["threads"]
    finally:
        if server.process is not None:
            stop(server.process)
