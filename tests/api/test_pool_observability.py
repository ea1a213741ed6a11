"""Saturation is visible: a checkout that waits is counted and logged, and /metrics and /readyz
report the database pool and the thread pool (real SQLite and PostgreSQL pools)."""
from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import Engine, text

from api.core.db import SLOW_CHECKOUT_S, ObservedQueuePool, make_engine


def test_a_checkout_that_waits_is_counted_and_logged(migrated_db: Engine,
                                                      caplog: pytest.LogCaptureFixture):
    engine = make_engine(migrated_db.url, pool_size=1, max_overflow=0)
    pool = engine.pool
    assert isinstance(pool, ObservedQueuePool)
    seen_waiting: list[int] = []
    try:
        held = engine.connect()
        held.execute(text("SELECT 1"))

        def checkout() -> None:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))

        waiter = threading.Thread(target=checkout)
        waiter.start()
        time.sleep(SLOW_CHECKOUT_S + 0.3)
        seen_waiting.append(pool.waiting)
        held.close()
        waiter.join(timeout=10)
    finally:
        engine.dispose()
    assert seen_waiting == [1] and pool.waiting == 0
    assert pool.slow_checkouts == 1
    assert "speft.db pool saturated: a checkout waited" in caplog.text


def test_metrics_and_readyz_report_the_pools(make_client):
    client = make_client(db_pool_size=7)
    metrics = client.get("/metrics").text
    for line in ("speft_db_pool_size 7.0", "speft_threadpool_size 7.0",
                 "speft_db_pool_max_overflow 10.0", "speft_db_pool_waiting 0.0"):
        assert line in metrics, line
    assert "speft_db_pool_connections_in_use " in metrics
    assert "speft_threadpool_busy " in metrics and "speft_db_pool_slow_checkouts_total" in metrics
    ready = client.get("/readyz")
    assert ready.status_code == 200
    pool = ready.json()["database_pool"]
    assert (pool["size"], pool["threads"], pool["saturated"]) == (7, 7, False)
    assert pool["threads_busy"] >= 1  # this request's own thread
