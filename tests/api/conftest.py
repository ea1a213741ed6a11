"""App fixtures: `make_client(**settings)` builds `create_app` on a tmp SQLite file and storage folder
and returns a started TestClient; `backend_client` runs the same on SQLite + local folder and on
Postgres + S3 (moto)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from api.core.config import Settings, get_settings
from api.core.db import dispose_engine
from api.main import create_app
from worker import tasks

ClientFactory = Callable[..., TestClient]
RunJob = Callable[[str], None]


def start_client(stack: ExitStack, folder: Path, **overrides: Any) -> TestClient:
    """A TestClient started inside `stack`, on SQLite and a storage folder under `folder`."""
    values: dict[str, Any] = {
        "database_url": f"sqlite:///{folder / 'speft.db'}",
        "storage_url": f"file://{folder / 'storage'}",
    }
    values.update(overrides)
    return stack.enter_context(TestClient(create_app(Settings(**values))))


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator[ClientFactory]:
    """A factory of started TestClients; settings default to tmp SQLite and a tmp storage folder."""
    with ExitStack() as stack:
        yield lambda **overrides: start_client(stack, tmp_path, **overrides)


@pytest.fixture
def backend_settings(migrated_db: Engine, request: pytest.FixtureRequest,
                     tmp_path: Path) -> dict[str, Any]:
    """Settings for both stacks: SQLite + file:// storage, and Postgres + s3:// on moto."""
    url = migrated_db.url.render_as_string(hide_password=False)
    if migrated_db.dialect.name == "postgresql":
        return {"database_url": url, "storage_url": request.getfixturevalue("s3_storage_url"),
                "s3_endpoint_url": request.getfixturevalue("s3_endpoint")}
    return {"database_url": url, "storage_url": f"file://{tmp_path / 'storage'}"}


@pytest.fixture
def backend_client(backend_settings: dict[str, Any], make_client: ClientFactory) -> TestClient:
    """A started client in open mode on each backend stack (closed before the database is emptied)."""
    return make_client(**backend_settings)


@pytest.fixture
def run_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunJob]:
    """The worker's run_job, in process, on the database and storage of `make_client`'s app."""
    monkeypatch.setenv("SPEFT_DATABASE_URL", f"sqlite:///{tmp_path / 'speft.db'}")
    monkeypatch.setenv("SPEFT_STORAGE_URL", f"file://{tmp_path / 'storage'}")
    get_settings.cache_clear()
    dispose_engine()
    tasks.get_storage.cache_clear()
    try:
        yield tasks.run_job.run
    finally:
        dispose_engine(close=True)
        tasks.get_storage.cache_clear()
        monkeypatch.undo()
        get_settings.cache_clear()
