"""Prometheus metrics: request counts and latency per route, and jobs by status at scrape time.

Each app gets its own CollectorRegistry, so several apps in one process (tests) never clash.
"""
from __future__ import annotations

import time
from collections.abc import Iterator

from fastapi import FastAPI, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.core.models import Job, JobStatus


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
