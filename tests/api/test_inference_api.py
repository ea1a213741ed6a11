"""Inference over HTTP: `/v1/classifications`, `/v1/completions` (SSE too), `/v1/adapters/loaded`.

Adapters are synthetic (`random_delta`) but stored exactly as a worker leaves them. Every answer
is checked against the reference built the plain way: load the base, `merge_delta` the adapter's
delta, run it. One started client serves most tests (engines load the base models on first use);
preload and eviction need their own settings, so they start their own.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from speft_core.delta import Delta, delta_to_bytes, merge_delta
from speft_core.models import bundled_minilm_path, load_model, load_tokenizer
from speft_core.serving import Completion, SamplingParams, random_delta
from speft_core.serving.generation import generate
from tests.api.conftest import ClientFactory, start_client
from tests.api.test_adapters_api import make_adapter
from tests.api.test_jobs_api import ALICE, BOB, CAUSAL_LM, KEYS

LABELS = ["neg", "pos"]
TEXTS = ["a lovely film", "terrible, boring and far too long", "ok", "the cast was superb"]
PROMPTS = ["Once upon a time", "The little dog", "Lily wanted to", "One day, Tom"]
MAX_TOKENS = 20
ATOL = 1e-5


# --- deltas, adapters and references -------------------------------------------------------------


@pytest.fixture(scope="module")
def cls_deltas() -> dict[str, Delta]:
    """Synthetic MiniLM adapters: A and A2 share labels (composable), the rest are spares."""
    base = load_model(bundled_minilm_path(), "classification", labels=["a", "b"])
    return {key: random_delta(base, density=0.01, seed=seed, labels=LABELS,
                              base_model="minilm-l6", scale=0.05)
            for key, seed in (("A", 1), ("A2", 2), ("spare", 3))}


@pytest.fixture(scope="module")
def lm_deltas(stories_dir: Path) -> dict[str, Delta]:
    """Synthetic stories-260k adapters, large enough (scale 0.5) to change what greedy says."""
    base = load_model(stories_dir, "causal_lm")
    return {key: random_delta(base, density=0.05, seed=seed, base_model="stories-260k",
                              scale=0.5)
            for key, seed in (("A", 1), ("B", 2))}


def store_cls(client: TestClient, delta: Delta) -> str:
    """A MiniLM adapter holding `delta`, as a finished job leaves it; its id."""
    return make_adapter(client, content=delta_to_bytes(delta))[1]


def store_lm(client: TestClient, delta: Delta) -> str:
    """A stories-260k adapter holding `delta`, as a finished job leaves it; its id."""
    return make_adapter(client, content=delta_to_bytes(delta), model="stories-260k",
                        training=CAUSAL_LM)[1]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """One started app for the module: tenants alice and bob, enqueue a no-op."""
    with ExitStack() as stack:
        client = start_client(stack, tmp_path_factory.mktemp("inference"), api_keys=KEYS)
        client.app.state.enqueue_job = lambda job_id, device: None
        yield client


@pytest.fixture(scope="module")
def cls_ids(client: TestClient, cls_deltas: dict[str, Delta]) -> dict[str, str]:
    """Alice's classification adapters A and A2 in the module's client."""
    return {key: store_cls(client, cls_deltas[key]) for key in ("A", "A2")}


@pytest.fixture(scope="module")
def lm_ids(client: TestClient, lm_deltas: dict[str, Delta]) -> dict[str, str]:
    """Alice's completion adapters A and B in the module's client."""
    return {key: store_lm(client, delta) for key, delta in lm_deltas.items()}


@pytest.fixture(scope="module")
def cls_reference() -> Callable[[Delta, list[str]], torch.Tensor]:
    """delta, texts -> probabilities of the base MiniLM with `delta` merged (its label order)."""
    tokenizer = load_tokenizer(bundled_minilm_path())

    def probs(delta: Delta, texts: list[str]) -> torch.Tensor:
        model = load_model(bundled_minilm_path(), "classification", labels=delta.labels).eval()
        merge_delta(model, delta)
        encoded = tokenizer(texts, padding=True, truncation=True, max_length=512,
                            return_tensors="pt")
        with torch.inference_mode():
            return torch.softmax(model(**encoded).logits.float(), -1)

    return probs


@pytest.fixture(scope="module")
def lm_reference(stories_dir: Path,
                 lm_deltas: dict[str, Delta]) -> Callable[[str | None, str], Completion]:
    """(adapter key or None, prompt) -> the merged model's greedy completion of MAX_TOKENS."""
    tokenizer = load_tokenizer(stories_dir)
    models: dict[str | None, torch.nn.Module] = {}
    done: dict[tuple[str | None, str], Completion] = {}

    def completion(key: str | None, prompt: str) -> Completion:
        if key not in models:
            models[key] = load_model(stories_dir, "causal_lm").eval()
            if key is not None:
                merge_delta(models[key], lm_deltas[key])
        if (key, prompt) not in done:
            ids = [tokenizer.bos_token_id,
                   *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
            with torch.inference_mode():
                done[key, prompt] = generate(models[key], tokenizer, [ids], [
                    SamplingParams(max_tokens=MAX_TOKENS, temperature=0)])[0]
        return done[key, prompt]

    return completion


def weighted_sum(parts: list[tuple[Delta, float]]) -> Delta:
    """What a composition serves: Σ weight·entries, and the heads averaged by normalised weight."""
    first = parts[0][0]
    modules = {}
    for name, (indices, _) in first.modules.items():
        every = torch.cat([delta.modules[name][0].long() for delta, _ in parts])
        values = torch.cat([delta.modules[name][1] * weight for delta, weight in parts])
        union, inverse = torch.unique(every, sorted=True, return_inverse=True)
        summed = torch.zeros(union.numel(), dtype=values.dtype).index_add_(0, inverse, values)
        modules[name] = (union.to(indices.dtype), summed)
    total = sum(weight for _, weight in parts)
    extras = {name: sum(delta.extras[name] * (weight / total) for delta, weight in parts)
              for name in first.extras}
    return Delta(modules=modules, extras=extras, metadata=dict(first.metadata))


# --- request helpers ------------------------------------------------------------------------------


def classify(client: TestClient, adapter: Any, texts: Any, headers: dict[str, str] = ALICE,
             model: str = "minilm-l6") -> Any:
    """POST /v1/classifications."""
    return post_json(client, "/v1/classifications", headers,
                     {"model": model, "adapter": adapter, "input": texts})


def complete(client: TestClient, adapter: Any, prompt: str, headers: dict[str, str] = ALICE,
             **fields: Any) -> Any:
    """POST /v1/completions, greedy over MAX_TOKENS unless `fields` say otherwise."""
    body = {"model": "stories-260k", "adapter": adapter, "prompt": prompt,
            "max_tokens": MAX_TOKENS, "temperature": 0, **fields}
    return post_json(client, "/v1/completions", headers, body)


def post_json(client: TestClient, path: str, headers: dict[str, str], body: Any) -> Any:
    """POST `body` as ASCII JSON, so a lone surrogate travels as its `\\ud800` escape (as any
    JSON client may send it; httpx's own encoder cannot)."""
    return client.post(path, content=json.dumps(body),
                       headers={**headers, "Content-Type": "application/json"})


def probs_of(response: Any, labels: list[str] = LABELS) -> torch.Tensor:
    """The response's probabilities as a (inputs, labels) tensor, labels in `labels` order."""
    assert response.status_code == 200, response.text
    return torch.tensor([[row["probs"][label] for label in labels]
                         for row in response.json()["data"]])


def assert_error(response: Any, status: int, param: str, code: str | None = None) -> None:
    """The one error shape, with this status, param (and code)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "param", "type"} and error["message"]
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error


def loaded(client: TestClient, headers: dict[str, str] = ALICE) -> dict[str, Any]:
    """GET /v1/adapters/loaded."""
    response = client.get("/v1/adapters/loaded", headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def scrape(client: TestClient) -> dict[tuple[str, frozenset], float]:
    """/metrics as {(sample name, labels): value}."""
    text = client.get("/metrics").text
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def sse_events(response: Any) -> list[Any]:
    """The `data:` payloads of an event stream (JSON decoded, `[DONE]` kept as the string)."""
    events = []
    for block in response.text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            payload = block.removeprefix("data: ")
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


# --- classification -------------------------------------------------------------------------------


def test_classification_gives_each_input_the_merged_models_probabilities(
        client, cls_ids, cls_deltas, cls_reference):
    response = classify(client, cls_ids["A"], TEXTS)
    body = response.json()
    assert (body["object"], body["model"], body["adapter"]) == ("list", "minilm-l6", cls_ids["A"])
    assert [row["index"] for row in body["data"]] == list(range(len(TEXTS)))
    for row in body["data"]:
        assert list(row["probs"]) == LABELS
        assert sum(row["probs"].values()) == pytest.approx(1.0, abs=1e-6)
        assert row["label"] == max(row["probs"], key=row["probs"].get)
    want = cls_reference(cls_deltas["A"], TEXTS)
    torch.testing.assert_close(probs_of(response), want, atol=ATOL, rtol=0)

    single = classify(client, cls_ids["A"], TEXTS[1])
    assert [row["index"] for row in single.json()["data"]] == [0]
    torch.testing.assert_close(probs_of(single), want[1:2], atol=ATOL, rtol=0)


def test_composed_adapters_serve_the_weighted_sum_of_their_deltas(
        client, cls_ids, cls_deltas, cls_reference):
    parts = [{"id": cls_ids["A"], "weight": 0.5}, {"id": cls_ids["A2"], "weight": 0.5}]
    response = classify(client, parts, TEXTS)
    assert response.json()["adapter"] == parts

    summed = weighted_sum([(cls_deltas["A"], 0.5), (cls_deltas["A2"], 0.5)])
    want = cls_reference(summed, TEXTS)
    torch.testing.assert_close(probs_of(response), want, atol=ATOL, rtol=0)
    assert not torch.allclose(want, cls_reference(cls_deltas["A"], TEXTS), atol=1e-3)


def test_an_adapter_twice_in_a_composition_is_400(client, cls_ids):
    parts = [{"id": cls_ids["A"], "weight": 0.5}, {"id": cls_ids["A"], "weight": 0.5}]
    assert_error(classify(client, parts, TEXTS), 400, "adapter", "invalid_request")


def test_classification_without_an_adapter_is_400(client):
    assert_error(classify(client, None, TEXTS), 400, "adapter")


# --- completions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["A", None])
def test_greedy_completion_equals_the_merged_model(client, lm_ids, lm_reference, key):
    adapter = lm_ids[key] if key else None
    for prompt in PROMPTS[:2]:
        response = complete(client, adapter, prompt)
        assert response.status_code == 200, response.text
        body = response.json()
        want = lm_reference(key, prompt)
        assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
        assert (body["model"], body["adapter"]) == ("stories-260k", adapter)
        assert body["choices"] == [{"index": 0, "text": want.text, "finish_reason": "length"}]
        assert body["usage"] == {"prompt_tokens": want.prompt_tokens,
                                 "completion_tokens": MAX_TOKENS,
                                 "total_tokens": want.prompt_tokens + MAX_TOKENS}
    assert lm_reference("A", PROMPTS[0]).text != lm_reference(None, PROMPTS[0]).text


def test_stop_string_truncates_the_completion(client, lm_reference):
    full = lm_reference(None, PROMPTS[0]).text
    stop = full.split()[2]
    assert full.index(stop) > 0
    response = complete(client, None, PROMPTS[0], stop=[stop, "never appears"])
    assert response.json()["choices"][0] == {"index": 0, "text": full[: full.index(stop)],
                                             "finish_reason": "stop"}


@pytest.mark.parametrize("with_stop", [False, True])
def test_streamed_completion_sends_the_same_text_in_pieces(client, lm_ids, lm_reference,
                                                          with_stop):
    want = lm_reference("A", PROMPTS[1])
    text, finish, stop = want.text, "length", None
    if with_stop:
        stop = text.split()[1]
        assert text.index(stop) > 0
        text, finish = text[: text.index(stop)], "stop"
    response = complete(client, lm_ids["A"], PROMPTS[1], stream=True, stop=stop)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks, last = events[:-2], events[-2]
    assert len(chunks) > 1 and all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert all(c["usage"] is None for c in chunks)
    assert len({c["id"] for c in events[:-1]}) == 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    assert last["choices"][0] == {"index": 0, "text": "", "finish_reason": finish}
    assert last["usage"]["prompt_tokens"] == want.prompt_tokens
    assert last["usage"]["total_tokens"] == (want.prompt_tokens
                                             + last["usage"]["completion_tokens"])


def test_concurrent_completions_each_get_their_own_adapter(client, lm_ids, lm_reference):
    keys = [None, "A", "B"]
    requests = [(keys[(worker + i) % 3], PROMPTS[(worker + 2 * i) % len(PROMPTS)])
                for worker in range(8) for i in range(4)]
    want = {request: lm_reference(*request).text for request in set(requests)}

    def run(request: tuple[str | None, str]) -> tuple[tuple[str | None, str], str]:
        key, prompt = request
        response = complete(client, lm_ids[key] if key else None, prompt)
        assert response.status_code == 200, response.text
        return request, response.json()["choices"][0]["text"]

    mixed = ("speft_inference_batch_rows_count", frozenset({("path", "mixed")}))
    mixed_before = scrape(client).get(mixed, 0.0)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(run, requests))
    assert len(got) == 32
    for request, text in got:
        assert text == want[request], request
    # Requests queue up while a batch decodes, so some batches held several adapters at once.
    assert scrape(client).get(mixed, 0.0) > mixed_before


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path,body", [
    ("/v1/classifications", {"model": "no-such-model", "adapter": "adapter-x", "input": "x"}),
    ("/v1/completions", {"model": "no-such-model", "prompt": "x"}),
])
def test_unknown_model_is_404(client, path, body):
    assert_error(client.post(path, json=body, headers=ALICE), 404, "model", "not_found")


def test_unknown_and_other_tenants_adapters_are_404(client, cls_ids, lm_ids):
    assert_error(classify(client, "adapter-nope", TEXTS), 404, "adapter", "not_found")
    assert_error(complete(client, "adapter-nope", "x"), 404, "adapter", "not_found")
    assert_error(classify(client, cls_ids["A"], TEXTS, headers=BOB), 404, "adapter")
    assert_error(classify(client, [{"id": cls_ids["A"], "weight": 1.0}], TEXTS, headers=BOB),
                 404, "adapter")
    assert_error(complete(client, lm_ids["A"], "x", headers=BOB), 404, "adapter")

    assert classify(client, cls_ids["A"], TEXTS).status_code == 200  # resident for alice now
    assert cls_ids["A"] in {row["id"] for row in loaded(client)["data"]}
    assert loaded(client, BOB)["data"] == []


def test_adapter_of_another_base_model_is_400(client, lm_ids, cls_ids):
    assert_error(classify(client, lm_ids["A"], TEXTS), 400, "adapter")
    assert_error(complete(client, cls_ids["A"], "x"), 400, "adapter")


def test_model_of_the_other_task_is_400(client, lm_ids, cls_ids):
    assert_error(classify(client, lm_ids["A"], TEXTS, model="stories-260k"), 400, "model")
    response = client.post("/v1/completions", headers=ALICE,
                           json={"model": "minilm-l6", "adapter": cls_ids["A"], "prompt": "x"})
    assert_error(response, 400, "model")


@pytest.mark.parametrize("path,change,param", [
    ("/v1/classifications", {"input": []}, "input"),
    ("/v1/classifications", {"input": ["x"] * 257}, "input"),
    ("/v1/classifications", {"adapter": []}, "adapter"),
    ("/v1/classifications", {"input": [1]}, "input"),  # union fields: no `input.str` branch name
    ("/v1/classifications", {"adapter": 5}, "adapter"),
    ("/v1/completions", {"temperature": -0.5}, "temperature"),
    ("/v1/completions", {"temperature": 5.5}, "temperature"),
    ("/v1/completions", {"top_p": 0}, "top_p"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_invalid_fields_are_422_naming_the_field(client, path, change, param):
    body = ({"model": "minilm-l6", "adapter": "adapter-x", "input": ["x"]}
            if path == "/v1/classifications" else {"model": "stories-260k", "prompt": "x"})
    response = client.post(path, json={**body, **change}, headers=ALICE)
    assert_error(response, 422, param, "invalid_request")


def test_prompt_plus_max_tokens_beyond_the_models_positions_is_400(client, lm_reference):
    prompt_tokens = lm_reference(None, PROMPTS[0]).prompt_tokens  # stories-260k has 512
    response = complete(client, None, PROMPTS[0], max_tokens=512 - prompt_tokens + 1)
    assert_error(response, 400, "max_tokens")


def test_adapter_trained_in_another_dtype_is_422_naming_the_dtype(client, stories_dir):
    bf16 = load_model(stories_dir, "causal_lm").to(torch.bfloat16)
    delta = random_delta(bf16, density=0.05, seed=9, base_model="stories-260k")
    delta.metadata["base_dtype"] = "bfloat16"  # as a job with hyperparameters.dtype leaves it
    response = complete(client, store_lm(client, delta), PROMPTS[0])
    assert_error(response, 422, "adapter", "adapter_invalid")
    error = response.json()["error"]
    assert "trained against the base in bfloat16" in error["message"], error
    assert "float32" in error["message"], error


@pytest.mark.parametrize("corrupt", ["bytes replaced after registration", "not safetensors"])
def test_unservable_stored_adapter_is_422_and_others_keep_serving(
        client, cls_ids, cls_deltas, cls_reference, corrupt):
    if corrupt == "not safetensors":
        adapter_id = make_adapter(client, content=b"\x00not a safetensors file" * 64)[1]
    else:
        content = delta_to_bytes(cls_deltas["spare"])
        adapter_id = store_cls(client, cls_deltas["spare"])
        broken = content[:-16] + bytes(b ^ 0xFF for b in content[-16:])
        client.app.state.storage.put(f"adapters/{adapter_id}.safetensors", broken)
    assert_error(classify(client, adapter_id, TEXTS), 422, "adapter", "adapter_invalid")
    assert_error(classify(client, [{"id": cls_ids["A"], "weight": 0.5},
                                   {"id": adapter_id, "weight": 0.5}], TEXTS),
                 422, "adapter", "adapter_invalid")
    assert adapter_id not in {row["id"] for row in loaded(client)["data"]}
    torch.testing.assert_close(probs_of(classify(client, cls_ids["A"], TEXTS)),
                               cls_reference(cls_deltas["A"], TEXTS), atol=ATOL, rtol=0)


# --- resident adapters and metrics ----------------------------------------------------------------


def test_loaded_lists_resident_adapters_and_delete_removes_them(client, cls_deltas):
    adapter_id = store_cls(client, cls_deltas["spare"])
    assert classify(client, adapter_id, TEXTS).status_code == 200
    assert classify(client, adapter_id, TEXTS[:1]).status_code == 200
    before = loaded(client)
    row = next(row for row in before["data"] if row["id"] == adapter_id)
    assert before["data"][0]["id"] == adapter_id  # most recently used first
    assert (row["model"], row["pinned"], row["hits"]) == ("minilm-l6", False, 1)
    assert row["bytes"] > 0 and row["load_ms"] > 0
    assert row["last_used_at"] >= row["loaded_at"] > 0
    assert 0 < before["resident_bytes"] <= before["budget_bytes"]

    assert client.delete(f"/v1/adapters/{adapter_id}", headers=ALICE).status_code == 200
    after = loaded(client)
    assert adapter_id not in {row["id"] for row in after["data"]}
    assert after["resident_bytes"] == before["resident_bytes"] - row["bytes"]
    assert_error(classify(client, adapter_id, TEXTS), 404, "adapter")


def test_metrics_count_cache_misses_hits_loads_swaps_and_batches(client, cls_deltas):
    adapter_id = store_cls(client, cls_deltas["spare"])
    model = frozenset({("model", "minilm-l6")})
    names = {
        "misses": ("speft_adapter_cache_misses_total", model),
        "hits": ("speft_adapter_cache_hits_total", model),
        "resident": ("speft_adapter_resident_bytes", model),
        "loads": ("speft_adapter_load_seconds_count", frozenset()),
        "swaps": ("speft_adapter_swap_seconds_count", frozenset()),
        "batches": ("speft_inference_batch_rows_count", frozenset({("path", "swap")})),
        "rows": ("speft_inference_batch_rows_sum", frozenset({("path", "swap")})),
        "latency": ("speft_http_request_duration_seconds_count",
                    frozenset({("method", "POST"), ("route", "/v1/classifications")})),
    }

    def moved_since(start: dict[str, float]) -> dict[str, float]:
        # The batch is recorded just after its results are handed over: wait for it.
        deadline = time.monotonic() + 10
        while True:
            now = scrape(client)
            moved = {name: now.get(key, 0.0) - start[name] for name, key in names.items()}
            if moved["batches"] >= 1 or time.monotonic() > deadline:
                return moved
            time.sleep(0.02)

    def values() -> dict[str, float]:
        now = scrape(client)
        return {name: now.get(key, 0.0) for name, key in names.items()}

    start = values()
    assert classify(client, adapter_id, TEXTS).status_code == 200
    first = moved_since(start)
    size = next(r["bytes"] for r in loaded(client)["data"] if r["id"] == adapter_id)
    assert first == {"misses": 1, "hits": 0, "resident": size, "loads": 1, "swaps": 1,
                     "batches": 1, "rows": len(TEXTS), "latency": 1}

    start = values()
    assert classify(client, adapter_id, TEXTS[:1]).status_code == 200
    second = moved_since(start)
    assert second == {"misses": 0, "hits": 1, "resident": 0, "loads": 0, "swaps": 1,
                      "batches": 1, "rows": 1, "latency": 1}
    client.delete(f"/v1/adapters/{adapter_id}", headers=ALICE)


# --- start-up preload and eviction (own settings) -------------------------------------------------


def test_preloaded_adapters_are_pinned_at_startup_and_bogus_ids_are_skipped(
        make_client: ClientFactory, lm_deltas, lm_reference):
    first = make_client(api_keys=KEYS)
    first.app.state.enqueue_job = lambda job_id, device: None
    adapter_id = store_lm(first, lm_deltas["A"])

    client = make_client(api_keys=KEYS, inference_preload=f"adapter-bogus, {adapter_id}")
    [row] = loaded(client)["data"]
    assert (row["id"], row["model"], row["pinned"], row["hits"]) == (
        adapter_id, "stories-260k", True, 0)
    assert loaded(client, BOB)["data"] == []
    response = complete(client, adapter_id, PROMPTS[0])
    assert response.json()["choices"][0]["text"] == lm_reference("A", PROMPTS[0]).text
    assert loaded(client)["data"][0]["hits"] == 1


def test_small_cache_evicts_the_least_recent_adapter_and_both_still_serve(
        make_client: ClientFactory, lm_deltas, lm_reference):
    sizer = make_client(api_keys=KEYS)
    sizer.app.state.enqueue_job = lambda job_id, device: None
    ids = {key: store_lm(sizer, delta) for key, delta in lm_deltas.items()}
    for adapter_id in ids.values():
        assert complete(sizer, adapter_id, "x", max_tokens=1).status_code == 200
    sizes = {row["id"]: row["bytes"] for row in loaded(sizer)["data"]}
    budget = max(sizes.values()) + 1024
    assert budget < sum(sizes.values())

    client = make_client(api_keys=KEYS, adapter_cache_bytes=budget)
    for key in ("A", "B", "A"):
        response = complete(client, ids[key], PROMPTS[0])
        assert response.json()["choices"][0]["text"] == lm_reference(key, PROMPTS[0]).text
        resident = loaded(client)
        assert [row["id"] for row in resident["data"]] == [ids[key]]
        assert resident["resident_bytes"] <= resident["budget_bytes"] == budget
    evictions = scrape(client)[("speft_adapter_cache_evictions_total",
                                frozenset({("model", "stories-260k")}))]
    assert evictions == 2


# --- one bad request never fails its batch-mates; input limits -------------------------------------


@pytest.fixture(scope="module")
def batching_client(tmp_path_factory: pytest.TempPathFactory, lm_deltas: dict[str, Delta]
                    ) -> Iterator[tuple[TestClient, dict[str, str]]]:
    """An app that waits 200 ms to fill a batch, and alice's completion adapters A and B."""
    with ExitStack() as stack:
        client = start_client(stack, tmp_path_factory.mktemp("batching"), api_keys=KEYS,
                              inference_max_wait_ms=200)
        client.app.state.enqueue_job = lambda job_id, device: None
        yield client, {key: store_lm(client, delta) for key, delta in lm_deltas.items()}


def test_settings_that_underflow_and_bad_text_fail_no_batch_mate_across_tenants(
        batching_client, lm_reference):
    """Alice's (adapters A and B) and bob's (the base model) requests share batches with tiny
    temperatures and top-p (safe now: greedy) and a prompt the tokenizer cannot encode (a 400
    for it alone)."""
    client, ids = batching_client
    requests: list[tuple[dict[str, str], str | None, str, dict[str, Any]]] = [
        (ALICE, "A", PROMPTS[0], {}), (ALICE, "B", PROMPTS[1], {}), (BOB, None, PROMPTS[2], {}),
        (ALICE, "A", PROMPTS[2], {"temperature": 1e-40, "seed": 1}),
        (BOB, None, PROMPTS[3], {"temperature": 1.0, "top_p": 1e-300, "seed": 2}),
        (BOB, None, "\ud800", {}), (ALICE, "B", PROMPTS[0], {"temperature": 1e-40}),
        (ALICE, "A", PROMPTS[1], {"temperature": 1e-40, "stream": True}),
    ]

    def run(request: tuple[dict[str, str], str | None, str, dict[str, Any]]) -> Any:
        headers, key, prompt, fields = request
        return complete(client, ids[key] if key else None, prompt, headers=headers, **fields)

    with ThreadPoolExecutor(len(requests)) as pool:
        responses = list(pool.map(run, requests))
    for (_, key, prompt, fields), response in zip(requests, responses, strict=True):
        if prompt == "\ud800":
            assert_error(response, 400, "prompt")
        elif fields.get("stream"):
            events = sse_events(response)
            text = "".join(e["choices"][0]["text"] for e in events[:-1])
            assert text == lm_reference(key, prompt).text and events[-1] == "[DONE]"
        else:
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == lm_reference(key, prompt).text


def test_an_unencodable_classification_input_is_400_and_others_are_served(
        client, cls_ids, cls_deltas, cls_reference):
    with ThreadPoolExecutor(4) as pool:
        bad = pool.submit(classify, client, cls_ids["A"], ["fine", "\ud800"])
        good = [pool.submit(classify, client, cls_ids["A"], TEXTS) for _ in range(3)]
        # refused at the door (api/request_limits.py) before it can join a batch
        assert_error(bad.result(), 400, "input[1]", "invalid_request")
        want = cls_reference(cls_deltas["A"], TEXTS)
        for response in good:
            torch.testing.assert_close(probs_of(response.result()), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("path,change,param,where", [
    ("/v1/classifications", {"input": ["ok", "x" * 100_001]}, "input", "input[1]"),
    ("/v1/classifications", {"input": "x" * 100_001}, "input", "input has"),
    ("/v1/completions", {"prompt": "x " * 50_001}, "prompt", "prompt has"),
])
def test_texts_over_the_character_limit_are_400_naming_the_field(client, path, change, param,
                                                                 where):
    body = ({"model": "minilm-l6", "adapter": "adapter-x", "input": ["x"]}
            if path == "/v1/classifications" else {"model": "stories-260k", "prompt": "x"})
    response = client.post(path, json={**body, **change}, headers=ALICE)
    assert_error(response, 400, param, "invalid_request")
    assert where in response.json()["error"]["message"]
    assert "100,000" in response.json()["error"]["message"]


def test_the_character_limit_is_a_setting(make_client: ClientFactory, cls_deltas):
    client = make_client(api_keys=KEYS, inference_max_input_chars=10)
    client.app.state.enqueue_job = lambda job_id, device: None
    adapter_id = store_cls(client, cls_deltas["A"])
    assert classify(client, adapter_id, ["x" * 10]).status_code == 200
    assert_error(classify(client, adapter_id, ["x" * 11]), 400, "input")
    assert_error(complete(client, None, "x" * 11), 400, "prompt")


def test_a_long_input_within_the_limit_is_fast_and_classified_as_a_whole(
        client, cls_ids, cls_deltas, cls_reference):
    text = "the cast was superb but the plot dragged " * 2_400  # ~98k characters
    started = time.perf_counter()
    response = classify(client, cls_ids["A"], [text, TEXTS[0]])
    assert time.perf_counter() - started < 5
    torch.testing.assert_close(probs_of(response), cls_reference(cls_deltas["A"], [text, TEXTS[0]]),
                               atol=ATOL, rtol=0)


def test_a_prompt_longer_than_the_model_reads_is_400_naming_prompt(client):
    assert_error(complete(client, None, "Once upon a time " * 5_000), 400, "prompt")
