"""Prometheus metrics: requests per route, jobs by status, and inference (batches, adapters).

Each app gets its own CollectorRegistry, so several apps in one process (tests) never clash.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping

from fastapi import FastAPI, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.core.models import Job, JobStatus
from speft_core.serving import ServingEngine, ServingObserver


class JobStatusCollector(Collector):
    """`speft_jobs{status}`: how many jobs are in each status, read from the database."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """One gauge sample per status (zero where none)."""
        family = GaugeMetricFamily("speft_jobs", "Jobs by status", labels=["status"])
        with self.sessions() as session:
            counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        for status in JobStatus:
            family.add_metric([status.value], float(counts.get(status.value, 0)))
        yield family


def _route_template(scope: Scope) -> str:
    """The matched route with its parameters as `{name}` (ids never become label values)."""
    if scope.get("route") is None:
        return "unmatched"
    path = scope["path"]
    for name, value in (scope.get("path_params") or {}).items():
        path = path.replace(f"/{value}", f"/{{{name}}}")
    return path


class RequestMetricsMiddleware:
    """Pure ASGI middleware (no per-request task or body streaming like BaseHTTPMiddleware)."""

    def __init__(self, app: ASGIApp, *, requests: Counter, latency: Histogram) -> None:
        self.app, self.requests, self.latency = app, requests, latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            template = _route_template(scope)  # the router filled scope["route"] in place
            self.latency.labels(scope["method"], template).observe(time.perf_counter() - started)
            self.requests.labels(scope["method"], template, str(status)).inc()


def install_metrics(app: FastAPI, sessions: sessionmaker[Session]) -> CollectorRegistry:
    """Count and time every request by route template, and serve GET /metrics."""
    registry = CollectorRegistry()
    requests = Counter("speft_http_requests", "HTTP requests", ["method", "route", "status"],
                       registry=registry)
    latency = Histogram("speft_http_request_duration_seconds", "HTTP request latency",
                        ["method", "route"], registry=registry)
    registry.register(JobStatusCollector(sessions))
    app.add_middleware(RequestMetricsMiddleware, requests=requests, latency=latency)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        """Prometheus text exposition."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return registry


class InferenceMetrics(ServingObserver):
    """Serving events as Prometheus metrics: swaps, adapter loads, batches by path."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.swap_seconds = Histogram(
            "speft_adapter_swap_seconds", "Time to write an adapter's entries into the weights",
            registry=registry, buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2))
        self.load_seconds = Histogram(
            "speft_adapter_load_seconds", "Time to fetch, verify and prepare an adapter",
            registry=registry, buckets=(1e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0, 5.0))
        self.batch_rows = Histogram(
            "speft_inference_batch_rows", "Rows (texts or prompts) per batch", ["path"],
            registry=registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.batch_adapters = Histogram(
            "speft_inference_batch_adapters", "Distinct adapters per batch", ["path"],
            registry=registry, buckets=(1, 2, 4, 8, 16, 32, 64))
        self.batch_seconds = Histogram(
            "speft_inference_batch_seconds", "Time to run a batch", ["path"], registry=registry)

    def batch(self, *, path: str, rows: int, adapters: int, seconds: float) -> None:
        """Record one batch."""
        self.batch_rows.labels(path).observe(rows)
        self.batch_adapters.labels(path).observe(adapters)
        self.batch_seconds.labels(path).observe(seconds)

    def swap(self, seconds: float) -> None:
        """Record one swap (its count is the histogram's count)."""
        self.swap_seconds.observe(seconds)

    def adapter_loaded(self, seconds: float) -> None:
        """Record one cold adapter load."""
        self.load_seconds.observe(seconds)


class AdapterCacheCollector(Collector):
    """Adapter caches per base model, read at scrape time: hits, misses, evictions, bytes."""

    def __init__(self, engines: Callable[[], Mapping[str, ServingEngine]]) -> None:
        self.engines = engines

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """One sample per loaded base model."""
        hits = CounterMetricFamily("speft_adapter_cache_hits", "Adapter cache hits", labels=["model"])
        misses = CounterMetricFamily("speft_adapter_cache_misses", "Adapter cache misses",
                                     labels=["model"])
        evictions = CounterMetricFamily("speft_adapter_cache_evictions", "Adapters evicted",
                                        labels=["model"])
        resident = GaugeMetricFamily("speft_adapter_resident_bytes",
                                     "Bytes of adapters resident in memory", labels=["model"])
        count = GaugeMetricFamily("speft_adapters_resident", "Adapters resident in memory",
                                  labels=["model"])
        budget = GaugeMetricFamily("speft_adapter_cache_budget_bytes", "Adapter cache budget",
                                   labels=["model"])
        for model, engine in self.engines().items():
            stats = engine.cache.stats
            hits.add_metric([model], stats.hits)
            misses.add_metric([model], stats.misses)
            evictions.add_metric([model], stats.evictions)
            resident.add_metric([model], engine.cache.resident_bytes)
            count.add_metric([model], len(engine.cache))
            budget.add_metric([model], engine.cache.budget_bytes)
        yield from (hits, misses, evictions, resident, count, budget)
