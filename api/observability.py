"""Prometheus metrics: requests per route, jobs by status, inference (batches, adapters), and
saturation: the database pool and the thread pool (`pool_state`, also in `/readyz`).

Each app gets its own CollectorRegistry, so several apps in one process (tests) never clash.
Every label takes a bounded set of values: a request's route is the path template of the route
Starlette matched (every unmatched path shares one label), its method one of the standard ones
(others share one label), its status a status code; models are the registered base models the
process has loaded. With SPEFT_METRICS_TOKEN set, GET /metrics needs it as a Bearer token.
"""
from __future__ import annotations

import hmac
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Annotated, Any, ClassVar

from fastapi import Depends, FastAPI, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
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
from starlette.applications import Starlette
from starlette.routing import compile_path, get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.core.db import ObservedQueuePool
from api.core.models import Job, JobStatus, utcnow
from api.errors import Unauthorized
from api.services.jobs import ACTIVE_STATUSES
from speft_core.serving import ServingEngine, ServingObserver

try:  # FastAPI with lazily included routers: the matched route's own path lacks the prefix
    from fastapi.routing import iter_route_contexts
except ImportError:  # earlier FastAPI copies every included route with its full path
    iter_route_contexts = None  # type: ignore[assignment]


class JobStatusCollector(Collector):
    """`speft_jobs{status}`: how many jobs are in each status, and
    `speft_job_heartbeat_age_seconds`: how long ago the stalest running job's worker last beat
    (0 with none running), both read from the database."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """One gauge sample per status (zero where none), then the heartbeat age."""
        family = GaugeMetricFamily("speft_jobs", "Jobs by status", labels=["status"])
        with self.sessions() as session:
            counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            oldest = session.scalar(select(func.min(Job.heartbeat_at)).where(
                Job.status.in_(ACTIVE_STATUSES)))  # MIN skips jobs with no heartbeat yet
        for status in JobStatus:
            family.add_metric([status.value], float(counts.get(status.value, 0)))
        yield family
        # min() keeps the column's type, so `oldest` reads back timezone-aware on every backend
        age = 0.0 if oldest is None else max(0.0, (utcnow() - oldest).total_seconds())
        yield GaugeMetricFamily("speft_job_heartbeat_age_seconds",
                                "Seconds since the stalest running job's worker last beat",
                                value=age)


@dataclass(frozen=True)
class PoolState:
    """The database pool and the thread pool at one moment: what is in use and what waits.

    `saturated`: a request is waiting for a connection or for a thread right now (it is served,
    later; the pool timeout is never reached while threads <= connections)."""

    size: int  # connections kept (SPEFT_DB_POOL_SIZE)
    max_overflow: int  # connections that may be opened beyond `size`
    in_use: int  # connections checked out
    overflow: int  # connections open beyond `size`
    waiting: int  # checkouts in progress (waiting for a connection, or connecting)
    slow_checkouts: int  # checkouts that waited longer than SLOW_CHECKOUT_S, since start
    threads: int  # the thread limit for sync handlers and dependencies
    threads_busy: int
    threads_waiting: int  # tasks waiting for a thread

    @property
    def saturated(self) -> bool:
        """Something waits for a connection or a thread."""
        return self.waiting > 0 or self.threads_waiting > 0

    def as_dict(self) -> dict[str, Any]:
        """The fields plus `saturated`, for JSON."""
        return {**asdict(self), "saturated": self.saturated}


def pool_state(state: Any) -> PoolState:
    """The pools of an app (`app.state`: its engine, and the thread limiter set at start-up)."""
    pool = state.engine.pool
    limiter = state.thread_limiter
    observed = isinstance(pool, ObservedQueuePool)
    return PoolState(
        size=pool.size() if observed else 1,
        max_overflow=pool._max_overflow if observed else 0,
        in_use=pool.checkedout() if observed else 0,
        overflow=max(pool.overflow(), 0) if observed else 0,
        waiting=pool.waiting if observed else 0,
        slow_checkouts=pool.slow_checkouts if observed else 0,
        threads=int(limiter.total_tokens) if limiter is not None else 0,
        threads_busy=int(limiter.borrowed_tokens) if limiter is not None else 0,
        threads_waiting=limiter.statistics().tasks_waiting if limiter is not None else 0,
    )


class PoolCollector(Collector):
    """`speft_db_pool_*` and `speft_threadpool_*` gauges, read from the app's pools at scrape."""

    GAUGES: ClassVar[dict[str, tuple[str, str]]] = {
        "size": ("speft_db_pool_size", "Database connections kept in the pool"),
        "max_overflow": ("speft_db_pool_max_overflow", "Connections allowed beyond the pool size"),
        "in_use": ("speft_db_pool_connections_in_use", "Database connections checked out"),
        "overflow": ("speft_db_pool_overflow", "Database connections open beyond the pool size"),
        "waiting": ("speft_db_pool_waiting", "Checkouts waiting for a database connection"),
        "threads": ("speft_threadpool_size", "Threads for sync handlers and dependencies"),
        "threads_busy": ("speft_threadpool_busy", "Threads running a sync handler or dependency"),
        "threads_waiting": ("speft_threadpool_waiting", "Tasks waiting for a thread"),
    }

    def __init__(self, state: Any) -> None:
        self.state = state

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """One sample per gauge, and the slow-checkout counter."""
        current = pool_state(self.state)
        for field, (name, documentation) in self.GAUGES.items():
            yield GaugeMetricFamily(name, documentation, value=getattr(current, field))
        yield CounterMetricFamily("speft_db_pool_slow_checkouts",
                                  "Checkouts that waited longer than a second",
                                  value=current.slow_checkouts)


UNMATCHED_ROUTE = "unmatched"  # the route label of every request no route matched (404s)
OTHER_METHOD = "other"  # the method label of every non-standard method
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RouteTemplates:
    """The full path template (`/v1/fine_tuning/jobs/{job_id}`) of the route the router matched,
    prefixes of included routers applied: looked up by the route object Starlette's router put
    in the scope, never built from the request's path, so ids never become label values."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self._templates: dict[int, list[tuple[re.Pattern[str], str]]] = {}

    def _index(self) -> None:
        """Every route's templates by the route object the router hands over (its own path
        format only carries the included router's part, not the prefix)."""
        if iter_route_contexts is None:  # FastAPI before lazy includes: routes hold full paths
            pairs = [(route, getattr(route, "path_format", None)) for route in self.app.routes]
        else:
            pairs = [(context.original_route, context.path_format)
                     for context in iter_route_contexts(self.app.routes)]
        templates: dict[int, list[tuple[re.Pattern[str], str]]] = {}
        for route, template in pairs:
            if isinstance(template, str):
                templates.setdefault(id(route), []).append((compile_path(template)[0], template))
        self._templates = templates

    def template(self, scope: Scope) -> str:
        """The matched route's template; UNMATCHED_ROUTE where no route (none we know) matched."""
        route = scope.get("route")
        if route is None:
            return UNMATCHED_ROUTE
        if id(route) not in self._templates:  # the first request, or a route added since
            self._index()
            self._templates.setdefault(id(route), [])  # still unknown: not indexed again for it
        candidates = self._templates[id(route)]
        if len(candidates) == 1:
            return candidates[0][1]
        path = get_route_path(scope)  # a router included twice: the prefix this path matched
        return next((template for regex, template in candidates if regex.match(path)),
                    UNMATCHED_ROUTE)


def _method(scope: Scope) -> str:
    """The request's method if it is a standard one, else one shared label."""
    method = scope["method"]
    return method if method in METHODS else OTHER_METHOD


class RequestMetricsMiddleware:
    """Pure ASGI middleware (no per-request task or body streaming like BaseHTTPMiddleware)."""

    def __init__(self, app: ASGIApp, *, requests: Counter, latency: Histogram,
                 templates: RouteTemplates) -> None:
        self.app, self.requests, self.latency, self.templates = app, requests, latency, templates

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
            template = self.templates.template(scope)  # the router set scope["route"]
            method = _method(scope)
            self.latency.labels(method, template).observe(time.perf_counter() - started)
            self.requests.labels(method, template, str(status)).inc()


_scrape_credentials = HTTPBearer(auto_error=False, description="SPEFT_METRICS_TOKEN, when set")


def require_metrics_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_scrape_credentials)],
) -> None:
    """401 unless SPEFT_METRICS_TOKEN is unset or the request carries it as a Bearer token."""
    token = request.app.state.settings.metrics_token
    if token is None:
        return
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise Unauthorized("GET /metrics needs 'Authorization: Bearer <SPEFT_METRICS_TOKEN>'",
                           code="invalid_metrics_token", headers={"WWW-Authenticate": "Bearer"})


def install_metrics(app: FastAPI, sessions: sessionmaker[Session]) -> CollectorRegistry:
    """Count and time every request by route template, and serve GET /metrics."""
    registry = CollectorRegistry()
    requests = Counter("speft_http_requests", "HTTP requests", ["method", "route", "status"],
                       registry=registry)
    latency = Histogram("speft_http_request_duration_seconds", "HTTP request latency",
                        ["method", "route"], registry=registry)
    registry.register(JobStatusCollector(sessions))
    app.add_middleware(RequestMetricsMiddleware, requests=requests, latency=latency,
                       templates=RouteTemplates(app))

    @app.get("/metrics", include_in_schema=False, dependencies=[Depends(require_metrics_token)])
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
