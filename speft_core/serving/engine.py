"""One served base model: its adapter cache, its batcher, and the two execution paths.

    engine = ServingEngine.load(path, "classification", name="minilm-l6")
    adapter = engine.adapter("adapter-1", fetch=lambda: blob, sha256=digest)
    engine.classify(adapter, ["a fine film"]).result()   # -> [Classification(label, probs)]

Adapters are loaded through the cache (verified once: sha256, structure, base fingerprint), on
the caller's thread, so a slow or broken adapter only ever delays or fails its own request.
Texts are cut to what the model can read and tokenised on the caller's thread too
(`serving/text.py`), so a huge or unencodable input costs and fails only its own request.
Batches run on the batcher's thread: one adapter in the batch → swap; several → mixed batch
(`path="swap"`/`"mixed"` forces one, for benchmarks). A request whose sampling fails ends
alone; a batch that fails as a whole is re-run request by request (`serving/batching.py`).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call

from ..delta import Delta, check_fingerprint_matches, load_delta, verify_delta
from ..errors import ConfigError, DeltaFormatError, DeltaMismatchError, TargetsError
from ..models import load_model, load_tokenizer
from ..targets import find_target_linears
from .adapter import ServingAdapter, compose_adapters, prepare_adapter
from .batching import DynamicBatcher, QueuedRequest, group_by_adapter, segments_for
from .cache import ByteBudgetCache, CacheEntryInfo
from .execution import Segment, ServedModel
from .generation import Completion, SamplingParams, generate
from .text import TextEncoder

log = logging.getLogger(__name__)

ExecutionPath = Literal["auto", "swap", "mixed"]
PATHS: tuple[str, ...] = ("auto", "swap", "mixed")


@dataclass(frozen=True)
class ServingOptions:
    """Cache budget, batching window and size, and the execution path (auto by default)."""

    cache_bytes: int = 1 << 30
    max_batch_size: int = 32
    max_wait_ms: float = 2.0
    path: ExecutionPath = "auto"


@dataclass(frozen=True)
class Classification:
    """One input's predicted label and the probability of every label."""

    label: str
    probs: dict[str, float]


class ServingObserver:
    """Hooks for metrics; the default does nothing (the API records them in Prometheus)."""

    def batch(self, *, path: str, rows: int, adapters: int, seconds: float) -> None:
        """A batch ran on `path` with `rows` rows over `adapters` distinct adapters."""

    def swap(self, seconds: float) -> None:
        """An adapter's entries were written into the weights in `seconds`."""

    def adapter_loaded(self, seconds: float) -> None:
        """An adapter was loaded from storage and prepared in `seconds`."""


class ServingEngine:
    """A base model served with per-request adapters."""

    def __init__(self, model: nn.Module, tokenizer, *, task: str, name: str,
                 options: ServingOptions | None = None,
                 observer: ServingObserver | None = None) -> None:
        self.options = options or ServingOptions()
        if self.options.path not in PATHS:
            raise ConfigError(f"path must be one of {', '.join(PATHS)}", param="path")
        self.name, self.task, self.tokenizer = name, task, tokenizer
        self.observer = observer or ServingObserver()
        self.served = ServedModel(model, task)
        with contextlib.suppress(TargetsError):  # the usual target set, fingerprinted up front
            self.served.base_fingerprint(list(find_target_linears(model)))
        self._exec_lock = threading.Lock()  # held while a batch runs or the base is fingerprinted
        self.cache: ByteBudgetCache[ServingAdapter] = ByteBudgetCache(
            self.options.cache_bytes, size_of=lambda a: a.nbytes,
            on_load=lambda _key, seconds: self.observer.adapter_loaded(seconds))
        config = getattr(model, "config", None)
        self.max_positions = int(getattr(config, "max_position_embeddings", 0) or 512)
        self.text = TextEncoder(tokenizer, self.max_positions)
        run = self._run_classification if task == "classification" else self._run_completion
        self._batcher: DynamicBatcher[QueuedRequest] = DynamicBatcher(
            lambda batch: self._run(batch, run), max_batch_size=self.options.max_batch_size,
            max_wait_s=self.options.max_wait_ms / 1000, name=name)

    @classmethod
    def load(cls, path: Path, task: str, *, name: str, options: ServingOptions | None = None,
             observer: ServingObserver | None = None, device: str = "cpu",
             dtype: str = "auto") -> ServingEngine:
        """Load a base model folder for serving (classification heads come with adapters), its
        weights in `dtype` ('auto': the checkpoint's)."""
        labels = ["base"] if task == "classification" else None  # placeholder head, never used
        model = load_model(path, task, labels=labels, dtype=dtype).to(device)
        return cls(model, load_tokenizer(path), task=task, name=name, options=options,
                   observer=observer)

    # --- adapters ---------------------------------------------------------------------------

    def adapter(self, key: str, fetch: Callable[[], bytes], *, sha256: str | None = None,
                pin: bool = False) -> ServingAdapter:
        """The resident adapter `key`, loading it with `fetch()` on a miss (verified once)."""
        return self.cache.get_or_load(key, lambda: self._prepare(key, fetch(), sha256), pin=pin)

    def compose(self, parts: Sequence[tuple[ServingAdapter, float]]) -> ServingAdapter:
        """The weighted sum of several adapters' deltas, for the requests that name it."""
        key = "+".join(f"{adapter.key}*{weight!r}" for adapter, weight in parts)
        return compose_adapters(parts, self.served.packed, key=key)

    def unload(self, key: str) -> bool:
        """Drop an adapter from memory (also when pinned); True if it was resident."""
        return self.cache.evict(key)

    def loaded(self) -> list[CacheEntryInfo]:
        """The resident adapters, most recently used first."""
        return self.cache.entries()

    def _prepare(self, key: str, data: bytes, sha256: str | None) -> ServingAdapter:
        """Verify and lay out one adapter; every refusal names the adapter (param `adapter`)."""
        try:
            return self._verified_adapter(key, data, sha256)
        except (DeltaFormatError, DeltaMismatchError) as err:
            prefix = f"adapter {key!r}: "
            message = err.message if err.message.startswith(prefix) else prefix + err.message
            raise type(err)(message, param="adapter") from err

    def _verified_adapter(self, key: str, data: bytes, sha256: str | None) -> ServingAdapter:
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise DeltaFormatError("stored bytes do not match their sha256 (corrupt or replaced)")
        delta = load_delta(data)
        verify_delta(self.served.model, Delta(modules=delta.modules, metadata=delta.metadata),
                     check_fingerprint=False)
        self._check_base_dtype(delta)
        with self._exec_lock:
            base = self.served.base_fingerprint(list(delta.modules))
        check_fingerprint_matches(delta, base)
        adapter = prepare_adapter(delta, self.served.packed, key=key, task=self.task,
                                  head_prefix=self.served.head_prefix)
        with self._exec_lock:  # the head module is shared with the batches
            self._check_head(adapter)
        return adapter

    def _check_base_dtype(self, delta: Delta) -> None:
        """Refuse a delta trained against the base in another dtype (`base_dtype`, written by
        training) before the fingerprint, which would only say "another base"; one resident base
        per dtype is not kept, so such an adapter is not served (train it with `dtype: auto`)."""
        trained = delta.metadata.get("base_dtype")
        if not trained:
            return
        served = ",".join(sorted({str(self.served.model.get_submodule(name).weight.dtype)
                                  .removeprefix("torch.") for name in delta.modules}))
        if trained != served:
            raise DeltaMismatchError(
                f"trained against the base in {trained}, but this server holds "
                f"{self.name!r} in {served}; serving loads the model in its registered dtype "
                f"(train with hyperparameters.dtype 'auto' to serve it here)")

    def _check_head(self, adapter: ServingAdapter) -> None:
        """A classification head must take this model's hidden size and give one logit a label."""
        if self.served.head_prefix is None:
            return
        head = getattr(self.served.model, self.served.head_prefix).inner
        hidden = int(self.served.model.config.hidden_size)
        # the hidden states' dtype (the base weights'), never torch's default: a model load on
        # another thread changes that process-wide while it runs (transformers' local_torch_dtype)
        probe = torch.zeros(1, hidden, dtype=self.served.packed.flat.dtype,
                            device=self.served.device)
        try:
            width = functional_call(head, dict(adapter.head), (probe,)).shape[-1]
        except RuntimeError as err:
            raise DeltaMismatchError(f"its head does not fit this model ({err})") from err
        if width != len(adapter.labels):
            raise DeltaMismatchError(f"its head gives {width} logits for "
                                     f"{len(adapter.labels)} labels")

    # --- requests ---------------------------------------------------------------------------

    def classify(self, adapter: ServingAdapter, texts: Sequence[str]) -> Future:
        """Queue texts for classification; the future gives one Classification per text.

        The texts are tokenised here, on the caller's thread (cut to what the model reads):
        one that cannot be encoded is a ConfigError naming `input`, before anything is queued.
        """
        if adapter is None or adapter.task != "classification" or not adapter.labels:
            raise ConfigError("classification needs a classification adapter: the base model has "
                              "no trained classification head", param="adapter")
        if isinstance(texts, str) or not texts:
            raise ConfigError("classify a non-empty list of texts", param="input")
        encoded = [self.text.encode(
            text, lambda t: self.tokenizer(t, truncation=True, max_length=self.max_positions),
            lambda e: len(e["input_ids"]), param="input") for text in texts]
        return self._batcher.submit(QueuedRequest(adapter, len(encoded), encoded))

    def prompt_ids(self, prompt: str) -> list[int]:
        """A prompt as the model reads it: bos, then its tokens (as in training).

        ConfigError naming `prompt` when the tokenizer cannot encode it, or when it leaves no
        position to generate in (only as much of a long prompt is tokenised as shows that).
        """
        head = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        ids = head + self.text.encode(
            prompt, lambda t: self.tokenizer(t, add_special_tokens=False)["input_ids"],
            lambda ids: len(head) + len(ids), param="prompt")
        if len(ids) >= self.max_positions:
            raise ConfigError(f"the prompt has at least {len(ids)} tokens: no room to generate "
                              f"within the model's {self.max_positions} positions",
                              param="prompt")
        return ids

    def complete(self, adapter: ServingAdapter | None, prompt_ids: list[int],
                 params: SamplingParams,
                 on_text: Callable[[str], bool | None] | None = None) -> Future:
        """Queue a completion; the future gives a Completion, `on_text` gets text as it grows
        (returning False stops this request early: finish reason `cancelled`)."""
        vocab = self.served.model.get_input_embeddings().num_embeddings
        if not prompt_ids or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab
                for i in prompt_ids):
            raise ConfigError(f"prompt ids must be a non-empty list of token ids in [0, {vocab})",
                              param="prompt")
        if len(prompt_ids) + params.max_tokens > self.max_positions:
            raise ConfigError(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens "
                              f"({params.max_tokens}) exceed the model's {self.max_positions} "
                              "positions", param="max_tokens")
        request = QueuedRequest(adapter, 1, None)
        stream = None if on_text is None else partial(_stream, request, on_text)
        request.payload = (list(prompt_ids), params, stream)
        return self._batcher.submit(request)

    def close(self) -> None:
        """Finish queued requests and stop the batching thread."""
        self._batcher.close()

    # --- batches (batcher thread) -----------------------------------------------------------

    def _run(self, batch: list[QueuedRequest],
             run: Callable[[list[QueuedRequest], Sequence[Segment], bool], None]) -> None:
        groups = group_by_adapter(batch)
        path = self.options.path
        if path == "auto":
            path = "swap" if len(groups) == 1 else "mixed"
        started = time.perf_counter()
        with self._exec_lock, torch.inference_mode():
            if path == "mixed":
                run([r for g in groups for r in g], segments_for(groups), True)
            else:
                for group in groups:
                    with contextlib.ExitStack() as stack:
                        swap_started = time.perf_counter()
                        stack.enter_context(self.served.swapped(group[0].adapter))
                        if group[0].adapter is not None:
                            self.observer.swap(time.perf_counter() - swap_started)
                        run(group, segments_for([group]), False)
        self.observer.batch(path=path, rows=sum(r.rows for r in batch), adapters=len(groups),
                            seconds=time.perf_counter() - started)

    def _run_classification(self, requests: list[QueuedRequest], segments: Sequence[Segment],
                            mixed: bool) -> None:
        rows = [encoding for r in requests for encoding in r.payload]
        encoded = self.tokenizer.pad(rows, padding=True, return_tensors="pt")
        encoded = {k: v.to(self.served.device) for k, v in encoded.items()}
        with self.served.segments(segments, mixed=mixed):
            logits = self.served.model(**encoded).logits.float()
        row = 0
        for request in requests:
            labels = request.adapter.labels
            probs = torch.softmax(logits[row : row + request.rows, : len(labels)], -1).tolist()
            row += request.rows
            request.future.set_result([
                Classification(labels[max(range(len(p)), key=p.__getitem__)],
                               dict(zip(labels, p, strict=True)))
                for p in probs])

    def _run_completion(self, requests: list[QueuedRequest], segments: Sequence[Segment],
                        mixed: bool) -> None:
        prompts, params, callbacks = zip(*(r.payload for r in requests), strict=True)
        with self.served.segments(segments, mixed=mixed):
            outcomes = generate(self.served.model, self.tokenizer, prompts, params, callbacks)
        for request, outcome in zip(requests, outcomes, strict=True):
            if isinstance(outcome, Completion):
                request.future.set_result(outcome)
            else:  # this row's sampling or streaming failed; its batch-mates are unaffected
                log.warning("speft serving: a completion failed alone: %r", outcome)
                request.future.set_exception(outcome)


def _stream(request: QueuedRequest, on_text: Callable[[str], bool | None],
            piece: str) -> bool | None:
    """Hand a request's new text to its reader; once any is out, a failed batch must not
    re-run the request (its reader would get the text twice)."""
    request.streamed = True
    return on_text(piece)
