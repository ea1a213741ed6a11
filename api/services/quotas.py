"""Per-tenant limits: a request rate (moving window, the `limits` library) and a quota of
unfinished jobs. Both are 429 with `Retry-After` beyond the limit.

Request counts live in `Settings.rate_limit_storage`: `memory://` counts per API process, Redis
counts for every process sharing it. When that storage cannot be reached the request is let
through and the outage logged: the limiter protects the service, it must not take it down.
The job quota is counted from the database, so it holds across processes and restarts.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any

from limits import RateLimitItem
from limits.errors import StorageError
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.core.config import Settings
from api.core.models import TERMINAL_STATUSES, Job
from api.errors import RateLimited
from api.services.tenants import lock_tenant

log = logging.getLogger(__name__)

RATE_LIMIT_NAMESPACE = "speft-requests"  # first part of every counter's key
REDIS_TIMEOUT_S = 1.0  # a Redis that does not answer within this lets the request through
QUOTA_RETRY_AFTER_S = 30
QUOTA_EXCEEDED = "quota_exceeded"
ACTIVE_JOBS_PARAM = "max_active_jobs_per_tenant"


def retry_after(seconds: float) -> dict[str, str]:
    """The `Retry-After` header for a wait of `seconds` (whole seconds, at least 1)."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def _storage_options(url: str) -> dict[str, Any]:
    """Options for the `limits` storage at `url`: short Redis timeouts, no retry back-off."""
    if url.startswith("memory://"):
        return {}
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return {"socket_connect_timeout": REDIS_TIMEOUT_S, "socket_timeout": REDIS_TIMEOUT_S,
            "retry": Retry(NoBackoff(), 0)}


class TenantRateLimiter:
    """Counts each tenant's requests against every configured limit in a moving window."""

    def __init__(self, items: list[RateLimitItem], *, storage_url: str) -> None:
        self.items = items
        storage = storage_from_string(storage_url, wrap_exceptions=True,
                                      **_storage_options(storage_url))
        self._limiter = MovingWindowRateLimiter(storage)
        self._storage_down = False

    @classmethod
    def from_settings(cls, settings: Settings) -> TenantRateLimiter | None:
        """The limiter SPEFT_RATE_LIMIT asks for; None when rate limiting is off."""
        items = settings.rate_limit_items
        return cls(items, storage_url=settings.rate_limit_storage) if items else None

    def check(self, tenant_id: str) -> None:
        """Count one request of `tenant_id`; RateLimited (Retry-After) once a limit is spent."""
        for item in self.items:
            try:
                allowed = self._limiter.hit(item, RATE_LIMIT_NAMESPACE, tenant_id)
                wait = 0.0 if allowed else self._seconds_until_free(item, tenant_id)
            except StorageError as err:
                self._note_storage(down=True, error=err)
                return
            self._note_storage(down=False)
            if not allowed:
                headers = retry_after(wait)
                raise RateLimited(f"rate limit of {item} exceeded for this tenant; "
                                  f"retry in {headers['Retry-After']} s", headers=headers)

    def _seconds_until_free(self, item: RateLimitItem, tenant_id: str) -> float:
        """Seconds until the oldest request in the tenant's window leaves it."""
        stats = self._limiter.get_window_stats(item, RATE_LIMIT_NAMESPACE, tenant_id)
        return stats.reset_time - time.time()

    def _note_storage(self, *, down: bool, error: Exception | None = None) -> None:
        """Log when the counter storage goes down or comes back (once per change)."""
        if down and not self._storage_down:
            log.warning("rate limit storage unreachable, requests are not limited: %s", error)
        elif not down and self._storage_down:
            log.info("rate limit storage reachable again")
        self._storage_down = down


def active_job_count(session: Session, *, tenant_id: str) -> int:
    """How many of the tenant's jobs are not finished (validating, queued, running, stopping)."""
    return session.scalar(select(func.count()).select_from(Job).where(
        Job.tenant_id == tenant_id, Job.status.not_in(TERMINAL_STATUSES))) or 0


def check_active_jobs(session: Session, *, tenant_id: str, limit: int) -> None:
    """After inserting a job: RateLimited (`quota_exceeded`) if the tenant now has more than
    `limit` unfinished jobs (0: no quota); the caller rolls the insert back.

    The tenant row is locked first (`lock_tenant`), so two concurrent creates are counted one
    after the other.
    """
    if limit == 0:
        return
    lock_tenant(session, tenant_id=tenant_id)
    active = active_job_count(session, tenant_id=tenant_id)
    if active > limit:
        raise RateLimited(f"this tenant already has {limit} unfinished jobs, the most allowed "
                          f"(SPEFT_MAX_ACTIVE_JOBS_PER_TENANT); wait for one to finish or "
                          f"cancel one", param=ACTIVE_JOBS_PARAM, code=QUOTA_EXCEEDED,
                          headers=retry_after(QUOTA_RETRY_AFTER_S))
