"""The FastAPI app: `create_app(settings)` wires database, storage, routers and error handlers."""
from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from api.core.config import Settings, get_settings
from api.core.db import engine_for, session_factory, upgrade_database
from api.core.queue import CeleryEnqueuer
from api.core.storage import Storage, StorageUnavailable, open_storage
from api.errors import SafeJSONResponse, install_error_handlers
from api.observability import (
    AdapterCacheCollector,
    InferenceMetrics,
    PoolCollector,
    install_metrics,
)
from api.request_limits import install_request_limits
from api.routes import adapters, checkpoints, files, health, jobs, models, webhooks
from api.routes import inference as inference_routes
from api.services import inference, tenants
from api.services.models import register_builtin_models
from api.services.quotas import TenantRateLimiter
from api.ui import install_ui

log = logging.getLogger(__name__)


def open_app_storage(settings: Settings) -> Storage:
    """The configured storage; if it is down at startup, opened without creating it (readyz says so)."""
    try:
        return open_storage(settings)
    except StorageUnavailable as err:
        log.warning("storage unavailable at startup: %s", err.message)
        return open_storage(settings, create=False)


def _prepare_database(app: FastAPI) -> None:
    """Migrate to head, take the open-mode decision given to create_app (else sync configured
    API keys and decide it here) and register the built-in base models."""
    settings: Settings = app.state.settings
    upgrade_database(settings.database_url)
    with app.state.sessions.begin() as session:
        decided = app.state.open_mode_decided
        if decided is None:  # not decided by the launcher (`speft serve`): decide it now
            decided = tenants.decide_open_mode(session, settings=settings)
        register_builtin_models(session)
        app.state.open_mode = decided
        if app.state.open_mode:  # one tenant for every request: resolved once, not per request
            log.info("open mode: no API key configured or stored; single tenant, "
                        "no authentication")
            app.state.open_tenant = tenants.get_or_create_tenant(
                session, name=settings.default_tenant)


def _preload_adapters(app: FastAPI) -> None:
    """Load and pin SPEFT_INFERENCE_PRELOAD (base models load with them)."""
    with app.state.sessions() as session:
        pinned = inference.preload_adapters(
            session, engines=app.state.inference, storage=app.state.storage,
            adapter_ids=app.state.settings.preload_adapters)
    log.info("serving: preloaded and pinned %d adapter(s): %s", len(pinned), ", ".join(pinned))


def limit_threads(app: FastAPI) -> None:
    """Size AnyIO's default thread limiter (sync handlers and dependencies, `run_in_threadpool`)
    to the database pool (SPEFT_DB_POOL_SIZE): every thread can get a connection, and requests
    beyond it wait for a thread, in order, instead of timing out on the pool. Call on the loop."""
    limiter = anyio.to_thread.current_default_thread_limiter()
    limiter.total_tokens = app.state.settings.db_pool_size
    app.state.thread_limiter = limiter


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Startup: thread limit, storage, migrations, keys and models; shutdown: close the pool."""
    limit_threads(app)
    app.state.storage = await run_in_threadpool(open_app_storage, app.state.settings)
    await run_in_threadpool(_prepare_database, app)
    if app.state.settings.preload_adapters:
        await run_in_threadpool(_preload_adapters, app)
    # Everything loaded so far (torch, transformers, the app) lives for the whole process: keep it
    # out of the collector's generations, or each full collection walks it and stalls every
    # request in flight (~300 ms pauses under load before this).
    gc.freeze()
    try:
        yield
    finally:
        app.state.inference.close()
        app.state.engine.dispose()


def create_app(settings: Settings | None = None, *, open_mode: bool | None = None) -> FastAPI:
    """A new app for `settings` (default: the environment); storage and schema are set up at startup.

    `open_mode`: the decision `speft serve` took before binding (keys synced); None: the app
    syncs the keys and decides it at start-up."""
    settings = settings or get_settings()
    app = FastAPI(title="speft", version="1", lifespan=lifespan,
                  default_response_class=SafeJSONResponse)
    app.state.settings = settings
    app.state.open_mode_decided = open_mode
    app.state.open_mode = False  # in effect from start-up on; until then every request needs a key
    app.state.rate_limiter = TenantRateLimiter.from_settings(settings)
    app.state.engine = engine_for(settings)
    app.state.sessions = session_factory(app.state.engine)
    # enqueue_job(job_id): called after the job row is committed; tests replace it.
    app.state.enqueue_job = CeleryEnqueuer(settings)
    # A callable raising when the broker is down (readyz); the enqueuer probes its own broker.
    app.state.broker_check = app.state.enqueue_job.check
    install_error_handlers(app)
    install_request_limits(app, settings)  # inside the metrics middleware: its 413s are counted
    app.state.thread_limiter = None  # AnyIO's default limiter, set at start-up
    app.state.metrics_registry = install_metrics(app, app.state.sessions)
    app.state.metrics_registry.register(PoolCollector(app.state))
    app.state.inference = inference.InferenceEngines(
        settings, storage=lambda: app.state.storage,
        observer=InferenceMetrics(app.state.metrics_registry))
    app.state.metrics_registry.register(AdapterCacheCollector(app.state.inference.engines))
    app.include_router(files.router, prefix="/v1")
    app.include_router(models.router, prefix="/v1")
    app.include_router(jobs.router, prefix="/v1")
    app.include_router(checkpoints.router, prefix="/v1")
    app.include_router(webhooks.router, prefix="/v1")
    app.include_router(inference_routes.router, prefix="/v1")  # before /adapters/{id}
    app.include_router(adapters.router, prefix="/v1")
    app.include_router(health.router)
    install_ui(app)
    return app
