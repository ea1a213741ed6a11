"""Alembic environment: migrates `api.core.models.Base.metadata` on SQLite and Postgres.

The database is, in order: a connection passed in `config.attributes["connection"]`, a URL in
`config.attributes["url"]` (what `api.core.db.upgrade_database` sets), `sqlalchemy.url` from the
ini file or `-x url=...`, else SPEFT_DATABASE_URL. Concurrent migrators wait for each other
(an advisory lock on Postgres, `BEGIN IMMEDIATE` on SQLite). SQLite migrations run in batch mode
in one transaction with foreign keys off (table rebuilds), checked by `PRAGMA foreign_key_check`.
"""
from __future__ import annotations

from logging.config import fileConfig
from typing import Any

from alembic import context
from sqlalchemy import Connection
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

from api.core.db import make_engine
from api.core.models import Base, UTCDateTime

MIGRATION_LOCK_ID = 0x5EEF7  # the Postgres advisory lock held while migrating
config = context.config
target_metadata = Base.metadata

if config.config_file_name is not None and not config.attributes.get("skip_logging_config"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def database_url() -> URL:
    """The URL to migrate, from the sources listed in the module docstring."""
    url = config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url")
    url = url or config.get_main_option("sqlalchemy.url")
    if not url:
        from api.core.config import get_settings

        url = get_settings().database_url
    return make_url(url) if isinstance(url, str) else url


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    """Render the models' own column types as plain SQLAlchemy types in revision files."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        render_item=render_item,
        **kwargs,
    )


def run_migrations_offline() -> None:
    """Emit the migration SQL for the configured URL without connecting."""
    url = database_url()
    _configure(
        url=url,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=url.get_backend_name() == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_on_postgres(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        # Processes starting together (API, workers) migrate one after the other.
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_ID})")
        context.run_migrations()


def _run_on_sqlite(connection: Connection) -> None:
    # PRAGMA foreign_keys changes only outside a transaction; batch mode rebuilds referenced tables.
    connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
    connection.commit()
    # One transaction holding the write lock: processes migrate one after the other, and a
    # failing migration leaves nothing half done. Alembic runs inside it and commits nothing.
    connection.exec_driver_sql("BEGIN IMMEDIATE")
    _configure(connection=connection, render_as_batch=True, transactional_ddl=True)
    with context.begin_transaction():
        context.run_migrations()
    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if broken:
        connection.rollback()
        raise RuntimeError(f"migration left foreign keys pointing nowhere: {broken[:5]}")
    connection.commit()
    connection.exec_driver_sql("PRAGMA foreign_keys=ON")
    connection.commit()


def run_migrations_online() -> None:
    """Run the migrations on a live connection."""
    connection = config.attributes.get("connection")
    if connection is not None:  # the caller's connection: the caller owns the transaction
        _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(database_url(), poolclass=NullPool)
    try:
        with engine.connect() as connection:
            if connection.dialect.name == "sqlite":
                _run_on_sqlite(connection)
            else:
                _run_on_postgres(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
