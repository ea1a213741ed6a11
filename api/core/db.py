"""Database engine and sessions, one engine per process, and schema migration through Alembic.

SQLite (the embedded default) runs in WAL mode with foreign keys on and a busy timeout, so the
API and worker threads can share one file; Postgres pings pooled connections before use.
The schema is only ever created by `upgrade_database` (`alembic upgrade head`), also in tests.

Pools are `ObservedQueuePool`s: they count the checkouts waiting for a connection and log a
warning when one waited longer than `SLOW_CHECKOUT_S` (the pool is saturated); `/metrics` and
`/readyz` report them. The API sizes its thread limit from the same setting (SPEFT_DB_POOL_SIZE),
so every thread that runs a sync handler or dependency can get a connection.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry, QueuePool, StaticPool

if TYPE_CHECKING:
    from .config import Settings

# migrations/ sits beside the api package in the source tree (also under an editable install).
MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
SQLITE_BUSY_TIMEOUT_S = 30.0
SLOW_CHECKOUT_S = 1.0  # a checkout waiting longer than this is logged: the pool is saturated
# Connections a pool may open beyond SPEFT_DB_POOL_SIZE: for commits of handlers that already
# gave their thread back, and probes. pool_size + overflow >= the API's thread limit (pool_size).
DB_POOL_OVERFLOW = 10

log = logging.getLogger(__name__)

_lock = threading.Lock()
_migration_lock = threading.Lock()  # Alembic's context is process-global: one migration at a time
_engine: Engine | None = None
_sessions: sessionmaker[Session] | None = None


def _is_memory_sqlite(url: URL) -> bool:
    return url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"


def _ensure_wal(cursor: Any) -> None:
    """Put the database file in WAL mode (a property of the file, so usually already set).

    Several processes opening a new file at once (API and worker under `make run`) race to
    switch it; SQLite answers the losers "database is locked" at once, without its busy
    timeout, to avoid a lock-upgrade deadlock. A loser re-reads the mode: the winner has
    usually switched it already; otherwise it tries again, for a bounded time.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    while cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _enable_sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        _ensure_wal(cursor)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


class ObservedQueuePool(QueuePool):
    """A QueuePool that counts checkouts in progress (`waiting`) and slow ones (`slow_checkouts`,
    each logged as a warning)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._counts_lock = threading.Lock()
        self._checking_out = threading.local()  # QueuePool._do_get may call itself: count once
        self.waiting = 0
        self.slow_checkouts = 0

    def _do_get(self) -> ConnectionPoolEntry:
        if getattr(self._checking_out, "active", False):
            return super()._do_get()
        started = time.monotonic()
        self._checking_out.active = True
        with self._counts_lock:
            self.waiting += 1
        try:
            return super()._do_get()
        finally:
            self._checking_out.active = False
            waited = time.monotonic() - started
            with self._counts_lock:
                self.waiting -= 1
                self.slow_checkouts += waited > SLOW_CHECKOUT_S
            if waited > SLOW_CHECKOUT_S:
                log.warning("speft.db pool saturated: a checkout waited %.1f s (%s)",
                            waited, self.status())


def make_engine(url: str | URL, **engine_kwargs: Any) -> Engine:
    """A new engine for `url`, configured for SQLite (WAL, foreign keys, busy timeout) or Postgres."""
    url = make_url(url)
    if url.get_backend_name() == "sqlite":
        connect_args = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S}
        connect_args.update(engine_kwargs.pop("connect_args", {}))
        if _is_memory_sqlite(url):
            engine_kwargs.setdefault("poolclass", StaticPool)
            engine_kwargs.pop("pool_size", None)  # one shared connection
            engine_kwargs.pop("max_overflow", None)
        else:
            engine_kwargs.setdefault("poolclass", ObservedQueuePool)
            if url.database:
                Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args=connect_args, **engine_kwargs)
        event.listen(engine, "connect", _enable_sqlite_pragmas)
        return engine
    # No pre-ping (a round trip on every checkout): when the server drops connections the first
    # statement to fail with a disconnect error invalidates the whole pool, so one request per
    # process sees the outage (a 503) and the next ones reconnect. Recycling bounds idle age.
    engine_kwargs.setdefault("pool_recycle", 1800)
    engine_kwargs.setdefault("poolclass", ObservedQueuePool)
    return create_engine(url, **engine_kwargs)


def engine_for(settings: Settings) -> Engine:
    """A new engine for the settings' database: SPEFT_DB_POOL_SIZE connections kept, up to
    DB_POOL_OVERFLOW more opened under load."""
    return make_engine(settings.database_url, pool_size=settings.db_pool_size,
                       max_overflow=DB_POOL_OVERFLOW)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """A session maker bound to `engine`; objects stay readable after commit."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def get_engine() -> Engine:
    """This process's engine for `SPEFT_DATABASE_URL`, built on first use."""
    global _engine, _sessions
    with _lock:
        if _engine is None:
            from .config import get_settings

            _engine = engine_for(get_settings())
            _sessions = session_factory(_engine)
        return _engine


def get_session_factory() -> sessionmaker[Session]:
    """This process's session maker, bound to `get_engine()`."""
    get_engine()
    assert _sessions is not None  # set together with _engine
    return _sessions


def dispose_engine(*, close: bool = False) -> None:
    """Forget this process's engine and pool (call in Celery `worker_process_init`).

    With `close=False` (right after a fork) pooled connections inherited from the parent are
    dropped without being closed, so the parent's sockets are left alone; pass `close=True`
    at shutdown. The next `get_engine()` builds a fresh engine from the current settings.
    """
    global _engine, _sessions
    with _lock:
        engine, _engine, _sessions = _engine, None, None
    if engine is not None:
        engine.dispose(close=close)


def alembic_config(url: str | URL | None = None) -> Config:
    """An Alembic config for this repo's migrations against `url` (default: SPEFT_DATABASE_URL)."""
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise RuntimeError(f"migrations folder not found at {MIGRATIONS_DIR}")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    if url is not None:
        # An attribute, not the ini option: configparser would mangle '%' in passwords.
        config.attributes["url"] = make_url(url) if isinstance(url, str) else url
    return config


def upgrade_database(url: str | URL | None = None, revision: str = "head") -> None:
    """Migrate the database at `url` (default: SPEFT_DATABASE_URL) up to `revision`."""
    with _migration_lock:
        command.upgrade(alembic_config(url), revision)


def dialect_insert(session: Session, table: Any) -> Any:
    """An INSERT for `table` with the session's dialect's ON CONFLICT clauses (SQLite or Postgres)."""
    from sqlalchemy.dialects import postgresql, sqlite

    dialect = session.get_bind().dialect.name
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)
