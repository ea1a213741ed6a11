"""Faults under a running API, with real PostgreSQL, S3 (moto), Redis and uvicorn.

Fault 4, a dependency goes away: the database (refusing connections mid-run) or the storage (the
S3 server stopped). `/readyz` names what is down; requests answer 503 in the one error shape
with `param` naming `database` or `storage` (never a 500); nothing half-written stays (no file
row without its object, no object without its row; a delete commits first and leaves the
unreachable object to the orphan sweep); the API serves again once it is back.

Fault 3, the API is SIGKILLed under load and restarted: a real `speft serve` on a fresh
PostgreSQL database and a storage folder, sending to the shared Redis under a queue prefix of
its own (no worker: jobs stay queued; the test's keys are deleted at the end). Client threads
create jobs without pause, each with its own Idempotency-Key, sending the same key again while
the API is down, as a careful client does. The API is killed mid-stream, restarted, and the
stream goes on. Afterwards every job id that got a 2xx reads back, and the database holds
exactly one job per key (so at least as many jobs as 2xx answers).
"""
from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from api.core.db import make_engine
from api.core.models import File, Job
from api.errors import install_error_handlers
from tests.api.conftest import ClientFactory
from tests.api.test_files_api import _file_rows, _stored_keys
from tests.fixtures.databases import database_outage
from tests.fixtures.processes import kill, service_env, spawn_cli, stop, unavailable, wait_ready
from tests.fixtures.s3 import _free_port, moto_server

DATASET = b'{"text": "a fine film", "label": "pos"}\n{"text": "a dull film", "label": "neg"}\n'
# Fault 3
THREADS = 6
JOBS_PER_PHASE = 40  # 2xx answers wanted before the kill, and again after the restart
READY_TIMEOUT_S = 90.0
PHASE_TIMEOUT_S = 120.0
REDIS_URL = "redis://127.0.0.1:6379/14"  # keys under the test's own queue prefix, deleted after


def upload(client: TestClient) -> httpx.Response:
    """POST DATASET as a fine-tune file."""
    return client.post("/v1/files", files={"file": ("train.jsonl", DATASET)},
                       data={"purpose": "fine-tune"})


def assert_unavailable(response: httpx.Response, dependency: str) -> None:
    """A 503 in the one error shape naming `dependency`."""
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert (error["code"], error["type"], error["param"]) == (
        "service_unavailable", "service_unavailable", dependency)
    assert error["message"].startswith(f"{dependency} unavailable: ")
    assert response.headers["retry-after"] == "1"


def assert_readyz_names(client: TestClient, dependency: str) -> None:
    """/readyz is 503, its failing check is `dependency` and the others pass."""
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable" and body["error"]["param"] == dependency
    assert {name for name, check in body["checks"].items() if check != "ok"} == {dependency}


def test_database_outage_is_503_naming_it_leaves_nothing_and_recovers(
        empty_postgres_url: str, make_client: ClientFactory) -> None:
    client = make_client(database_url=empty_postgres_url)
    client.app.state.enqueue_job = lambda job_id, device: None
    kept = upload(client).json()["id"]
    job = {"model": "minilm-l6", "training_file": kept}
    assert client.post("/v1/fine_tuning/jobs", json=job).status_code == 201

    with database_outage(empty_postgres_url):
        assert_readyz_names(client, "database")
        assert_unavailable(client.get("/v1/files"), "database")
        assert_unavailable(client.get(f"/v1/files/{kept}"), "database")
        assert_unavailable(client.get("/v1/fine_tuning/jobs"), "database")
        assert_unavailable(client.post("/v1/fine_tuning/jobs", json=job), "database")
        # Open mode knows its tenant already: the upload reaches storage, then the database
        # fails on the commit, and the object just put is deleted again.
        assert_unavailable(upload(client), "database")
        assert _stored_keys(client) == [f"files/{kept}.jsonl"]

    assert client.get("/readyz").status_code == 200
    assert [f["id"] for f in client.get("/v1/files").json()["data"]] == [kept]
    assert len(client.get("/v1/fine_tuning/jobs").json()["data"]) == 1
    assert upload(client).status_code == 200


def test_storage_outage_is_503_naming_it_and_leaves_no_row(make_client: ClientFactory,
                                                            tmp_path: Path) -> None:
    with moto_server(tmp_path / "moto.log") as (endpoint, moto):
        client = make_client(storage_url="s3://speft-outage/objects", s3_endpoint_url=endpoint)
        kept = upload(client).json()["id"]
        moto.terminate()
        moto.wait(timeout=10)

        assert_readyz_names(client, "storage")
        assert_unavailable(upload(client), "storage")
        assert _file_rows(client) == 1
        assert_unavailable(client.get(f"/v1/files/{kept}/content"), "storage")
        # a delete commits first: its object, unreachable now, is left to the orphan sweep
        assert client.delete(f"/v1/files/{kept}").status_code == 200
        assert client.get(f"/v1/files/{kept}").status_code == 404
        with client.app.state.sessions() as session:
            row = session.get(File, kept)
            assert row.deleted_at is not None and row.purged_at is None


def _orig(message: str) -> Exception:
    return Exception(message)


@pytest.mark.parametrize("error, status, param", [
    (OperationalError("SELECT 1", {}, _orig("connection refused")), 503, "database"),
    (DBAPIError("SELECT 1", {}, _orig("server closed the connection"),
                connection_invalidated=True), 503, "database"),
    (PoolTimeoutError("QueuePool limit of size 5 overflow 10 reached"), 503, "database"),
    (DataError("INSERT", {}, _orig("text fields cannot contain NUL (0x00) bytes")), 400, None),
    (IntegrityError("INSERT", {}, _orig("duplicate key")), 500, None),
])
def test_database_errors_are_mapped_in_the_one_error_shape(error: Exception, status: int,
                                                            param: str | None) -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/fails")
    def fails() -> Any:
        raise error

    response = TestClient(app, raise_server_exceptions=False).get("/fails")
    assert response.status_code == status
    assert set(response.json()["error"]) == {"code", "message", "param", "type"}
    assert response.json()["error"]["param"] == param


# --- fault 3: the API killed under load -----------------------------------------------------


@dataclass
class Api:
    """One `speft serve` process at a time on a fixed port, restartable."""

    url: str
    env: dict[str, str]
    folder: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        """Start the server and wait until /readyz is 200."""
        self.starts += 1
        with (self.folder / f"serve-{self.starts}.log").open("wb") as log:
            self.process = spawn_cli(["serve", "--port", self.url.rsplit(":", 1)[1],
                                      "--no-access-log"], self.env, self.folder, log)
        wait_ready(self.url, [self.process], self.output, READY_TIMEOUT_S)

    def output(self) -> str:
        """Every server log so far."""
        return "\n".join(path.read_text(errors="replace")
                         for path in sorted(self.folder.glob("serve-*.log")))


@dataclass
class Load:
    """Client threads creating jobs until told to stop; what they saw."""

    url: str
    body: dict[str, str]
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    created: dict[str, str] = field(default_factory=dict)  # Idempotency-Key -> job id
    statuses: Counter[int | str] = field(default_factory=Counter)  # status, or "transport error"

    def ok(self) -> int:
        """Keys answered with a 2xx so far."""
        with self.lock:
            return len(self.created)

    def run(self) -> None:
        """Create jobs until `done`; a key whose request failed is sent again until answered."""
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self.done.is_set():
                key = uuid.uuid4().hex
                while not self.done.is_set():
                    try:
                        response = client.post("/v1/fine_tuning/jobs", json=self.body,
                                               headers={"Idempotency-Key": key})
                    except httpx.TransportError:
                        self._record("transport error")
                        time.sleep(0.1)
                        continue
                    self._record(response.status_code)
                    if response.status_code in (200, 201):
                        with self.lock:
                            self.created[key] = response.json()["id"]
                    break

    def _record(self, outcome: int | str) -> None:
        with self.lock:
            self.statuses[outcome] += 1

    def wait_for(self, count: int) -> None:
        """Block until `count` keys were answered with a 2xx."""
        deadline = time.monotonic() + PHASE_TIMEOUT_S
        while self.ok() < count:
            assert time.monotonic() < deadline, f"only {self.ok()} of {count} jobs created"
            time.sleep(0.05)


@pytest.fixture
def api(empty_postgres_url: str, tmp_path: Path) -> Iterator[Api]:
    """The API's settings and folder; the process is stopped and the test's Redis keys deleted
    at the end."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as err:
        unavailable(f"Redis not reachable at {REDIS_URL}: {err}")
    prefix = f"speft-restart-{uuid.uuid4().hex[:8]}-"
    env = service_env(SPEFT_DATABASE_URL=empty_postgres_url,
                      SPEFT_STORAGE_URL=f"file://{tmp_path / 'storage'}", SPEFT_API_KEYS="",
                      SPEFT_BROKER_URL=REDIS_URL, SPEFT_QUEUE_PREFIX=prefix,
                      SPEFT_RATE_LIMIT="", SPEFT_MAX_ACTIVE_JOBS_PER_TENANT="0")
    server = Api(f"http://127.0.0.1:{_free_port()}", env, tmp_path)
    try:
        yield server
    finally:
        if server.process is not None:
            stop(server.process)
        keys = list(client.scan_iter(match=f"*{prefix}*"))
        if keys:
            client.delete(*keys)


@pytest.mark.slow
def test_every_job_accepted_around_an_api_kill_exists_once(api: Api,
                                                           empty_postgres_url: str) -> None:
    api.start()
    upload = httpx.post(f"{api.url}/v1/files", files={"file": ("train.jsonl", DATASET)},
                        data={"purpose": "fine-tune"})
    assert upload.status_code == 200, upload.text
    load = Load(api.url, {"model": "minilm-l6", "training_file": upload.json()["id"]})
    threads = [threading.Thread(target=load.run) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    try:
        load.wait_for(JOBS_PER_PHASE)
        assert api.process is not None
        kill(api.process)  # SIGKILL mid-stream: requests in flight die with it
        killed_at = load.ok()
        api.start()
        load.wait_for(killed_at + JOBS_PER_PHASE)
    finally:
        load.done.set()
        for thread in threads:
            thread.join(timeout=30)

    created = dict(load.created)
    with httpx.Client(base_url=api.url, timeout=10) as client:
        for job_id in created.values():
            assert client.get(f"/v1/fine_tuning/jobs/{job_id}").status_code == 200, job_id
    engine = make_engine(empty_postgres_url)
    try:
        with engine.connect() as connection:
            jobs = connection.scalar(select(func.count()).select_from(Job))
            keys = connection.scalar(select(func.count(func.distinct(Job.idempotency_key))))
    finally:
        engine.dispose()
    print(f"\n{len(created)} keys answered 2xx ({killed_at} before the SIGKILL), {jobs} jobs "
          f"in the database; answers: {dict(load.statuses)} (a 200 is a key whose job was "
          "committed just before the kill, replayed)")
    assert load.statuses["transport error"] > 0, "the kill interrupted no request"
    assert set(load.statuses) <= {200, 201, "transport error"}, api.output()
    assert len(set(created.values())) == len(created)  # no two keys share a job
    # Each key answered 2xx has its one job; a key whose request was cut off when the load
    # stopped may have one too (committed before the kill); no key has two.
    assert jobs == keys >= len(created)
