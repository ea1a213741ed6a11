"""Base models loading in a real `speft serve` process (open mode, tmp SQLite and storage, the
shared stories-260k registered as `make run` does), under real concurrent HTTP clients.

A fresh server's first requests on two models at once load both together: both loads succeed and
neither spoils the other (transformers' loading is serialised in the process). A load that fails
is a 503 in OpenAI's error shape for that request only, nothing of it is kept, `/readyz` stays
ready, and once the cause is gone the next request loads the model and is served.
"""
from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from api.services.models import register_local_model, register_stored_model
from speft_core.delta import delta_to_bytes
from speft_core.models import bundled_minilm_path, load_model
from speft_core.serving import random_delta
from tests.api.conftest import start_client
from tests.api.test_adapters_api import make_adapter
from tests.fixtures.processes import REPO, service_env, spawn_cli, stop, wait_ready
from tests.fixtures.s3 import _free_port
from tests.worker.test_model_cache import tar_folder

READY_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 300.0  # two cold loads on 2 shared cores
ARCHIVE_KEY = "models/stories.tar.gz"


@dataclass
class Server:
    """A `speft serve` process, and an in-process app on its database and storage (to store
    adapters and register models as an operator or a worker would)."""

    url: str
    local: TestClient
    folder: Path
    log: Path

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """One request on a connection of its own."""
        return httpx.post(f"{self.url}{path}", json=body, timeout=REQUEST_TIMEOUT_S)

    def ready(self) -> httpx.Response:
        """GET /readyz."""
        return httpx.get(f"{self.url}/readyz", timeout=30)


@pytest.fixture
def start_server(tmp_path: Path, stories_dir: Path) -> Iterator[Callable[..., Server]]:
    """start(prepare) -> a fresh server; `prepare(local)` runs on the in-process app first."""
    with ExitStack() as stack:

        def start(prepare: Callable[[TestClient], None] = lambda local: None) -> Server:
            local = start_client(stack, tmp_path)
            local.app.state.enqueue_job = lambda job_id, device: None
            prepare(local)
            port, log = _free_port(), tmp_path / "serve.log"
            env = service_env(
                SPEFT_DATABASE_URL=f"sqlite:///{tmp_path / 'speft.db'}",
                SPEFT_STORAGE_URL=f"file://{tmp_path / 'storage'}", SPEFT_API_KEYS="",
                SPEFT_BROKER_URL="", SPEFT_MODELS_DIR=str(stories_dir.parent),
                SPEFT_MODEL_CACHE_DIR=str(tmp_path / "model-cache"))
            with log.open("wb") as output:
                process = spawn_cli(["serve", "--port", str(port), "--no-access-log"], env, REPO,
                                    output)
            stack.callback(stop, process)
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, [process], lambda: log.read_text(errors="replace"), READY_TIMEOUT_S)
            return Server(url, local, tmp_path, log)

        yield start


def _classification_adapter(local: TestClient) -> str:
    """A synthetic MiniLM adapter stored as a finished job leaves it; its id."""
    base = load_model(bundled_minilm_path(), "classification", labels=["a", "b"])
    delta = random_delta(base, density=0.01, seed=1, labels=["neg", "pos"],
                         base_model="minilm-l6", scale=0.05)
    return make_adapter(local, content=delta_to_bytes(delta))[1]


def _burst(server: Server, bodies: list[tuple[str, dict[str, Any]]]) -> list[httpx.Response]:
    """Send every request at once, each from its own thread (released together)."""
    start = threading.Barrier(len(bodies))
    answers: list[httpx.Response | BaseException] = [RuntimeError("no answer")] * len(bodies)

    def send(index: int, path: str, body: dict[str, Any]) -> None:
        start.wait()
        try:
            answers[index] = server.post(path, body)
        except BaseException as err:  # noqa: BLE001 - reported below, with the server's log
            answers[index] = err

    threads = [threading.Thread(target=send, args=(i, *request))
               for i, request in enumerate(bodies)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    failed = [answer for answer in answers if not isinstance(answer, httpx.Response)]
    assert not failed, f"{failed}\n{server.log.read_text(errors='replace')[-4000:]}"
    return answers  # type: ignore[return-value]


def test_concurrent_first_requests_on_two_models_all_succeed(start_server):
    adapter: dict[str, str] = {}
    server = start_server(lambda local: adapter.update(id=_classification_adapter(local)))
    classify = ("/v1/classifications", {"model": "minilm-l6", "adapter": adapter["id"],
                                        "input": ["a fine film"]})
    complete = ("/v1/completions", {"model": "stories-260k", "prompt": "Once upon a time",
                                    "max_tokens": 8, "temperature": 0})
    for wave in range(2):  # the second wave: nothing the first one did was left broken
        answers = _burst(server, [classify, complete] * 4)
        statuses = [(path, answer.status_code) for (path, _), answer
                    in zip([classify, complete] * 4, answers, strict=True)]
        assert all(status == 200 for _, status in statuses), (
            wave, statuses, [a.text for a in answers if a.status_code != 200],
            server.log.read_text(errors="replace")[-4000:])
    texts = {answer.json()["choices"][0]["text"] for answer in answers[1::2]}
    assert len(texts) == 1  # greedy: every request read the same, whole model
    assert server.ready().status_code == 200


def _break_archive(server: Server) -> Callable[[], None]:
    """Replace the stored archive's bytes (the sha256 check fails); the undo puts them back."""
    storage = server.local.app.state.storage
    original = storage.get(ARCHIVE_KEY)
    storage.put(ARCHIVE_KEY, original[: len(original) // 2])
    return lambda: storage.put(ARCHIVE_KEY, original)


def _break_folder(server: Server) -> Callable[[], None]:
    """Truncate the registered folder's weights (the load fails); the undo puts them back."""
    weights = server.folder / "models" / "stories" / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:100])
    return lambda: weights.write_bytes(original)


def _register_broken_candidates(local: TestClient, stories_dir: Path, folder: Path) -> None:
    """Register stories-260k twice more: as a stored archive (`archived-stories`, unpacked at
    registration into a cache the server does not use) and as a server-side folder
    (`folder-stories`)."""
    storage, models_dir = local.app.state.storage, folder / "models"
    shutil.copytree(stories_dir, models_dir / "stories")
    storage.put(ARCHIVE_KEY, tar_folder(stories_dir))
    with local.app.state.sessions.begin() as session:
        register_stored_model(session, storage=storage, model_id="archived-stories",
                              task="causal_lm", storage_key=ARCHIVE_KEY,
                              cache_dir=folder / "registration-cache")
        register_local_model(session, model_id="folder-stories", task="causal_lm",
                             path=models_dir / "stories", models_dir=models_dir)


@pytest.mark.parametrize("model,break_it", [("archived-stories", _break_archive),
                                            ("folder-stories", _break_folder)])
def test_a_failed_load_is_503_for_its_request_and_the_next_one_loads_it(
        start_server, stories_dir, tmp_path, model, break_it):
    server = start_server(lambda local: _register_broken_candidates(local, stories_dir, tmp_path))
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    undo = break_it(server)
    failed = server.post("/v1/completions", body)
    assert failed.status_code == 503, failed.text
    error = failed.json()["error"]
    assert (error["code"], error["param"], error["type"]) == (
        "model_load_failed", "model", "service_unavailable"), error
    assert f"model {model!r} failed to load" in error["message"]
    assert "can be retried" in error["message"]
    assert failed.headers["retry-after"] == "1"  # when to try again (the openai SDK honours it)
    assert server.ready().status_code == 200  # the process itself is fine
    other = server.post("/v1/completions", {**body, "model": "stories-260k"})
    assert other.status_code == 200, other.text  # another model is not held up by it

    undo()
    served = server.post("/v1/completions", body)
    assert served.status_code == 200, served.text
    assert served.json()["choices"][0]["text"] == other.json()["choices"][0]["text"]
    assert not list((server.folder / "model-cache").glob(".unpack-*"))  # nothing half-kept
