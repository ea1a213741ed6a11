"""Service settings from `SPEFT_*` environment variables (DESIGN.md §2), validated on construction.

Built by `get_settings()` (cached per process), never at import, so tests build `Settings(...)`
directly or call `get_settings.cache_clear()` after changing the environment.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from limits import RateLimitItem, parse_many
from pydantic import SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

ENV_PREFIX = "SPEFT_"
MiB = 1024 * 1024

# A tenant name as it may appear in SPEFT_API_KEYS, SPEFT_DEFAULT_TENANT and the tenants table.
TENANT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# A key in SPEFT_API_KEYS: what an `Authorization: Bearer` header carries (RFC 6750 b64token).
API_KEY_RE = re.compile(r"^[A-Za-z0-9._~+/-]+=*$")
_API_KEYS_SHAPE = "expected 'key1:tenantA,key2:tenantB'"
QUEUE_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.-]{0,64}$")
Device = Literal["cpu", "cuda"]  # a job's device kind; also its queue's name
STORAGE_SCHEMES = ("file", "s3")
DATABASE_BACKENDS = ("sqlite", "postgresql")
# `limits` storages with a moving window that the API builds (memory, or Redis of one server).
RATE_LIMIT_STORAGE_SCHEMES = ("memory", "redis", "rediss", "redis+unix")


def _env(field: str) -> str:
    """The environment variable that sets `field` (used in every error message)."""
    return f"{ENV_PREFIX}{field.upper()}"


def parse_api_keys(value: str) -> dict[str, str]:
    """Parse `key1:tenantA,key2:tenantB` into {key: tenant}; empty (or blank): no keys. Raise
    ValueError naming SPEFT_API_KEYS and the entry at fault, never echoing a key."""
    if not value.strip():
        return {}
    keys: dict[str, str] = {}
    for position, entry in enumerate(value.split(","), start=1):
        where = f"{_env('api_keys')}: entry {position}"
        entry = entry.strip()
        if not entry:
            raise ValueError(f"{where} is empty (a stray ','); {_API_KEYS_SHAPE}")
        hint = "; entries are separated by ',' (not ';')" if ";" in entry else ""
        if entry.count(":") != 1:
            raise ValueError(f"{where} has {entry.count(':')} ':' where 'key:tenant' has "
                             f"one{hint}; {_API_KEYS_SHAPE}")
        key, _, tenant = (part.strip() for part in entry.partition(":"))
        if not key or not tenant:
            raise ValueError(f"{where} has an empty {'key' if not key else 'tenant'}; "
                             f"{_API_KEYS_SHAPE}")
        if not API_KEY_RE.match(key):
            raise ValueError(f"{where}: the key has a character a Bearer token cannot carry "
                             "(letters, digits, '-', '.', '_', '~', '+', '/', then '=' padding)")
        if not TENANT_NAME_RE.match(tenant):
            raise ValueError(f"{where}: the tenant name is not letters, digits, '_', '.', '-' "
                             f"(starting with a letter or digit; at most 64){hint}")
        if key in keys:
            raise ValueError(f"{where} repeats a key already given")
        keys[key] = tenant
    return keys


class Settings(BaseSettings):
    """Everything the API and worker read from the environment (prefix SPEFT_)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    database_url: str = "sqlite:///./var/speft.db"
    broker_url: str | None = None  # None: the embedded broker
    storage_url: str = "file://./var/storage"
    s3_endpoint_url: str | None = None
    api_keys: str = ""  # "key1:tenantA,key2:tenantB"; empty (or blank): no configured key
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_bytes: int = 100 * MiB
    max_file_lines: int = 1_000_000
    max_line_bytes: int = 1 * MiB  # one JSONL line (one example) of an upload
    # The request body of every route but the upload (which max_upload_bytes bounds): 413 beyond.
    max_json_body_bytes: int = 1 * MiB
    default_tenant: str = "default"
    # Jobs go to the queue of their device kind, `<queue_prefix><device>` (`cpu`, `cuda`): GPU and
    # CPU workers share one broker and each consumes its own kind (`speft worker --device`).
    queue_prefix: str = ""
    default_device: Device = "cpu"  # for jobs that name none
    models_dir: Path | None = None  # folder of server-side model folders to register
    model_cache_dir: Path = Path("./var/model-cache")  # stored model archives, unpacked by sha256
    # Database connections kept open per process (up to DB_POOL_OVERFLOW more under load), and
    # the API's thread limit: at most this many sync handlers and dependencies run at once, so
    # each can get a connection; more requests queue for a thread (in order) instead of timing
    # out on the pool.
    db_pool_size: int = 20
    # Inference (API process): adapters resident per base model, bounded in bytes (LRU beyond);
    # requests batched within a wait window up to a batch size; path auto = swap for one adapter
    # in a batch, mixed batch for several. Preload: adapter ids loaded and pinned at start-up.
    adapter_cache_bytes: int = 1024 * MiB
    inference_max_batch_size: int = 32
    inference_max_wait_ms: float = 2.0
    inference_path: Literal["auto", "swap", "mixed"] = "auto"
    inference_device: Device = "cpu"
    inference_preload: str = ""  # "adapter-1,adapter-2"
    # Characters of each inference text (a classification input, a prompt): 400 beyond.
    inference_max_input_chars: int = 100_000
    # Reliability (worker): a running job's worker writes `heartbeat_at` every
    # heartbeat_interval_s; the reconciler (a periodic task in every worker, each
    # reconcile_interval_s) re-enqueues a running job whose heartbeat is older than
    # heartbeat_timeout_s (its worker died) until it has had max_attempts attempts, then fails it;
    # and re-sends a queued job not claimed within requeue_after_s (its message was lost).
    heartbeat_interval_s: float = 10.0
    heartbeat_timeout_s: float = 120.0
    requeue_after_s: float = 300.0
    max_attempts: int = 3
    reconcile_interval_s: float = 30.0
    # A running attempt that shows no progress (no step, phase report, evaluation or event: model
    # downloads and mask selection report none, so keep it above the longest of those) for
    # stall_timeout_s stops heart-beating, and the reconciler treats it as a lost worker.
    stall_timeout_s: float = 3600.0
    # A running job's storage call that the backend refuses (StorageUnavailable) is retried with
    # a growing pause (1 s, then 2 s more each time, at most 15 s) for storage_retry_s; storage
    # still down after that re-queues the job (a failed attempt) or, out of attempts, fails it.
    storage_retry_s: float = 60.0
    # Webhooks: one delivery attempt (connect, send, read the status and headers) ends within
    # webhook_timeout_s in all, and is retried by Celery with exponential back-off
    # (webhook_backoff_s, doubling, at most 10 min) up to webhook_max_retries times. URLs
    # resolving to private, loopback or link-local addresses are refused;
    # webhook_allow_loopback admits loopback ones (tests, single-machine use).
    webhook_timeout_s: float = 10.0
    webhook_backoff_s: float = 2.0
    webhook_max_retries: int = 8
    webhook_allow_loopback: bool = False
    # Limits per tenant (API): requests in a moving window, as a `limits` string ("600/minute",
    # several joined by ";"; empty: off), counted in rate_limit_storage_url (memory://: per API
    # process; redis://…: shared by every API process; unset: the broker when it is Redis, else
    # memory://); and unfinished jobs (validating_files, queued, running, cancel_requested; 0: no
    # quota). Beyond either: 429 with Retry-After.
    rate_limit: str = "600/minute"
    rate_limit_storage_url: str | None = None
    max_active_jobs_per_tenant: int = 16
    # GET /metrics: when set, a scrape must send `Authorization: Bearer <token>` (else 401);
    # unset, it is open (for a scraper on a private network).
    metrics_token: SecretStr | None = None

    @field_validator("rate_limit")
    @classmethod
    def _check_rate_limit(cls, value: str) -> str:
        if value.strip():
            try:
                parse_many(value)
            except ValueError as err:
                raise ValueError(f"{_env('rate_limit')}: not a rate limit like '600/minute' "
                                 f"(several joined by ';'); got {value!r}") from err
        return value.strip()

    @field_validator("rate_limit_storage_url", mode="before")
    @classmethod
    def _check_rate_limit_storage_url(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        if isinstance(value, str) and value.partition("://")[0] not in RATE_LIMIT_STORAGE_SCHEMES:
            raise ValueError(f"{_env('rate_limit_storage_url')}: expected memory:// or "
                             f"redis://HOST:PORT/DB (rediss://, redis+unix://); got {value!r}")
        return value

    @field_validator("max_active_jobs_per_tenant")
    @classmethod
    def _check_job_quota(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"{_env('max_active_jobs_per_tenant')}: must be 0 (no quota) or "
                             f"more; got {value}")
        return value

    @property
    def rate_limit_items(self) -> list[RateLimitItem]:
        """SPEFT_RATE_LIMIT parsed; empty when rate limiting is off."""
        return parse_many(self.rate_limit) if self.rate_limit else []

    @property
    def rate_limit_storage(self) -> str:
        """Where request counts live: the configured URL, else a Redis broker, else memory://."""
        if self.rate_limit_storage_url is not None:
            return self.rate_limit_storage_url
        if self.broker_url is not None and self.broker_url.partition("://")[0] in (
                "redis", "rediss"):
            return self.broker_url
        return "memory://"

    @field_validator("broker_url", "s3_endpoint_url", "models_dir", "metrics_token", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        try:
            backend = make_url(value).get_backend_name()
        except ArgumentError as err:
            raise ValueError(f"{_env('database_url')}: not a database URL: {value!r}") from err
        if backend not in DATABASE_BACKENDS:
            raise ValueError(
                f"{_env('database_url')}: backend {backend!r} is not supported "
                f"(use sqlite:///path or postgresql+psycopg://...)"
            )
        return value

    @field_validator("storage_url")
    @classmethod
    def _check_storage_url(cls, value: str) -> str:
        scheme, sep, rest = value.partition("://")
        if not sep or scheme not in STORAGE_SCHEMES or not rest:
            raise ValueError(
                f"{_env('storage_url')}: expected file://PATH or s3://BUCKET[/PREFIX]; got {value!r}"
            )
        return value

    @field_validator("api_keys")
    @classmethod
    def _check_api_keys(cls, value: str) -> str:
        parse_api_keys(value)
        return value

    @field_validator("port")
    @classmethod
    def _check_port(cls, value: int) -> int:
        if not 1 <= value <= 65535:
            raise ValueError(f"{_env('port')}: must be in [1, 65535]; got {value}")
        return value

    @field_validator("max_upload_bytes", "max_file_lines", "max_line_bytes", "db_pool_size",
                     "adapter_cache_bytes", "inference_max_batch_size", "max_attempts",
                     "inference_max_input_chars", "max_json_body_bytes")
    @classmethod
    def _check_positive(cls, value: int, info: Any) -> int:
        if value < 1:
            raise ValueError(f"{_env(info.field_name)}: must be a positive integer; got {value}")
        return value

    @field_validator("default_tenant")
    @classmethod
    def _check_default_tenant(cls, value: str) -> str:
        if not TENANT_NAME_RE.match(value):
            raise ValueError(f"{_env('default_tenant')}: invalid tenant name {value!r}")
        return value

    @field_validator("queue_prefix")
    @classmethod
    def _check_queue_prefix(cls, value: str) -> str:
        if not QUEUE_PREFIX_RE.match(value):
            raise ValueError(f"{_env('queue_prefix')}: letters, digits, '.', '_', '-' only; "
                             f"got {value!r}")
        return value

    @field_validator("heartbeat_interval_s", "heartbeat_timeout_s", "requeue_after_s",
                     "reconcile_interval_s", "stall_timeout_s", "webhook_timeout_s",
                     "storage_retry_s")
    @classmethod
    def _check_seconds(cls, value: float, info: Any) -> float:
        if not value > 0:
            raise ValueError(f"{_env(info.field_name)}: must be a positive number of seconds; "
                             f"got {value}")
        return value

    @field_validator("inference_max_wait_ms")
    @classmethod
    def _check_wait(cls, value: float) -> float:
        if not 0 <= value <= 1000:
            raise ValueError(f"{_env('inference_max_wait_ms')}: must be in [0, 1000]; got {value}")
        return value

    @property
    def preload_adapters(self) -> list[str]:
        """SPEFT_INFERENCE_PRELOAD as a list of adapter ids."""
        return [part.strip() for part in self.inference_preload.split(",") if part.strip()]

    @property
    def control_queue(self) -> str:
        """The queue of the service's own periodic tasks (the reconciler), read by the control
        worker of every `speft worker`."""
        return f"{self.queue_prefix}control"

    @property
    def webhook_queue(self) -> str:
        """The queue of webhook deliveries, read by the control worker beside control_queue."""
        return f"{self.queue_prefix}webhooks"

    def queue_for(self, device: str) -> str:
        """The broker queue for jobs on `device` (`cpu` or `cuda`)."""
        return f"{self.queue_prefix}{device}"

    @property
    def api_key_tenants(self) -> dict[str, str]:
        """SPEFT_API_KEYS as {key: tenant name}; empty in single-tenant open mode."""
        return parse_api_keys(self.api_keys)

    @property
    def open_mode(self) -> bool:
        """True when no API keys are configured (single tenant, loopback only)."""
        return not self.api_key_tenants

    @property
    def embedded_broker(self) -> bool:
        """True when no broker URL is set and jobs run in the embedded queue."""
        return self.broker_url is None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment once (clear with get_settings.cache_clear())."""
    return Settings()
