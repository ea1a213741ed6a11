"""Serving: adapter swap latency, cold adapter load, and batched throughput by adapter mix.

Both served models in one run, each with synthetic adapters (`speft_core.serving.random_delta`,
random entries at `--density` of every targeted weight; a real delta in every other respect):
  - minilm-l6     classification, labels negative/positive, SST-2 dev sentences as inputs;
  - stories-260k  causal_lm, short story prompts, `--max-tokens` greedy tokens per request;
  - llama-<shape> (opt-in: tiny, 125m, 1b) the same workload on a random bf16 Llama of
                  bench/llm_scale.py's shape with stories-260k's tokenizer (speed needs no
                  trained weights; `--models llama-1b --device cuda` is the GPU's 1B row).

Measured (public engine API only: ServingEngine.load/adapter/classify/complete/close,
`engine.served.swapped`, and a ServingObserver that only counts batches):
  1. swap: per adapter, `--swap-repeats` times `with engine.served.swapped(a): pass` on an idle
     engine; apply = time to enter, restore = time to exit; medians (per adapter, then overall).
  2. cold load: every adapter is written to a temp folder; `fetch` reads its file (a file://
     object store; the file is in the OS page cache, as it was just written) and the engine
     verifies its sha256, structure and base fingerprint and lays it out. One warm-up adapter
     is loaded first (reported as "first load"); then the first load of each of the other keys.
  3. throughput: a closed workload. Each round submits all requests at once (batches fill up to
     `max_batch_size` rows within the `max_wait_ms` window) and waits for every result; request i
     of round r names adapter (r*requests + i) mod n of an n-adapter mix (round-robin).
     base-only: for causal, adapter None; for classification (a base model has no trained head)
     the same single adapter for every request, path="swap". `plain HF forward` (classification)
     runs the unmodified transformers model on the same batches (tokenise + forward), no engine.
     Mixes run with path="auto" (1 adapter -> swap, several -> mixed batch) and, for the mixes
     in `--swap-mixes`, with path="swap" (one swap + forward per adapter group). One warm-up
     round per configuration, then `--rounds` rounds with the configuration order rotated each
     round; a configuration's figure is the median over its rounds. Ratio = rows/s of the mix
     over rows/s of base-only (requests have equal rows within a model, so requests/s agree).

Swap and cold load also report their fastest repeat (`*_min`), the uncontended floor.
Every timed phase also records the cores other processes used meanwhile (/proc/stat minus our
own CPU time): the machine is shared, so read a figure taken while others were busy with care.

Usage:  .venv/bin/python bench/serve.py [--quick] [--density 0.01] [--out bench/results/serve.json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from common import REPO, start_run  # bench/common.py
from probes import MIB, LoadProbe, machine_info  # bench/probes.py

from speft_core.delta import delta_to_bytes
from speft_core.models import bundled_minilm_path, load_model, load_tokenizer
from speft_core.serving import (
    SamplingParams,
    ServingEngine,
    ServingObserver,
    ServingOptions,
    random_delta,
)

log = logging.getLogger("bench.serve")

DEFAULT_OUT = REPO / "bench" / "results" / "serve.json"
LABELS = ("negative", "positive")
SEED = 0
MODEL_CHOICES = ("minilm-l6", "stories-260k", "llama-tiny", "llama-125m", "llama-1b")
TARGET_SWAP_MS = 1.0  # apply + restore, MiniLM at 1 %
TARGET_COLD_LOAD_MS = 50.0  # median cold load
TARGET_MIXED_RATIO = 0.8  # mixed batch of 8 adapters vs base-only
PROMPTS = (
    "Once upon a time", "One day, a little girl named Lily", "The big red ball",
    "Tom and his dog went to the park", "There was a small bird", "Mom said to Ben",
    "The sun was shining and", "A little boy found a box", "In the garden there was",
    "Sue wanted to play with", "The cat saw a fish", "Tim had a new toy car",
    "Once there was a kind old man", "The happy frog jumped", "Lucy and her friend",
    "It was a rainy day and",
)


def median(values: Sequence[float]) -> float:
    """statistics.median, NaN for no values."""
    return statistics.median(values) if values else float("nan")


# --- models, data, adapters ----------------------------------------------------------------


@dataclass
class ModelSpec:
    """One served model and its workload."""

    name: str
    path: Path
    task: str
    labels: tuple[str, ...]
    max_batch_size: int
    requests: int  # per round
    rows_per_request: int
    payloads: list[Any] = field(default_factory=list)  # per request: texts or prompt ids
    params: SamplingParams | None = None  # causal: every request's sampling


class CountingObserver(ServingObserver):
    """Records every batch's path, rows and distinct adapters (diagnostics only).

    The engine reports a batch after resolving its futures, so a round waits for its rows here
    before it returns (else its last batch would be counted in the next round).
    """

    def __init__(self) -> None:
        self.batches: list[tuple[str, int, int]] = []
        self.rows = 0
        self._changed = threading.Condition()

    def batch(self, *, path: str, rows: int, adapters: int, seconds: float) -> None:
        with self._changed:
            self.batches.append((path, rows, adapters))
            self.rows += rows
            self._changed.notify_all()

    def wait_rows(self, rows: int, timeout: float = 5.0) -> None:
        """Block until at least `rows` rows have been reported in all."""
        with self._changed:
            self._changed.wait_for(lambda: self.rows >= rows, timeout)


def sst2_texts(data_dir: Path, count: int) -> list[str]:
    """The first `count` SST-2 dev sentences (repeating the file if it is shorter)."""
    path = data_dir / "sst2" / "dev.jsonl"
    if not path.exists():
        raise SystemExit(f"SST-2 not found at {path} (pass --data-dir or set SPEFT_DATA_DIR)")
    with path.open() as handle:
        texts = [json.loads(line)["text"] for line in handle if line.strip()]
    return [texts[i % len(texts)] for i in range(count)]


def write_adapters(spec: ModelSpec, count: int, density: float, folder: Path
                   ) -> list[dict[str, Any]]:
    """`count` synthetic adapters as files in `folder`: [{key, path, sha256, bytes}]."""
    model = load_model(spec.path, spec.task, labels=list(spec.labels) or None)
    adapters = []
    for i in range(count):
        key = f"{spec.name}-{'warmup' if i == 0 else f'a{i - 1:03d}'}"
        delta = random_delta(model, density=density, seed=SEED + 1000 * (i + 1),
                             labels=spec.labels, base_model=spec.name)
        data = delta_to_bytes(delta)
        path = folder / f"{key}.safetensors"
        path.write_bytes(data)
        adapters.append({"key": key, "path": path, "sha256": hashlib.sha256(data).hexdigest(),
                         "bytes": len(data)})
    del model
    return adapters


class FileFetch:
    """fetch() for one adapter file, timing the read."""

    def __init__(self, path: Path, times: list[float]) -> None:
        self.path, self.times = path, times

    def __call__(self) -> bytes:
        started = time.perf_counter()
        data = self.path.read_bytes()
        self.times.append(time.perf_counter() - started)
        return data


def load_adapters(engine: ServingEngine, files: Sequence[dict[str, Any]]) -> list[Any]:
    """Every file's adapter through the engine (cache hits where already resident)."""
    return [engine.adapter(f["key"], FileFetch(f["path"], []), sha256=f["sha256"]) for f in files]


# --- 1. swap -------------------------------------------------------------------------------


def measure_swap(engine: ServingEngine, adapters: Sequence[Any], repeats: int) -> dict[str, Any]:
    """apply (enter), restore (exit), apply+restore (a plain `with`) per adapter, in ms."""
    per_adapter = []
    probe = LoadProbe()
    sync = torch.cuda.synchronize if engine.served.device.type == "cuda" else (lambda: None)
    for adapter in adapters:
        for _ in range(3):  # warm-up
            with engine.served.swapped(adapter):
                pass
        total, apply, restore = [], [], []
        for _ in range(repeats):
            sync()
            started = time.perf_counter()
            with engine.served.swapped(adapter):
                sync()
            total.append(time.perf_counter() - started)
        for _ in range(repeats):
            manager = engine.served.swapped(adapter)
            sync()
            started = time.perf_counter()
            manager.__enter__()
            sync()
            entered = time.perf_counter()
            manager.__exit__(None, None, None)
            sync()
            apply.append(entered - started)
            restore.append(time.perf_counter() - entered)
        per_adapter.append({"key": adapter.key, "apply_restore_ms": median(total) * 1e3,
                            "apply_restore_ms_min": min(total) * 1e3,
                            "apply_ms": median(apply) * 1e3, "restore_ms": median(restore) * 1e3})
    return {
        "adapters": len(adapters), "repeats": repeats,
        "apply_restore_ms": median([a["apply_restore_ms"] for a in per_adapter]),
        "apply_ms": median([a["apply_ms"] for a in per_adapter]),
        "restore_ms": median([a["restore_ms"] for a in per_adapter]),
        "apply_restore_ms_max_adapter": max(a["apply_restore_ms"] for a in per_adapter),
        "apply_restore_ms_min": min(a["apply_restore_ms_min"] for a in per_adapter),
        "other_cores": probe.other_cores(), "per_adapter": per_adapter,
    }


# --- 2. cold load --------------------------------------------------------------------------


def measure_cold_load(engine: ServingEngine, files: Sequence[dict[str, Any]]) -> tuple[dict, list]:
    """First load of files[0] (warm-up, reported apart), then a cold load of every other key."""
    probe = LoadProbe()
    fetch_times: list[float] = []
    times, adapters = [], []
    for f in files:
        started = time.perf_counter()
        adapter = engine.adapter(f["key"], FileFetch(f["path"], fetch_times), sha256=f["sha256"])
        times.append(time.perf_counter() - started)
        adapters.append(adapter)
    cold = [t * 1e3 for t in times[1:]]
    return {
        "first_load_ms": times[0] * 1e3, "adapters": len(cold),
        "median_ms": median(cold), "min_ms": min(cold), "max_ms": max(cold),
        "fetch_median_ms": median([t * 1e3 for t in fetch_times[1:]]),
        "file_bytes": median([f["bytes"] for f in files]),
        "other_cores": probe.other_cores(), "raw_ms": cold,
    }, adapters


# --- 3. throughput -------------------------------------------------------------------------


@dataclass
class Config:
    """One throughput configuration: which engine, which adapters (None: base)."""

    name: str
    n_adapters: int  # 0: base
    path: str  # "auto", "swap", or "plain" (HF model without the engine)
    run_round: Callable[[int], dict[str, float]]
    rounds: list[dict[str, float]] = field(default_factory=list)
    warmup_s: float = 0.0  # the warm-up round (first use: lazy imports, kernel builds)
    batches: list[tuple[str, int, int]] = field(default_factory=list)


def engine_round(spec: ModelSpec, engine: ServingEngine, observer: CountingObserver,
                 mix: Sequence[Any | None]) -> Callable[[int], dict[str, Any]]:
    """A closure running one round: every request submitted at once, then all awaited."""
    def run(round_index: int) -> dict[str, Any]:
        observer.batches.clear()
        expected = observer.rows + spec.requests * spec.rows_per_request
        probe = LoadProbe()
        started = time.perf_counter()
        futures = []
        for i, payload in enumerate(spec.payloads):
            adapter = mix[(round_index * spec.requests + i) % len(mix)]
            if spec.task == "classification":
                futures.append(engine.classify(adapter, payload))
            else:
                futures.append(engine.complete(adapter, payload, spec.params))
        wait(futures)
        seconds = time.perf_counter() - started
        results = [f.result() for f in futures]  # raises a failed request's error
        observer.wait_rows(expected)
        tokens = (sum(c.completion_tokens for c in results) if spec.task != "classification"
                  else 0)
        return {"seconds": seconds, "tokens": tokens, "other_cores": probe.other_cores(),
                "batches": list(observer.batches)}

    return run


def plain_forward_round(spec: ModelSpec, device: str) -> Callable[[int], dict[str, Any]]:
    """The unmodified HF model on the same batches the engine forms (tokenise + forward)."""
    model = load_model(spec.path, spec.task, labels=list(spec.labels)).eval().to(device)
    tokenizer = load_tokenizer(spec.path)
    texts = [t for payload in spec.payloads for t in payload]
    per_batch = spec.max_batch_size // spec.rows_per_request * spec.rows_per_request
    max_len = int(getattr(model.config, "max_position_embeddings", 512))

    def run(round_index: int) -> dict[str, Any]:
        probe = LoadProbe()
        started = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, len(texts), per_batch):
                encoded = tokenizer(texts[start : start + per_batch], padding=True,
                                    truncation=True, max_length=max_len,
                                    return_tensors="pt").to(device)
                torch.softmax(model(**encoded).logits.float(), -1).tolist()
        return {"seconds": time.perf_counter() - started, "tokens": 0,
                "other_cores": probe.other_cores(), "batches": []}

    return run


def summarise_config(spec: ModelSpec, config: Config) -> dict[str, Any]:
    """Medians over the measured rounds."""
    seconds = [r["seconds"] for r in config.rounds]
    rows = spec.requests * spec.rows_per_request
    batches = config.batches
    out = {
        "adapters": config.n_adapters, "path": config.path, "rounds": len(seconds),
        "round_s": median(seconds),
        "requests_per_s": median([spec.requests / s for s in seconds]),
        "rows_per_s": median([rows / s for s in seconds]),
        "other_cores": median([r["other_cores"] for r in config.rounds]),
        "raw_round_s": seconds, "warmup_round_s": config.warmup_s,
    }
    if spec.task != "classification":
        out["tokens_per_s"] = median([r["tokens"] / r["seconds"] for r in config.rounds])
    if batches:
        out["batches_per_round"] = len(batches) / len(config.rounds)
        out["rows_per_batch"] = statistics.mean(b[1] for b in batches)
        out["adapters_per_batch"] = statistics.mean(b[2] for b in batches)
        out["engine_paths"] = sorted({b[0] for b in batches})
    return out


def measure_throughput(spec: ModelSpec, engines: dict[str, tuple[ServingEngine, CountingObserver]],
                       adapters: dict[str, list[Any]], args: argparse.Namespace
                       ) -> dict[str, Any]:
    """Every configuration: a warm-up round, then `args.rounds` rounds in rotated order."""
    configs: list[Config] = []
    auto, auto_obs = engines["auto"]
    swap, swap_obs = engines["swap"]
    if spec.task == "classification":
        configs.append(Config("base-only (1 adapter, swap)", 1, "swap",
                              engine_round(spec, swap, swap_obs, adapters["swap"][:1])))
        if not args.no_plain:
            configs.append(Config("plain HF forward", 0, "plain", plain_forward_round(spec, args.device)))
    else:
        configs.append(Config("base-only (no adapter)", 0, "auto",
                              engine_round(spec, auto, auto_obs, [None])))
    for n in args.mixes:
        configs.append(Config(f"{n} adapter{'s' if n > 1 else ''}, auto", n, "auto",
                              engine_round(spec, auto, auto_obs, adapters["auto"][:n])))
        if n in args.swap_mixes:
            configs.append(Config(f"{n} adapters, swap", n, "swap",
                                  engine_round(spec, swap, swap_obs, adapters["swap"][:n])))
    for config in configs:  # warm-up
        config.warmup_s = config.run_round(0)["seconds"]
    for round_index in range(args.rounds):
        shift = round_index % len(configs)
        for config in configs[shift:] + configs[:shift]:
            result = config.run_round(round_index + 1)
            config.rounds.append(result)
            config.batches += result.pop("batches")
            log.info("%s %s round=%d %.3fs", spec.name, config.name, round_index,
                     result["seconds"])
    results = {c.name: summarise_config(spec, c) for c in configs}
    base = results[configs[0].name]["rows_per_s"]
    for r in results.values():
        r["ratio_vs_base"] = r["rows_per_s"] / base if base else float("nan")
    return results


# --- per model -----------------------------------------------------------------------------


def bench_model(spec: ModelSpec, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Adapters, swap latency, cold load and throughput for one model."""
    needed = max(max(args.mixes), args.cold_adapters, args.swap_adapters)
    started = time.perf_counter()
    files = write_adapters(spec, needed + 1, args.density, folder)
    log.info("%s: %d adapters written in %.1fs", spec.name, len(files),
             time.perf_counter() - started)
    engines = {}
    for path in ("auto", "swap"):
        observer = CountingObserver()
        options = ServingOptions(cache_bytes=args.cache_mib * MIB,
                                 max_batch_size=spec.max_batch_size,
                                 max_wait_ms=args.max_wait_ms, path=path)
        engines[path] = (ServingEngine.load(spec.path, spec.task, name=f"{spec.name}-{path}",
                                            options=options, observer=observer,
                                            device=args.device), observer)
    try:
        auto = engines["auto"][0]
        if spec.task != "classification":
            spec.payloads = [auto.prompt_ids(PROMPTS[i % len(PROMPTS)])
                             for i in range(spec.requests)]
        cold, loaded = measure_cold_load(auto, files[: args.cold_adapters + 1])
        log.info("%s: cold load median %.1f ms (first %.1f ms)", spec.name, cold["median_ms"],
                 cold["first_load_ms"])
        adapters = {"auto": load_adapters(auto, files[1 : needed + 1])}
        swap = measure_swap(auto, adapters["auto"][: args.swap_adapters], args.swap_repeats)
        log.info("%s: swap apply+restore %.3f ms", spec.name, swap["apply_restore_ms"])
        swap_needed = max([1, *args.swap_mixes])
        adapters["swap"] = load_adapters(engines["swap"][0], files[1 : swap_needed + 1])
        throughput = measure_throughput(spec, engines, adapters, args)
    finally:
        for engine, _ in engines.values():
            engine.close()
    first = loaded[1]
    return {
        "path": str(spec.path), "task": spec.task, "labels": list(spec.labels),
        "nnz": first.nnz, "adapter_file_bytes": files[1]["bytes"],
        "adapter_resident_bytes": first.nbytes,
        "workload": {"requests_per_round": spec.requests,
                     "rows_per_request": spec.rows_per_request,
                     "max_batch_size": spec.max_batch_size,
                     **({"max_tokens": args.max_tokens} if spec.task != "classification" else {})},
        "swap": swap, "cold_load": cold, "throughput": throughput,
    }


# --- report --------------------------------------------------------------------------------


def evaluate_targets(models: dict[str, Any], density: float) -> list[dict[str, Any]]:
    """The three targets: swap ≤ 1 ms (MiniLM, 1 %), cold load ≤ 50 ms, 8-mix ≥ 0.8× base."""
    targets = []
    for name, m in models.items():
        if name == "minilm-l6":
            value = m["swap"]["apply_restore_ms"]
            targets.append({"target": f"{name} swap apply+restore (density {density})",
                            "value": value, "limit": f"<= {TARGET_SWAP_MS} ms",
                            "pass": value <= TARGET_SWAP_MS})
        value = m["cold_load"]["median_ms"]
        targets.append({"target": f"{name} cold load median", "value": value,
                        "limit": f"<= {TARGET_COLD_LOAD_MS} ms",
                        "pass": value <= TARGET_COLD_LOAD_MS})
        mixed = m["throughput"].get("8 adapters, auto")
        if mixed:
            targets.append({"target": f"{name} 8-adapter mixed batch vs base-only",
                            "value": mixed["ratio_vs_base"], "limit": f">= {TARGET_MIXED_RATIO}x",
                            "pass": mixed["ratio_vs_base"] >= TARGET_MIXED_RATIO})
    return targets


def markdown_report(report: dict[str, Any]) -> str:
    """Two tables (per-adapter costs, throughput) and the targets."""
    lines = [("| model | nnz | file KiB | resident KiB | swap apply+restore ms (min) | apply ms "
              "| restore ms | cold load ms (min) | first load ms |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in report["models"].items():
        s, c = m["swap"], m["cold_load"]
        lines.append(f"| {name} | {m['nnz']:,} | {m['adapter_file_bytes'] / 1024:.0f} "
                     f"| {m['adapter_resident_bytes'] / 1024:.0f} | {s['apply_restore_ms']:.3f} "
                     f"({s['apply_restore_ms_min']:.3f}) | {s['apply_ms']:.3f} "
                     f"| {s['restore_ms']:.3f} | {c['median_ms']:.1f} ({c['min_ms']:.1f}) "
                     f"| {c['first_load_ms']:.1f} |")
    lines += ["", ("| model | configuration | adapters/batch | requests/s | rows/s | tokens/s "
                   "| × base-only | others' load (cores) |"), "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, m in report["models"].items():
        for config, r in m["throughput"].items():
            per_batch = f"{r['adapters_per_batch']:.1f}" if "adapters_per_batch" in r else "-"
            tokens = f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "-"
            lines.append(f"| {name} | {config} | {per_batch} | {r['requests_per_s']:.1f} "
                         f"| {r['rows_per_s']:.1f} | {tokens} | {r['ratio_vs_base']:.2f} "
                         f"| {r['other_cores']:.2f} |")
    lines.append("")
    for t in report["targets"]:
        unit = "x" if t["limit"].endswith("x") else " ms"
        lines.append(f"- {t['target']}: {t['value']:.3g}{unit} (target {t['limit']}) "
                     f"{'PASS' if t['pass'] else 'MISS'}")
    return "\n".join(lines)


# --- command line --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Arguments, with --quick and the defaults resolved."""
    shared = REPO.parent / "shared"
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--density", type=float, default=0.01,
                        help="fraction of every targeted weight an adapter changes")
    parser.add_argument("--models-dir", type=Path,
                        default=Path(os.environ.get("SPEFT_MODELS_DIR", shared / "models")),
                        help="folder holding stories260k (default ../shared/models)")
    parser.add_argument("--data-dir", type=Path,
                        default=Path(os.environ.get("SPEFT_DATA_DIR", shared / "data")),
                        help="folder holding sst2/ (default ../shared/data)")
    parser.add_argument("--models", default="minilm-l6,stories-260k",
                        help=f"comma list out of {','.join(MODEL_CHOICES)} (llama-<shape>: a "
                             "random bf16 Llama of bench/llm_scale.py's shape, stories-260k's "
                             "tokenizer)")
    parser.add_argument("--rounds", type=int, help="measured throughput rounds (default 5, quick 1)")
    parser.add_argument("--swap-repeats", type=int, help="timed swaps per adapter (default 50, quick 10)")
    parser.add_argument("--swap-adapters", type=int, help="adapters timed for swap (default 8, quick 2)")
    parser.add_argument("--cold-adapters", type=int,
                        help="cold keys loaded after the warm-up one (default 16, quick 4)")
    parser.add_argument("--mixes", help="distinct adapters per workload (default 1,8,64; quick 1,8)")
    parser.add_argument("--swap-mixes", default="8",
                        help="mixes also run with path=swap (default 8)")
    parser.add_argument("--cls-requests", type=int, default=64,
                        help="classification requests per round (default 64)")
    parser.add_argument("--cls-texts", type=int, default=2, help="texts per classification request")
    parser.add_argument("--cls-batch", type=int, default=32, help="classification max_batch_size (rows)")
    parser.add_argument("--lm-requests", type=int, default=16, help="completion requests per round")
    parser.add_argument("--lm-batch", type=int, default=16, help="causal max_batch_size")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per completion (greedy)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="batching wait window")
    parser.add_argument("--cache-mib", type=int, default=1024, help="adapter cache budget")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain HF forward")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the engines run (cuda: one GPU)")
    parser.add_argument("--quick", action="store_true", help="few repeats, one round (smoke run)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON path")
    args = parser.parse_args(argv)
    quick = {"rounds": 1, "swap_repeats": 10, "swap_adapters": 2, "cold_adapters": 4,
             "mixes": "1,8"}
    full = {"rounds": 5, "swap_repeats": 50, "swap_adapters": 8, "cold_adapters": 16,
            "mixes": "1,8,64"}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.mixes = sorted({int(n) for n in args.mixes.split(",") if n.strip()})
    args.swap_mixes = sorted({int(n) for n in args.swap_mixes.split(",") if n.strip()}
                             & set(args.mixes))
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if set(args.models) - set(MODEL_CHOICES):
        parser.error(f"--models: choose out of {','.join(MODEL_CHOICES)}")
    if min([args.rounds, args.swap_repeats, args.swap_adapters, args.cold_adapters, *args.mixes]) < 1:
        parser.error("rounds, repeats, adapter counts and mixes must be at least 1")
    if not 0 < args.density <= 1:
        parser.error("--density must be in (0, 1]")
    return args


def random_llama(shape: str, tokenizer_dir: Path, folder: Path) -> Path:
    """A seeded random bf16 Llama of llm_scale's `shape` saved in `folder` with the tokenizer
    of `tokenizer_dir` (vocabulary resized to it): a decoder of real size, no trained weights."""
    from llm_scale import build_model

    model = build_model(shape, 128)
    model.resize_token_embeddings(len(load_tokenizer(tokenizer_dir)))
    model.config.use_cache = True
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, folder / name)
    del model
    return folder


def model_specs(args: argparse.Namespace, folder: Path) -> list[ModelSpec]:
    """The workloads of the chosen models (random ones are written under `folder`)."""
    specs = []
    if "minilm-l6" in args.models:
        spec = ModelSpec("minilm-l6", bundled_minilm_path(), "classification", LABELS,
                         args.cls_batch, args.cls_requests, args.cls_texts)
        texts = sst2_texts(args.data_dir, args.cls_requests * args.cls_texts)
        spec.payloads = [texts[i * args.cls_texts : (i + 1) * args.cls_texts]
                         for i in range(args.cls_requests)]
        specs.append(spec)
    if "stories-260k" in args.models:
        path = args.models_dir / "stories260k"
        if not (path / "config.json").exists():
            raise SystemExit(f"stories260k not found at {path} (pass --models-dir)")
        specs.append(ModelSpec("stories-260k", path.resolve(), "causal_lm", (), args.lm_batch,
                               args.lm_requests, 1,
                               params=SamplingParams(max_tokens=args.max_tokens, temperature=0)))
    for name in args.models:
        if name.startswith("llama-"):
            tokenizer_dir = args.models_dir / "stories260k"
            path = random_llama(name.removeprefix("llama-"), tokenizer_dir, folder / name)
            specs.append(ModelSpec(name, path, "causal_lm", (), args.lm_batch, args.lm_requests,
                                   1, params=SamplingParams(max_tokens=args.max_tokens,
                                                            temperature=0)))
    return specs


def main(argv: Sequence[str] | None = None) -> None:
    """Run every measurement for every model, write the JSON, print the tables."""
    args = parse_args(argv)
    start_run(args.threads)
    torch.manual_seed(SEED)
    started = time.perf_counter()
    models = {}
    with tempfile.TemporaryDirectory(prefix="speft-serve-bench-") as tmp:
        specs = model_specs(args, Path(tmp) / "models")
        for spec in specs:
            folder = Path(tmp) / spec.name
            folder.mkdir()
            models[spec.name] = bench_model(spec, args, folder)
    report = {"machine": machine_info(args),
              "options": {"max_wait_ms": args.max_wait_ms, "cache_mib": args.cache_mib,
                          "density": args.density, "rounds": args.rounds,
                          "swap_repeats": args.swap_repeats, "mixes": args.mixes,
                          "swap_mixes": args.swap_mixes},
              "models": models, "targets": evaluate_targets(models, args.density)}
    report["wall_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; density {args.density}; "
          f"max_wait {args.max_wait_ms} ms; {args.rounds} round(s) after a warm-up\n")
    print(markdown_report(report))
    print(f"\nwall time {report['wall_s']:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
