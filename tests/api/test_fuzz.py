"""Property-based fuzzing of the whole OpenAPI surface (schemathesis), in process.

Every operation in /openapi.json gets generated requests, valid and invalid (derandomized, a
fixed number per operation), against a started app holding alice's seeded file, job and
adapter, once on SQLite + a storage folder and once on PostgreSQL + S3 (moto): the database
matters (Postgres refuses strings SQLite stores, e.g. a NUL). Path ids are drawn both as
generated and as the seeded rows' ids. Every response must pass schemathesis's checks: no 5xx,
a documented status code, content type, headers and body schema, auth enforced, schema-valid
requests accepted (or refused by a rule no schema can state: 400) and invalid ones refused.
The /content downloads are checked the same way: their 200 is documented as binary.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import hypothesis
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis.config import SchemathesisConfig
from starlette.types import ASGIApp, Receive, Scope, Send

from api.core.config import Settings
from api.main import create_app
from tests.api.conftest import start_client
from tests.api.test_adapters_api import make_adapter
from tests.api.test_jobs_api import ALICE, KEYS

MAX_EXAMPLES = 30
# A schema-valid request may still be refused by a rule no schema can state (an unknown model
# or file, a dataset of the other task): that is a 400 naming the field. A 422 would mean the
# schema promised more than the app accepts, so 422 is not among these.
ACCEPTED_OR_REFUSED_BY_RULE = ["2xx", "400", "401", "404", "409", "413", "429"]
CONFIG = SchemathesisConfig.from_dict({
    "seed": 20261123, "headers": ALICE,
    "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True},
    "checks": {"positive_data_acceptance": {"expected-statuses": ACCEPTED_OR_REFUSED_BY_RULE}},
})
# Fuzzing sends ~1,300 requests in seconds and leaves its jobs queued: no request rate limit
# and no quota of active jobs, or most cases would test only the limiter's 429.
UNLIMITED = {"rate_limit": "", "max_active_jobs_per_tenant": 0}
CASES: Counter[tuple[str, str]] = Counter()  # (backend, operation) -> cases sent
REAL_IDS: dict[str, str] = {}  # path parameter -> the seeded row's id


class ServedApp:
    """The ASGI app schemathesis calls: forwards to the app the fixture started, whose
    lifespan the fixture owns (so schemathesis's own lifespan start is a no-op here)."""

    target: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        assert self.target is not None, "the served_app fixture starts the app"
        await self.target(scope, receive, send)


SERVED = ServedApp()
# The contract as the app publishes it (building an app opens nothing until it is started).
schema = schemathesis.openapi.from_dict(
    create_app(Settings(database_url="sqlite://", storage_url="file:///nonexistent")).openapi(),
    config=CONFIG)
schema.app = SERVED


@schema.hook
def flatmap_path_parameters(_: Any, path_parameters: dict[str, Any] | None) -> Any:
    """Path parameters as generated, or with every id replaced by the seeded row's id."""
    known = {name: REAL_IDS[name] for name in path_parameters or {} if name in REAL_IDS}
    return st.sampled_from([path_parameters, {**(path_parameters or {}), **known}])


def _backend_settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    """SQLite + a storage folder (start_client's default), or Postgres + S3 on moto."""
    if request.param == "sqlite":
        return {}
    return {"database_url": request.getfixturevalue("module_postgres_url"),
            "storage_url": "s3://speft-fuzz/objects",
            "s3_endpoint_url": request.getfixturevalue("s3_endpoint")}


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def served_app(request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start the app on one backend (alice and bob; enqueue a no-op), seed alice's rows, serve
    it to SERVED; at the end print and check how many cases each operation got."""
    with ExitStack() as stack:
        client = start_client(stack, tmp_path_factory.mktemp("fuzz"), api_keys=KEYS,
                              **UNLIMITED, **_backend_settings(request))
        client.app.state.enqueue_job = lambda job_id, device: None
        job_id, adapter_id = make_adapter(client)
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=ALICE).json()
        REAL_IDS.update(file_id=job["training_file"], job_id=job_id, adapter_id=adapter_id,
                        model_id=job["model"])
        SERVED.target = client.app
        yield request.param
        SERVED.target = None
    sent = {operation: n for (backend, operation), n in CASES.items() if backend == request.param}
    print(f"\nfuzz on {request.param}: {sum(sent.values())} cases over {len(sent)} operations: "
          f"{sent}")
    assert sent and all(sent.values())


@schema.parametrize()
@hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_every_operation_conforms_and_never_fails_with_5xx(case: Any, served_app: str) -> None:
    CASES[served_app, case.operation.label] += 1
    case.call_and_validate()
