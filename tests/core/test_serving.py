"""The serving engine: an adapter served per request gives what the model with it merged gives.

References are built the plain way: load the base, `merge_delta` the adapter's delta (its head
comes with its extras), run it. The swap path must match bit for bit, the mixed-batch path to
float tolerance (different padding and summation order), and the base weights must come back
bit for bit whatever happens.
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import threading
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from speft_core.delta import Delta, delta_to_bytes, merge_delta
from speft_core.errors import ConfigError, DeltaFormatError, DeltaMismatchError
from speft_core.models import bundled_minilm_path, load_model, load_tokenizer
from speft_core.serving import (
    SamplingParams,
    ServingEngine,
    ServingObserver,
    ServingOptions,
    random_delta,
)
from speft_core.serving.generation import generate
from speft_core.serving.text import cut_text

A_LABELS = ["neg", "pos"]
B_LABELS = ["x", "y", "z"]
C_LABELS = ["p", "q", "r", "s"]
TEXTS = ["a lovely film", "terrible, boring and far too long", "ok", "the cast was superb"]
PROMPTS = ["Once upon a time", "The little dog", "Lily wanted to", "One day, Tom"]
GREEDY = SamplingParams(max_tokens=20, temperature=0)
RESULT_TIMEOUT = 120  # seconds; generous: a first mixed batch may build the CPU kernels


def _blob_fetch(blob: bytes):
    return lambda: blob


class RecordingObserver(ServingObserver):
    """Remembers (path, distinct adapters) of every batch the engine ran."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, int]] = []

    def batch(self, *, path: str, rows: int, adapters: int, seconds: float) -> None:
        self.batches.append((path, adapters))

    def ran(self, count: int) -> list[tuple[str, int]]:
        """The batches, once `count` have been recorded (the hook runs after the results)."""
        deadline = time.monotonic() + 10
        while len(self.batches) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.batches


# --- classification ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> Path:
    return bundled_minilm_path()


@pytest.fixture(scope="module")
def cls_deltas(minilm) -> dict[str, tuple[Delta, list[str]]]:
    """Synthetic adapters for MiniLM: A, A2 (same labels as A), B (3 labels), C (4 labels)."""
    base = load_model(minilm, "classification", labels=["a", "b"])
    made = {}
    for key, labels, seed in (("A", A_LABELS, 1), ("A2", A_LABELS, 2), ("B", B_LABELS, 3),
                              ("C", C_LABELS, 4)):
        made[key] = (random_delta(base, density=0.01, seed=seed, labels=labels,
                                  base_model="minilm-l6", scale=0.05), labels)
    return made


@pytest.fixture(scope="module")
def cls_blobs(cls_deltas) -> dict[str, bytes]:
    return {key: delta_to_bytes(delta) for key, (delta, _) in cls_deltas.items()}


@pytest.fixture(scope="module")
def cls_merged(minilm, cls_deltas):
    """key -> the base model with that adapter merged (built lazily, kept for the module)."""
    models: dict[str, torch.nn.Module] = {}

    def merged(key: str, delta: Delta | None = None, labels: Sequence[str] | None = None):
        if key not in models:
            if delta is None:
                delta, labels = cls_deltas[key]
            model = load_model(minilm, "classification", labels=list(labels))
            merge_delta(model, delta)
            models[key] = model.eval()
        return models[key]

    return merged


@pytest.fixture(scope="module")
def cls_tokenizer(minilm):
    return load_tokenizer(minilm)


def reference_probs(model, tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """Softmax over the merged model's logits for texts padded together as one batch."""
    encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=512,
                        return_tensors="pt")
    with torch.inference_mode():
        return torch.softmax(model(**encoded).logits.float(), -1)


def probs_of(results, labels: Sequence[str]) -> torch.Tensor:
    return torch.tensor([[r.probs[label] for label in labels] for r in results])


@pytest.fixture(scope="module")
def swap_engine(minilm, cls_blobs):
    engine = ServingEngine.load(minilm, "classification", name="minilm-swap",
                                options=ServingOptions(path="swap", max_wait_ms=0))
    flat_at_load = engine.served.packed.flat.clone()
    yield engine, flat_at_load
    engine.close()


@pytest.fixture(scope="module")
def mixed_engine(minilm):
    engine = ServingEngine.load(minilm, "classification", name="minilm-mixed",
                                options=ServingOptions(path="auto", max_wait_ms=50),
                                observer=RecordingObserver())
    flat_at_load = engine.served.packed.flat.clone()
    yield engine, flat_at_load
    engine.close()


def assert_flat_is_base(engine: ServingEngine, flat_at_load: torch.Tensor, fresh) -> None:
    """The packed buffer equals its copy at load and the freshly loaded model's weights."""
    flat = engine.served.packed.flat
    assert torch.equal(flat, flat_at_load)
    for name, slot in engine.served.packed.slots.items():
        numel = slot.shape[0] * slot.shape[1]
        weight = fresh.get_submodule(name).weight.detach().reshape(-1)
        assert torch.equal(flat[slot.offset : slot.offset + numel], weight), name


def test_swap_classification_equals_merged_model_exactly(swap_engine, cls_blobs, cls_merged,
                                                         cls_tokenizer):
    engine, _ = swap_engine
    for key in ("A", "B"):
        adapter = engine.adapter(key, _blob_fetch(cls_blobs[key]))
        labels = adapter.labels
        results = engine.classify(adapter, TEXTS).result(timeout=RESULT_TIMEOUT)
        want = reference_probs(cls_merged(key), cls_tokenizer, TEXTS)
        assert torch.equal(probs_of(results, labels), want)
        assert [r.label for r in results] == [labels[i] for i in want.argmax(-1).tolist()]


def test_mixed_batch_classification_matches_each_merged_model(mixed_engine, cls_blobs, cls_merged,
                                                              cls_tokenizer):
    engine, _ = mixed_engine
    a = engine.adapter("A", _blob_fetch(cls_blobs["A"]))
    b = engine.adapter("B", _blob_fetch(cls_blobs["B"]))
    engine.observer.batches.clear()
    fa, fb = engine.classify(a, TEXTS[:2]), engine.classify(b, TEXTS[2:])
    got_a, got_b = fa.result(timeout=RESULT_TIMEOUT), fb.result(timeout=RESULT_TIMEOUT)
    assert engine.observer.ran(1) == [("mixed", 2)]
    for key, got, texts in (("A", got_a, TEXTS[:2]), ("B", got_b, TEXTS[2:])):
        want = reference_probs(cls_merged(key), cls_tokenizer, texts)
        labels = A_LABELS if key == "A" else B_LABELS
        assert torch.allclose(probs_of(got, labels), want, atol=1e-5, rtol=0)
        assert [r.label for r in got] == [labels[i] for i in want.argmax(-1).tolist()]


def test_forced_mixed_path_with_one_adapter_matches_merged_model(minilm, cls_blobs, cls_merged,
                                                                 cls_tokenizer):
    engine = ServingEngine.load(minilm, "classification", name="minilm-forced-mixed",
                                options=ServingOptions(path="mixed"))
    try:
        adapter = engine.adapter("C", _blob_fetch(cls_blobs["C"]))
        got = engine.classify(adapter, TEXTS).result(timeout=RESULT_TIMEOUT)
    finally:
        engine.close()
    want = reference_probs(cls_merged("C"), cls_tokenizer, TEXTS)
    assert torch.allclose(probs_of(got, C_LABELS), want, atol=1e-5, rtol=0)


def test_concurrent_classification_each_request_gets_its_own_adapter(
        mixed_engine, cls_blobs, cls_merged, cls_tokenizer, minilm):
    engine, flat_at_load = mixed_engine
    adapters = {key: engine.adapter(key, _blob_fetch(cls_blobs[key])) for key in ("A", "B", "C")}
    wants = {(key, text): reference_probs(cls_merged(key), cls_tokenizer, [text])
             for key in adapters for text in TEXTS}

    def client(worker: int) -> int:
        checked = 0
        for i in range(6):
            key = "ABC"[(worker + i) % 3]
            text = TEXTS[(worker * 7 + i) % len(TEXTS)]
            got = engine.classify(adapters[key], [text]).result(timeout=RESULT_TIMEOUT)
            labels = adapters[key].labels
            assert torch.allclose(probs_of(got, labels), wants[key, text], atol=1e-5, rtol=0)
            checked += 1
        return checked

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(client, range(8))) == 48
    assert_flat_is_base(engine, flat_at_load,
                        load_model(minilm, "classification", labels=["a", "b"]))


def test_swap_context_restores_base_bit_for_bit_even_on_error(swap_engine, cls_blobs, cls_merged,
                                                              cls_deltas, minilm):
    engine, flat_at_load = swap_engine
    adapter = engine.adapter("A", _blob_fetch(cls_blobs["A"]))
    merged = cls_merged("A")
    packed = engine.served.packed
    with pytest.raises(RuntimeError, match="inside the swap"), engine.served.swapped(adapter):
        for name in cls_deltas["A"][0].modules:  # inside: exactly the merged weights
            slot = packed.slots[name]
            numel = slot.shape[0] * slot.shape[1]
            assert torch.equal(packed.flat[slot.offset : slot.offset + numel],
                               merged.get_submodule(name).weight.reshape(-1))
        assert not torch.equal(packed.flat, flat_at_load)
        raise RuntimeError("boom inside the swap")
    engine.classify(adapter, TEXTS).result(timeout=RESULT_TIMEOUT)  # a normal swap batch as well
    assert_flat_is_base(engine, flat_at_load,
                        load_model(minilm, "classification", labels=["a", "b"]))


def test_composed_adapter_equals_merged_weighted_sum(swap_engine, cls_blobs, cls_deltas,
                                                     cls_merged, cls_tokenizer):
    engine, _ = swap_engine
    a = engine.adapter("A", _blob_fetch(cls_blobs["A"]))
    a2 = engine.adapter("A2", _blob_fetch(cls_blobs["A2"]))
    composed = engine.compose([(a, 0.5), (a2, 0.5)])

    delta_a, delta_a2 = cls_deltas["A"][0], cls_deltas["A2"][0]
    modules = {}
    for name, (idx_a, val_a) in delta_a.modules.items():
        idx_a2, val_a2 = delta_a2.modules[name]
        numel = engine.served.model.get_submodule(name).weight.numel()
        dense = torch.zeros(numel, dtype=torch.float32)
        dense.index_add_(0, idx_a.long(), val_a.float() * 0.5)
        dense.index_add_(0, idx_a2.long(), val_a2.float() * 0.5)
        union = torch.unique(torch.cat([idx_a.long(), idx_a2.long()]))
        modules[name] = (union.to(idx_a.dtype), dense[union])
    extras = {name: tensor * 0.5 + delta_a2.extras[name] * 0.5
              for name, tensor in delta_a.extras.items()}
    summed = Delta(modules=modules, extras=extras, metadata=dict(delta_a.metadata))
    want = reference_probs(cls_merged("A+A2", summed, A_LABELS), cls_tokenizer, TEXTS)

    got = engine.classify(composed, TEXTS).result(timeout=RESULT_TIMEOUT)
    assert torch.equal(probs_of(got, A_LABELS), want)
    assert not torch.equal(want, reference_probs(cls_merged("A"), cls_tokenizer, TEXTS))


def test_composing_adapters_with_different_labels_is_refused(swap_engine, cls_blobs):
    engine, _ = swap_engine
    a = engine.adapter("A", _blob_fetch(cls_blobs["A"]))
    b = engine.adapter("B", _blob_fetch(cls_blobs["B"]))
    with pytest.raises(ConfigError) as err:
        engine.compose([(a, 0.5), (b, 0.5)])
    assert err.value.param == "adapter"


def test_classify_refuses_a_causal_adapter(causal_engine, causal_blobs):
    engine, _ = causal_engine
    adapter = engine.adapter("A", _blob_fetch(causal_blobs["A"]))
    with pytest.raises(ConfigError) as err:
        engine.classify(adapter, ["hello"])
    assert err.value.param == "adapter"


def test_classify_refuses_no_adapter(swap_engine):
    engine, _ = swap_engine
    with pytest.raises(ConfigError) as err:
        engine.classify(None, ["hello"])
    assert err.value.param == "adapter"


def test_loading_an_adapter_during_a_batch_leaves_both_alone(minilm, cls_blobs, cls_merged,
                                                             cls_tokenizer):
    """A load's head check and a batch's head overlap (the interleaving pinned down by hooks)."""
    engine = ServingEngine.load(minilm, "classification", name="minilm-race",
                                options=ServingOptions(max_wait_ms=0))
    try:
        a = engine.adapter("A", _blob_fetch(cls_blobs["A"]))
        head = engine.served.model.get_submodule(engine.served.head_prefix).inner
        loader_in, batch_in, loader_done = threading.Event(), threading.Event(), threading.Event()
        main = threading.current_thread()

        def pre(_module, _inputs):
            if threading.current_thread() is main:  # the load's head check has begun
                loader_in.set()
                batch_in.wait(5)
            else:  # the batch's head has begun
                batch_in.set()
                loader_done.wait(5)

        def post(_module, _inputs, _output):
            if threading.current_thread() is main:
                loader_done.set()

        handles = [head.register_forward_pre_hook(pre), head.register_forward_hook(post)]
        with ThreadPoolExecutor(1) as pool:
            try:
                batch = pool.submit(lambda: (loader_in.wait(5), engine.classify(a, TEXTS))[1])
                load_error = None
                try:
                    engine.adapter("C", _blob_fetch(cls_blobs["C"]))
                except DeltaMismatchError as err:
                    load_error = err
                future = batch.result(timeout=RESULT_TIMEOUT)
                batch_error = future.exception(timeout=RESULT_TIMEOUT)
            finally:
                for handle in handles:
                    handle.remove()
        assert load_error is None
        assert batch_error is None
        want = reference_probs(cls_merged("A"), cls_tokenizer, TEXTS)
        assert torch.equal(probs_of(future.result(), A_LABELS), want)
        again = engine.classify(a, TEXTS).result(timeout=RESULT_TIMEOUT)  # and A's head is still A's
        assert torch.equal(probs_of(again, A_LABELS), want)
    finally:
        engine.close()


# --- corrupt adapters, single-flight loads ---------------------------------------------------------


@pytest.fixture(scope="module")
def bad_blobs(minilm, cls_blobs) -> dict[str, tuple[bytes, str | None]]:
    """name -> (bytes, sha256 to check against) of adapters the engine must refuse."""
    good = cls_blobs["A"]
    other = load_model(minilm, "classification", labels=A_LABELS)
    with torch.no_grad():
        other.get_submodule("bert.encoder.layer.0.attention.self.query").weight[0, 0] += 1e-3
    foreign = random_delta(other, density=0.01, seed=5, labels=A_LABELS, base_model="other")
    base = load_model(minilm, "classification", labels=A_LABELS)
    causal = random_delta(base, density=0.01, seed=6, base_model="minilm-l6")  # task causal_lm
    return {
        "truncated": (good[: len(good) // 2], None),
        "wrong-sha256": (good, hashlib.sha256(b"something else").hexdigest()),
        "other-base": (delta_to_bytes(foreign), None),
        "other-task": (delta_to_bytes(causal), None),
    }


@pytest.mark.parametrize("kind", [
    "truncated",
    "wrong-sha256",
    "other-base",
    "other-task",
])
def test_corrupt_adapter_is_refused_uncached_while_good_requests_go_on(
        swap_engine, cls_blobs, cls_merged, cls_tokenizer, bad_blobs, kind):
    engine, _ = swap_engine
    good = engine.adapter("A", _blob_fetch(cls_blobs["A"]))
    want = reference_probs(cls_merged("A"), cls_tokenizer, TEXTS)
    stop = threading.Event()

    def keep_classifying() -> int:
        served = 0
        while not stop.is_set() or served == 0:
            got = engine.classify(good, TEXTS).result(timeout=RESULT_TIMEOUT)
            # the two clients' requests may share a batch of 8 rows: float rounding, not bits
            assert torch.allclose(probs_of(got, A_LABELS), want, atol=1e-6, rtol=0)
            served += 1
        return served

    data, sha256 = bad_blobs[kind]
    with ThreadPoolExecutor(2) as pool:
        clients = [pool.submit(keep_classifying) for _ in range(2)]
        try:
            with pytest.raises((DeltaFormatError, DeltaMismatchError)) as err:
                engine.adapter(f"bad-{kind}", _blob_fetch(data), sha256=sha256)
        finally:
            stop.set()
        assert all(c.result(timeout=RESULT_TIMEOUT) > 0 for c in clients)
    assert f"bad-{kind}" not in engine.cache
    assert err.value.param == "adapter"
    assert f"bad-{kind}" in str(err.value)


def test_adapter_trained_against_another_dtype_is_refused_naming_it(swap_engine, minilm):
    """Serving holds the checkpoint's dtype (float32 here): a delta trained against the base in
    bfloat16 (`base_dtype`, as training writes it) is refused by dtype, not as another base."""
    engine, _ = swap_engine
    bf16 = load_model(minilm, "classification", labels=A_LABELS).to(torch.bfloat16)
    delta = random_delta(bf16, density=0.01, seed=7, labels=A_LABELS, base_model="minilm-l6")
    delta.metadata["base_dtype"] = "bfloat16"
    with pytest.raises(DeltaMismatchError) as err:
        engine.adapter("bf16", _blob_fetch(delta_to_bytes(delta)))
    assert "bfloat16" in err.value.message and "float32" in err.value.message
    assert "hyperparameters.dtype" in err.value.message and err.value.param == "adapter"
    assert "bf16" not in engine.cache


def test_an_adapter_loaded_while_a_bfloat16_model_loads_elsewhere_is_served(
        swap_engine, cls_blobs, cls_merged, cls_tokenizer):
    """transformers sets torch's process-wide default dtype while it builds a model (bfloat16
    for a model registered in it): an adapter verified meanwhile on a float32 engine, on another
    thread, is still accepted and serves its own probabilities."""
    engine, _ = swap_engine
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # what that load does, for as long as it runs
    try:
        adapter = engine.adapter("A-beside-a-bf16-load", _blob_fetch(cls_blobs["A"]))
    finally:
        torch.set_default_dtype(previous)
    got = engine.classify(adapter, TEXTS).result(timeout=RESULT_TIMEOUT)
    assert torch.equal(probs_of(got, A_LABELS),
                       reference_probs(cls_merged("A"), cls_tokenizer, TEXTS))


def test_concurrent_cold_loads_fetch_once(minilm, cls_blobs):
    engine = ServingEngine.load(minilm, "classification", name="minilm-flight")
    calls = []
    lock = threading.Lock()

    def fetch() -> bytes:
        with lock:
            calls.append(threading.current_thread().name)
        time.sleep(0.2)
        return cls_blobs["B"]

    barrier = threading.Barrier(8)

    def load(_):
        barrier.wait(5)
        return engine.adapter("B", fetch)

    try:
        with ThreadPoolExecutor(8) as pool:
            adapters = list(pool.map(load, range(8)))
    finally:
        engine.close()
    assert len(calls) == 1
    assert all(a is adapters[0] for a in adapters)
    assert adapters[0].labels == B_LABELS


# --- causal LM -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def causal_deltas(stories_dir):
    base = load_model(stories_dir, "causal_lm")
    return {key: random_delta(base, density=0.05, seed=seed, base_model="stories-260k", scale=0.5)
            for key, seed in (("A", 1), ("B", 2), ("E1", 11), ("E2", 12), ("E3", 13),
                              ("E4", 14), ("E5", 15))}


@pytest.fixture(scope="module")
def causal_blobs(causal_deltas):
    return {key: delta_to_bytes(delta) for key, delta in causal_deltas.items()}


@pytest.fixture(scope="module")
def causal_engine(stories_dir):
    engine = ServingEngine.load(stories_dir, "causal_lm", name="stories",
                                options=ServingOptions(max_wait_ms=5), observer=RecordingObserver())
    flat_at_load = engine.served.packed.flat.clone()
    yield engine, flat_at_load
    engine.close()


@pytest.fixture(scope="module")
def causal_refs(stories_dir, causal_deltas, causal_engine):
    """(adapter key or None, prompt) -> greedy Completion of the merged model, one prompt alone."""
    engine, _ = causal_engine
    tokenizer = load_tokenizer(stories_dir)
    refs = {}
    for key in (None, "A", "B"):
        model = load_model(stories_dir, "causal_lm").eval()
        if key is not None:
            merge_delta(model, causal_deltas[key])
        with torch.inference_mode():
            for prompt in PROMPTS:
                refs[key, prompt] = generate(model, tokenizer, [engine.prompt_ids(prompt)],
                                             [GREEDY])[0]
    for key in ("A", "B"):  # the adapters change what greedy decoding says
        assert any(refs[key, p].text != refs[None, p].text for p in PROMPTS)
    return refs


def test_swap_completion_equals_merged_model(stories_dir, causal_blobs, causal_refs):
    engine = ServingEngine.load(stories_dir, "causal_lm", name="stories-swap",
                                options=ServingOptions(path="swap", max_wait_ms=0))
    try:
        for key in ("A", "B"):
            adapter = engine.adapter(key, _blob_fetch(causal_blobs[key]))
            for prompt in PROMPTS:
                got = engine.complete(adapter, engine.prompt_ids(prompt), GREEDY).result(RESULT_TIMEOUT)
                assert got == causal_refs[key, prompt]
    finally:
        engine.close()


def test_mixed_batch_completions_match_each_merged_model(causal_engine, causal_blobs,
                                                         causal_refs):
    engine, _ = causal_engine
    adapters = {None: None, **{k: engine.adapter(k, _blob_fetch(causal_blobs[k]))
                               for k in ("A", "B")}}
    engine.observer.batches.clear()
    futures = {(key, prompt): engine.complete(adapter, engine.prompt_ids(prompt), GREEDY)
               for key, adapter in adapters.items() for prompt in PROMPTS[:2]}
    got = {k: f.result(timeout=RESULT_TIMEOUT) for k, f in futures.items()}
    assert ("mixed", 3) in engine.observer.ran(1)
    for key_prompt, completion in got.items():
        assert completion.text == causal_refs[key_prompt].text, key_prompt


def test_concurrent_completions_each_get_their_adapter_and_base_is_untouched(
        causal_engine, causal_blobs, causal_refs, stories_dir):
    engine, flat_at_load = causal_engine
    adapters = {None: None, **{k: engine.adapter(k, _blob_fetch(causal_blobs[k]))
                               for k in ("A", "B")}}
    keys = [None, "A", "B"]

    def client(worker: int) -> int:
        for i in range(4):
            key = keys[(worker + i) % 3]
            prompt = PROMPTS[(worker + 2 * i) % len(PROMPTS)]
            got = engine.complete(adapters[key], engine.prompt_ids(prompt), GREEDY).result(RESULT_TIMEOUT)
            assert got.text == causal_refs[key, prompt].text, (key, prompt)
        return 4

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(client, range(8))) == 32
    assert_flat_is_base(engine, flat_at_load, load_model(stories_dir, "causal_lm"))


# --- eviction ------------------------------------------------------------------------------------


def test_eviction_keeps_within_budget_drops_lru_keeps_pinned_and_frees(stories_dir, causal_blobs):
    sizer = ServingEngine.load(stories_dir, "causal_lm", name="stories-sizer")
    try:
        nbytes = {k: sizer.adapter(k, _blob_fetch(causal_blobs[k])).nbytes
                  for k in ("E1", "E2", "E3", "E4", "E5")}
    finally:
        sizer.close()
    sizes = sorted(nbytes.values())
    budget = sizes[-1] + sizes[-2] + sizes[0] // 2  # any two adapters fit, no three do
    assert sum(sizes[:3]) > budget
    engine = ServingEngine.load(stories_dir, "causal_lm", name="stories-evict",
                                options=ServingOptions(cache_bytes=budget))
    try:
        refs = {}

        def load(key: str, pin: bool = False) -> None:
            refs[key] = weakref.ref(engine.adapter(key, _blob_fetch(causal_blobs[key]), pin=pin))
            assert engine.cache.resident_bytes <= engine.cache.budget_bytes == budget

        for key in ("E1", "E2", "E3", "E4"):
            load(key)
        assert [e.key for e in engine.loaded()] == ["E4", "E3"]
        gc.collect()
        assert refs["E1"]() is None and refs["E2"]() is None
        assert refs["E3"]() is not None

        engine.unload("E3")
        engine.unload("E4")
        load("E1", pin=True)
        for key in ("E2", "E3", "E4", "E5"):
            load(key)
            assert "E1" in engine.cache
        assert [e.key for e in engine.loaded()] == ["E5", "E1"]
        assert engine.loaded()[1].pinned
        gc.collect()
        assert all(refs[k]() is None for k in ("E2", "E3", "E4"))
    finally:
        engine.close()


def test_evicted_adapter_that_served_a_request_is_freed(stories_dir, causal_blobs):
    engine = ServingEngine.load(stories_dir, "causal_lm", name="stories-free")
    try:
        adapter = engine.adapter("E1", _blob_fetch(causal_blobs["E1"]))
        engine.complete(adapter, engine.prompt_ids("Once"), GREEDY).result(timeout=RESULT_TIMEOUT)
        ref = weakref.ref(adapter)
        del adapter
        assert engine.unload("E1")
        gc.collect()
        assert ref() is None
    finally:
        engine.close()


# --- generation features -------------------------------------------------------------------------


def _complete(engine, prompt: str, params: SamplingParams, adapter=None):
    pieces: list[str] = []
    completion = engine.complete(adapter, engine.prompt_ids(prompt), params,
                                 on_text=pieces.append).result(timeout=RESULT_TIMEOUT)
    return completion, pieces


def test_stop_string_truncates_and_is_never_streamed(causal_engine, causal_refs):
    engine, _ = causal_engine
    full = causal_refs[None, PROMPTS[0]].text
    words = full.split()
    stop = " " + words[len(words) // 2]
    assert stop in full
    completion, pieces = _complete(engine, PROMPTS[0],
                                   SamplingParams(max_tokens=20, temperature=0, stop=(stop,)))
    assert completion.text == full[: full.index(stop)]
    assert completion.finish_reason == "stop"
    assert "".join(pieces) == completion.text
    assert all(stop not in piece for piece in pieces)
    assert len(pieces) > 1  # it streamed as it went, not all at the end


def test_streamed_pieces_concatenate_to_the_text(causal_engine):
    engine, _ = causal_engine
    params = SamplingParams(max_tokens=25, temperature=0.8, seed=4, stop=(".", " the"))
    completion, pieces = _complete(engine, PROMPTS[1], params)
    assert "".join(pieces) == completion.text
    assert "." not in completion.text and " the" not in completion.text


def test_a_stop_token_ends_the_row_like_eos(causal_engine):
    """`stop_token_ids` (a chat template's end-of-turn token) stop generation before the token,
    as eos does."""
    engine, _ = causal_engine
    prompt = engine.prompt_ids(PROMPTS[0])
    greedy = SamplingParams(max_tokens=12, temperature=0)
    full = engine.complete(None, prompt, greedy).result(RESULT_TIMEOUT)
    whole = engine.prompt_ids(PROMPTS[0] + full.text)  # the generated ids, re-read
    assert whole[: len(prompt)] == prompt
    tokens = whole[len(prompt):]
    stop_at = next(i for i, t in enumerate(tokens) if i > 0 and t not in tokens[:i])
    stopped = engine.complete(None, prompt, SamplingParams(
        max_tokens=12, temperature=0, stop_token_ids=(tokens[stop_at],))).result(RESULT_TIMEOUT)
    assert stopped.finish_reason == "stop" and full.finish_reason == "length"
    assert stopped.completion_tokens == stop_at
    assert full.text.startswith(stopped.text) and len(stopped.text) < len(full.text)


def test_a_row_whose_reader_is_gone_stops_while_its_batch_goes_on(stories_dir):
    """on_text returning False (a streaming client went away) ends that row early only."""
    engine = ServingEngine.load(stories_dir, "causal_lm", name="stories-cancel",
                                options=ServingOptions(max_wait_ms=50))
    try:
        params = SamplingParams(max_tokens=30, temperature=0)
        kept: list[str] = []
        dropped = engine.complete(None, engine.prompt_ids(PROMPTS[0]), params,
                                  on_text=lambda piece: False)
        reading = engine.complete(None, engine.prompt_ids(PROMPTS[1]), params,
                                  on_text=lambda piece: kept.append(piece) is None)
        stopped, finished = dropped.result(RESULT_TIMEOUT), reading.result(RESULT_TIMEOUT)
    finally:
        engine.close()
    assert stopped.finish_reason == "cancelled" and stopped.completion_tokens < 5
    assert finished.finish_reason == "length" and finished.completion_tokens == 30
    assert "".join(kept) == finished.text


def test_max_tokens_ends_with_length(causal_engine):
    engine, _ = causal_engine
    completion, _ = _complete(engine, PROMPTS[0], SamplingParams(max_tokens=7, temperature=0))
    assert completion.finish_reason == "length"
    assert completion.completion_tokens == 7
    assert completion.prompt_tokens == len(engine.prompt_ids(PROMPTS[0]))


def test_seeded_sampling_is_reproducible_and_seed_dependent(causal_engine):
    engine, _ = causal_engine

    def sample(seed: int) -> str:
        params = SamplingParams(max_tokens=20, temperature=1.0, seed=seed)
        return _complete(engine, PROMPTS[2], params)[0].text

    assert sample(3) == sample(3)
    assert len({sample(seed) for seed in range(4)}) > 1


def test_tiny_top_p_is_greedy(causal_engine, causal_blobs, causal_refs):
    engine, _ = causal_engine
    adapter = engine.adapter("A", _blob_fetch(causal_blobs["A"]))
    for seed in (0, 1):
        params = SamplingParams(max_tokens=20, temperature=1.0, top_p=1e-6, seed=seed)
        completion, _ = _complete(engine, PROMPTS[3], params, adapter)
        assert completion.text == causal_refs["A", PROMPTS[3]].text


def test_prompt_plus_max_tokens_beyond_positions_is_refused(causal_engine):
    engine, _ = causal_engine
    ids = engine.tokenizer("Once upon a time " * 200, add_special_tokens=False)["input_ids"][:500]
    assert len(ids) == 500 and engine.max_positions == 512
    with pytest.raises(ConfigError) as err:
        engine.complete(None, ids, SamplingParams(max_tokens=13, temperature=0))
    assert err.value.param == "max_tokens"
    completion = engine.complete(None, ids, SamplingParams(max_tokens=12, temperature=0))
    assert completion.result(timeout=RESULT_TIMEOUT).prompt_tokens == 500


# --- one bad request never fails its batch-mates ---------------------------------------------------


@pytest.mark.parametrize("temperature,top_p", [(1e-40, 1.0), (1.0, 1e-300), (1e-6, 1e-45),
                                               (1e-5, 1e-300), (5.0, 1e-300)])
def test_sampling_is_numerically_safe_for_every_admitted_setting(causal_engine, causal_blobs,
                                                                 causal_refs, temperature, top_p):
    """Temperatures and top-p values that underflow in float32 decode as greedy, never fail."""
    engine, _ = causal_engine
    adapter = engine.adapter("A", _blob_fetch(causal_blobs["A"]))
    params = SamplingParams(max_tokens=20, temperature=temperature, top_p=top_p, seed=3)
    completion, pieces = _complete(engine, PROMPTS[3], params, adapter)
    assert completion.text == causal_refs["A", PROMPTS[3]].text
    assert "".join(pieces) == completion.text


def test_a_request_failing_in_sampling_fails_alone_in_a_mixed_batch(stories_dir, causal_blobs,
                                                                    causal_refs):
    """Rows of three adapters (two tenants' and the base) share a batch with two rows whose
    streaming reader raises; only those two fail, the others get the merged models' text."""
    engine = ServingEngine.load(stories_dir, "causal_lm", name="stories-isolation",
                                options=ServingOptions(max_wait_ms=200),
                                observer=RecordingObserver())
    try:
        adapters = {None: None, **{k: engine.adapter(k, _blob_fetch(causal_blobs[k]))
                                   for k in ("A", "B")}}

        def broken_reader(piece: str) -> bool:
            raise RuntimeError("this reader is gone")

        bad = [engine.complete(adapters[k], engine.prompt_ids(PROMPTS[0]), GREEDY,
                               on_text=broken_reader) for k in ("A", "B")]
        good = {(k, p): engine.complete(adapter, engine.prompt_ids(p), GREEDY)
                for k, adapter in adapters.items() for p in PROMPTS[1:3]}
        for future in bad:
            assert isinstance(future.exception(RESULT_TIMEOUT), RuntimeError)
        for key_prompt, future in good.items():
            assert future.result(RESULT_TIMEOUT).text == causal_refs[key_prompt].text, key_prompt
        assert ("mixed", 3) in engine.observer.ran(1)
    finally:
        engine.close()


def test_a_batch_that_fails_as_a_whole_is_rerun_request_by_request(mixed_engine, cls_blobs,
                                                                   cls_merged, cls_tokenizer):
    """An adapter whose head breaks the batched forward fails alone; A's and B's requests, in the
    same mixed batch, are re-run on their own and get the merged models' probabilities."""
    engine, _ = mixed_engine
    a = engine.adapter("A", _blob_fetch(cls_blobs["A"]))
    b = engine.adapter("B", _blob_fetch(cls_blobs["B"]))
    broken = dataclasses.replace(a, key="broken-head",
                                 head={name: t[..., :5] if t.dim() > 1 else t
                                       for name, t in a.head.items()})
    engine.observer.batches.clear()
    fa = engine.classify(a, TEXTS[:2])
    fbad = engine.classify(broken, TEXTS[:1])
    fb = engine.classify(b, TEXTS[2:])
    assert isinstance(fbad.exception(RESULT_TIMEOUT), RuntimeError)
    for key, future, texts in (("A", fa, TEXTS[:2]), ("B", fb, TEXTS[2:])):
        labels = A_LABELS if key == "A" else B_LABELS
        want = reference_probs(cls_merged(key), cls_tokenizer, texts)
        assert torch.equal(probs_of(future.result(RESULT_TIMEOUT), labels), want)  # alone: swap
    assert engine.observer.ran(3)[0] == ("swap", 1)  # the mixed batch raised; its reruns ran


def test_an_unencodable_text_fails_alone_before_it_is_queued(mixed_engine, cls_blobs, cls_merged,
                                                            cls_tokenizer):
    engine, _ = mixed_engine
    a = engine.adapter("A", _blob_fetch(cls_blobs["A"]))
    b = engine.adapter("B", _blob_fetch(cls_blobs["B"]))
    fa = engine.classify(a, TEXTS[:2])
    with pytest.raises(ConfigError) as err:
        engine.classify(b, ["fine", "\ud800"])
    assert err.value.param == "input" and "\ud800" not in err.value.message
    fb = engine.classify(b, TEXTS[2:])
    for key, future, texts in (("A", fa, TEXTS[:2]), ("B", fb, TEXTS[2:])):
        labels = A_LABELS if key == "A" else B_LABELS
        want = reference_probs(cls_merged(key), cls_tokenizer, texts)
        assert torch.allclose(probs_of(future.result(RESULT_TIMEOUT), labels), want,
                              atol=1e-5, rtol=0)


@pytest.mark.parametrize("prompt,param", [("\ud800 once", "prompt"),
                                          ("Once upon a time " * 20_000, "prompt")])
def test_a_prompt_that_cannot_be_served_is_refused_naming_prompt(causal_engine, prompt, param):
    engine, _ = causal_engine
    started = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        engine.prompt_ids(prompt)
    assert err.value.param == param
    assert time.perf_counter() - started < 2  # only what shows the prompt too long is tokenised


@pytest.mark.parametrize("ids", [[], [1, 10**6], [1, -1]])
def test_prompt_ids_out_of_the_vocabulary_are_refused_before_queuing(causal_engine, ids):
    engine, _ = causal_engine
    with pytest.raises(ConfigError) as err:
        engine.complete(None, ids, GREEDY)
    assert err.value.param == "prompt"


@pytest.mark.parametrize("fields,param", [
    ({"seed": 2**64}, "seed"), ({"seed": -1}, "seed"), ({"temperature": float("nan")}, "temperature"),
    ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"stop": (3,)}, "stop"),
])
def test_invalid_sampling_params_are_refused_on_construction(fields, param):
    with pytest.raises(ConfigError) as err:
        SamplingParams(**fields)
    assert err.value.param == param


# --- long inputs -----------------------------------------------------------------------------------


def _long_texts() -> list[str]:
    words = ["the", "cast", "was", "superb", "but", "the", "plot", "dragged", "on", "and", "on"]
    prose = " ".join(words[i % len(words)] for i in range(40_000))  # ~200k characters
    return [
        prose,
        "a lovely film " + " " * 60_000 + "terrible, boring",  # whitespace the tokenizer drops
        " ".join(["x" * 150] * 600) + " fine",  # unknown words: one token each for 150 characters
        "ok",
    ]


def test_long_texts_are_cut_before_tokenising_with_unchanged_tokens(swap_engine, cls_tokenizer):
    engine, _ = swap_engine
    for text in _long_texts():
        whole = cls_tokenizer(text, truncation=True, max_length=512)
        got = engine.text.encode(text, lambda t: cls_tokenizer(t, truncation=True, max_length=512),
                                 lambda e: len(e["input_ids"]), param="input")
        assert got["input_ids"] == whole["input_ids"]
        assert got.get("token_type_ids") == whole.get("token_type_ids")


def test_long_texts_classify_as_whole_texts_do(swap_engine, cls_blobs, cls_merged, cls_tokenizer):
    engine, _ = swap_engine
    adapter = engine.adapter("A", _blob_fetch(cls_blobs["A"]))
    texts = _long_texts()
    got = engine.classify(adapter, texts).result(timeout=RESULT_TIMEOUT)
    assert torch.equal(probs_of(got, A_LABELS),
                       reference_probs(cls_merged("A"), cls_tokenizer, texts))


def test_a_huge_input_is_fast_and_never_holds_up_other_requests(mixed_engine, cls_blobs):
    """10 MB of text: the whole text tokenised took 14 s, on the batch thread; now a prefix is."""
    engine, _ = mixed_engine
    a = engine.adapter("A", _blob_fetch(cls_blobs["A"]))
    huge = "word " * 2_000_000
    with ThreadPoolExecutor(1) as pool:
        started = time.perf_counter()
        big = pool.submit(lambda: engine.classify(a, [huge]).result(RESULT_TIMEOUT))
        small = engine.classify(a, TEXTS[:1]).result(RESULT_TIMEOUT)
        small_seconds = time.perf_counter() - started
        assert big.result(RESULT_TIMEOUT)[0].label in A_LABELS
        big_seconds = time.perf_counter() - started
    assert small[0].label in A_LABELS
    assert small_seconds < 3 and big_seconds < 5, (small_seconds, big_seconds)


@pytest.mark.parametrize("text,limit,cut", [
    ("short", 10, "short"), ("one two three", 8, "one two"), ("one two three", 7, "one two"),
    ("one two three", 5, "one"), ("one  two   three", 10, "one  two"), ("abcdefgh", 4, "abcd"),
    ("  abc", 3, "  a"),
])
def test_cut_text_ends_before_a_whitespace_run(text, limit, cut):
    assert cut_text(text, limit) == cut
