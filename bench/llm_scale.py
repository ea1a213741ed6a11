"""SPEFT vs LoRA vs full fine-tuning on random-initialised Llama-architecture models in bf16.

Shapes (no weights are downloaded; `LlamaForCausalLM(config)` with seed 0, built in bf16):
  125m   hidden 768, 12 layers, 12 heads, intermediate 2048, vocab 32000 (~134M parameters)
  1b     hidden 2048, 16 layers, 16 heads, intermediate 5632, vocab 32000 (953,223,168 parameters)
  tiny   hidden 64, 2 layers, 4 heads, intermediate 128, vocab 1000 (--quick)

Methods, each with gradient checkpointing off and on (speft_core.train.gradient_checkpointing):
  speft      1% of the targeted weights (gradient salience, global top-k), patched bf16 base,
             fp32 values and AdamW moments (speft_core.sparse_linear.inject_sparse_deltas)
  lora_r16   HF peft LoRA r=16, alpha 32, dropout 0, on the same target Linears
  full       every parameter, bf16 AdamW; skipped (with the reason recorded) when its estimate
             (16 bytes a parameter: weight, grad, two moments, and as much again for the
             optimizer's temporaries and activations) exceeds --full-max-gib

One step = forward + backward + AdamW step + zero_grad on one batch (1 x 512 random tokens,
labels = inputs). Each (shape, method, checkpointing) runs in its own subprocess: --warmup steps,
then the median of --steps timed steps (bench/train_step.py's step functions). Peak memory is
bench/probes.py's MemoryProbe (VmHWM reset just before the first step); contention is
LoadProbe's other_cores during the timed steps.

Scoring (the mask for speft) runs in its own subprocess too, on one micro-batch (scoring
batch size 1), and reports its peak over the loaded model next to item 6's bound: one
accumulator per targeted weight in the base dtype plus one batch's activations, where "one
batch's activations" is measured in the same process as the peak of a forward + backward of
the same batch that takes no weight gradient at all (gradients only down to the embeddings).

Trainable-state bytes: the trained parameters, their gradients and the optimizer state after a
step, plus SPEFT's per-layer index and original-entry buffers. File size: the safetensors delta
(speft_core.delta.delta_to_bytes), the peft adapter directory (save_pretrained), and for full the
bf16 state dict's bytes (computed, not written).

Usage:  python bench/llm_scale.py [--quick] [--shapes 125m,1b] [--checkpointing off,on]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from common import REPO, start_run  # bench/common.py
from probes import MIB, LoadProbe, MemoryProbe, machine_info  # bench/probes.py
from torch import nn
from train_step import QUIET_CORES, forward_backward, optimizer_update, rotated, timed_step

log = logging.getLogger("bench.llm_scale")

SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 128, "vocab_size": 1000},
    "125m": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 2048, "vocab_size": 32000},
    "1b": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 16,
           "intermediate_size": 5632, "vocab_size": 32000},
}
METHODS: tuple[str, ...] = ("speft", "lora_r16", "full")
LORA_RANK = 16
SEED = 0
LEARNING_RATE = 1e-5
FULL_BYTES_PER_PARAM = 16
DEFAULT_OUT = REPO / "bench" / "results" / "llm_scale.json"
# (name, speft measure, peer, its measure, largest allowed ratio)
TARGETS: tuple[tuple[str, str, str, float], ...] = (
    ("training peak memory vs lora_r16", "peak_mem_mib", "lora_r16", 0.9),
    ("step time vs lora_r16", "step_ms", "lora_r16", 1.0),
)


# --- model, batch, masks -------------------------------------------------------------------


def build_model(shape: str, seq_len: int, device: str = "cpu") -> nn.Module:
    """A seeded random Llama of `shape`, built directly in bf16 (no fp32 copy ever exists) on
    `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(seq_len, 128),
                         use_cache=False)
    torch.manual_seed(SEED)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def make_batch(vocab: int, seq_len: int, seed: int,
               device: str = "cpu") -> dict[str, torch.Tensor]:
    """One example of random token ids; labels are the inputs (every token supervised)."""
    ids = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def lm_example_losses(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-example causal-LM loss, as the service scores it."""
    from speft_core.tasks import example_losses

    return example_losses(model, batch, "causal_lm")


def activation_floor_mib(model: nn.Module, batch: Mapping[str, torch.Tensor],
                         device: str = "cpu") -> float:
    """Peak of one forward + backward that takes no weight gradient (grads to the embeddings)."""
    model.requires_grad_(False)
    hook = model.get_input_embeddings().register_forward_hook(
        lambda _m, _i, output: output.requires_grad_(True))
    probe = MemoryProbe(device)
    probe.start()
    lm_example_losses(model, batch).sum().backward()
    peak = probe.result()["peak_mem_mib"]
    hook.remove()
    return peak


def compute_masks(args: argparse.Namespace) -> dict[str, Any]:
    """Gradient-salience global top-k masks on one batch, with scoring's peak and its bound."""
    from speft_core.masks import select_mask
    from speft_core.salience import SalienceInputs, compute_salience
    from speft_core.targets import find_target_linears

    model = build_model(args.shape, args.seq_len, args.device)
    model.eval()
    batch = make_batch(model.config.vocab_size, args.seq_len, SEED + 1, args.device)
    activations = activation_floor_mib(model, batch, args.device)
    targets = find_target_linears(model)
    accumulator_mib = sum(t.weight.numel() * t.weight.element_size()
                          for t in targets.values()) / MIB
    probe = MemoryProbe(args.device)
    probe.start()
    start = time.perf_counter()
    scores = compute_salience("gradient", SalienceInputs(model, targets, [batch],
                                                         lm_example_losses))
    seconds = time.perf_counter() - start
    memory = probe.result()  # before top-k: the bound is on scoring, not on selection
    masks = {name: idx.cpu() for name, idx in select_mask(scores, args.density, "global").items()}
    bound = accumulator_mib + activations
    return {
        "masks": masks,
        "k": sum(int(m.numel()) for m in masks.values()),
        "targeted_weights": sum(t.weight.numel() for t in targets.values()),
        "target_modules": len(targets),
        "parameters": sum(p.numel() for p in model.parameters()),
        "scoring_s": seconds,
        "scoring_peak_mib": memory["peak_mem_mib"],
        "scoring_peak_reliable": memory["peak_mem_reliable"],
        "scoring_accumulators_mib": accumulator_mib,
        "scoring_activations_mib": activations,
        "scoring_bound_mib": bound,
        "scoring_within_bound": memory["peak_mem_mib"] <= bound,
    }


# --- method setups -------------------------------------------------------------------------


def setup(method: str, model: nn.Module, mask_info: Mapping[str, Any]) -> nn.Module:
    """The model with `method` applied: only the method's parameters require grad."""
    if method == "full":
        return model.requires_grad_(True)
    model.requires_grad_(False)
    if method == "speft":
        from speft_core.kernels import load_cpu_extension
        from speft_core.sparse_linear import inject_sparse_deltas

        inject_sparse_deltas(model, mask_info["masks"])
        load_cpu_extension()  # build/load before the memory baseline
        return model
    from peft import LoraConfig, get_peft_model

    from speft_core.targets import find_target_linears

    config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0,
                        target_modules=list(find_target_linears(model)))
    return get_peft_model(model, config)


def _bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def trainable_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Trained parameters + their grads + optimizer state (+ SPEFT's indices and originals)."""
    from speft_core.sparse_linear import sparse_delta_layers

    params = [p for p in model.parameters() if p.requires_grad]
    state = [v for s in optimizer.state.values() for v in s.values()
             if isinstance(v, torch.Tensor)]
    buffers = [b for layer in sparse_delta_layers(model).values()
               for b in (layer.indices, layer.original)]
    return 2 * _bytes(params) + _bytes(state) + _bytes(buffers)


def file_bytes(method: str, model: nn.Module) -> int:
    """Size of what the method saves: the delta file, the adapter directory, or the weights."""
    if method == "full":
        return _bytes([p.detach() for p in model.parameters()])
    if method == "speft":
        from speft_core.delta import Delta, delta_to_bytes
        from speft_core.sparse_linear import sparse_delta_layers

        layers = sparse_delta_layers(model)
        delta = Delta(modules={n: (lay.indices.cpu(), lay.values.detach().cpu())
                               for n, lay in layers.items()}, extras={},
                      metadata={"base_model": "random-llama",  # the fingerprint: size only
                                "base_fingerprint": "0" * 64,
                                "metric": "gradient", "density": "0.01", "task": "causal_lm",
                                "labels": "[]"})
        return len(delta_to_bytes(delta))
    with tempfile.TemporaryDirectory(prefix="speft-lora-") as folder:
        model.save_pretrained(folder)
        return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """One (shape, method, checkpointing) run in this process."""
    from speft_core.train import gradient_checkpointing

    mask_info = torch.load(args.masks, weights_only=True) if args.masks else {}
    if mask_info:
        mask_info["masks"] = {n: m.to(args.device) for n, m in mask_info["masks"].items()}
    base = build_model(args.shape, args.seq_len, args.device)
    model = setup(args.method, base, mask_info)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE)
    batch = make_batch(base.config.vocab_size, args.seq_len, SEED, args.device)
    with gradient_checkpointing(base, args.checkpointing == "on"):
        probe = MemoryProbe(args.device)
        probe.start()
        for _ in range(args.warmup):
            forward_backward(model, batch, args.device)
            optimizer_update(optimizer)
        samples = []
        for _ in range(args.steps):
            load = LoadProbe()
            samples.append({"step_ms": timed_step(model, batch, optimizer, args.device),
                            **load.result()})
        memory = probe.result()
    step_ms = statistics.median(s["step_ms"] for s in samples)
    quiet = [s["step_ms"] for s in samples if s["other_cores"] < QUIET_CORES]
    return {
        "shape": args.shape, "method": args.method, "checkpointing": args.checkpointing,
        "device": args.device,
        "step_ms": step_ms, "step_ms_all": [s["step_ms"] for s in samples],
        "tokens_per_s": args.seq_len / (step_ms / 1e3),
        "other_cores": statistics.median(s["other_cores"] for s in samples),
        "other_cores_all": [s["other_cores"] for s in samples],
        "step_ms_quiet": statistics.median(quiet) if quiet else None, "quiet_steps": len(quiet),
        "trainable_params": sum(p.numel() for p in trainable),
        "trainable_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in trainable}),
        "trainable_state_bytes": trainable_state_bytes(model, optimizer),
        "file_bytes": file_bytes(args.method, model),
        **memory, "threads": torch.get_num_threads(),
    }


# --- the driver ----------------------------------------------------------------------------


def run_child(args: argparse.Namespace, extra: Sequence[str]) -> dict[str, Any]:
    """Re-invoke this script with `extra` and return the JSON object it prints last."""
    command = [sys.executable, str(Path(__file__).resolve()), "--json",
               "--seq-len", str(args.seq_len), "--density", str(args.density),
               "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--device", args.device, *extra]
    if args.threads:
        command += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}  # this checkout's speft_core
    proc = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child {' '.join(extra)} failed (exit {proc.returncode}; -9 is "
                           f"the OOM killer):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def full_estimate_gib(parameters: int) -> float:
    """What full fine-tuning is budgeted at: FULL_BYTES_PER_PARAM bytes a parameter."""
    return parameters * FULL_BYTES_PER_PARAM / 2**30


def evaluate_targets(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """speft / lora ratios per (shape, checkpointing) for each target."""
    out = []
    by_key = {(r["shape"], r["checkpointing"], r["method"]): r for r in rows}
    for (shape, ckpt, method), mine in by_key.items():
        if method != "speft":
            continue
        for name, measure_key, peer, limit in TARGETS:
            theirs = by_key.get((shape, ckpt, peer))
            if theirs is None:
                continue
            ratio = mine[measure_key] / theirs[measure_key]
            out.append({"shape": shape, "checkpointing": ckpt, "target": name,
                        "ratio": ratio, "limit": limit, "pass": ratio <= limit})
    return out


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Per shape: masks (and scoring's peak) once, then every method x checkpointing setting."""
    rows: list[dict[str, Any]] = []
    scoring: dict[str, Any] = {}
    skipped: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="speft-llm-") as tmp:
        for shape in args.shapes:
            masks_path = os.path.join(tmp, f"masks-{shape}.pt")
            stats = run_child(args, ["--shape", shape, "--compute-masks", masks_path])
            scoring[shape] = stats
            log.info("%s: %d parameters, k=%d, scoring peak %.0f MiB (bound %.0f)", shape,
                     stats["parameters"], stats["k"], stats["scoring_peak_mib"],
                     stats["scoring_bound_mib"])
            for index, ckpt in enumerate(args.checkpointing):
                for method in rotated(list(args.methods), index):
                    estimate = full_estimate_gib(stats["parameters"])
                    if method == "full" and estimate > args.full_max_gib:
                        skipped.append({"shape": shape, "checkpointing": ckpt, "method": method,
                                        "reason": f"estimated {estimate:.1f} GiB > "
                                                  f"--full-max-gib {args.full_max_gib}"})
                        continue
                    row = run_child(args, ["--shape", shape, "--method", method,
                                           "--checkpointing", ckpt, "--masks", masks_path])
                    log.info("%s %s ckpt=%s: %.0f ms, peak %.0f MiB, others %.2f cores", shape,
                             method, ckpt, row["step_ms"], row["peak_mem_mib"],
                             row["other_cores"])
                    rows.append(row)
    return {"machine": machine_info(args), "scoring": scoring, "results": rows,
            "skipped": skipped, "targets": evaluate_targets(rows)}


def _quiet(row: Mapping[str, Any]) -> str:
    quiet = row.get("step_ms_quiet")
    return "-" if quiet is None else f"{quiet:.0f} ({row['quiet_steps']})"


def markdown_report(report: Mapping[str, Any]) -> str:
    """The results table, scoring against its bound, and the target verdicts."""
    lines = [("| shape | method | ckpt | trainable params | step (ms) | tokens/s "
              "| train peak (MiB) | trainable state (MiB) | file (MiB) | others' load (cores) "
              "| quiet steps: ms (n) |"),
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        lines.append(f"| {r['shape']} | {r['method']} | {r['checkpointing']} "
                     f"| {r['trainable_params']:,} | {r['step_ms']:.0f} | {r['tokens_per_s']:.0f} "
                     f"| {r['peak_mem_mib']:.0f} | {r['trainable_state_bytes'] / MIB:.1f} "
                     f"| {r['file_bytes'] / MIB:.1f} | {r['other_cores']:.2f} "
                     f"| {_quiet(r)} |")
    for s in report["skipped"]:
        lines.append(f"| {s['shape']} | {s['method']} | {s['checkpointing']} | skipped: "
                     f"{s['reason']} |||||||")
    lines += ["", ("| shape | parameters | k | scoring (s) | scoring peak (MiB) "
                   "| bound: accumulators + activations (MiB) | within |"),
              "|---|---:|---:|---:|---:|---:|---|"]
    for shape, s in report["scoring"].items():
        lines.append(f"| {shape} | {s['parameters']:,} | {s['k']:,} | {s['scoring_s']:.1f} "
                     f"| {s['scoring_peak_mib']:.0f} | {s['scoring_bound_mib']:.0f} "
                     f"({s['scoring_accumulators_mib']:.0f} + {s['scoring_activations_mib']:.0f}) "
                     f"| {'yes' if s['scoring_within_bound'] else 'NO'} |")
    if report["targets"]:
        lines += ["", "speft vs lora_r16:"]
    for t in report["targets"]:
        lines.append(f"- {t['shape']} ckpt={t['checkpointing']} {t['target']}: {t['ratio']:.2f}x "
                     f"(target <= {t['limit']}x) {'PASS' if t['pass'] else 'MISS'}")
    return "\n".join(lines)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Arguments, with --quick resolved."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--shapes", default="125m,1b", help=f"comma list of {','.join(SHAPES)}")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--checkpointing", default="off,on", help="comma list of off,on")
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--full-max-gib", type=float, default=8.0,
                        help="skip full fine-tuning when its estimate exceeds this")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: bf16 autocast steps, peaks from max_memory_allocated")
    parser.add_argument("--quick", action="store_true", help="tiny Llama, 2 steps (seconds)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--shape", choices=tuple(SHAPES), help="child: this shape")
    parser.add_argument("--method", choices=METHODS, help="child: run this method in-process")
    parser.add_argument("--masks", help="child: masks file from --compute-masks")
    parser.add_argument("--compute-masks", metavar="PATH", help="child: write masks and exit")
    parser.add_argument("--json", action="store_true", help="child: print one JSON object")
    args = parser.parse_args(argv)
    defaults = ({"seq_len": 32, "steps": 2, "warmup": 1} if args.quick
                else {"seq_len": 512, "steps": 3, "warmup": 1})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.shapes = ["tiny"] if args.quick else _csv(args.shapes)
    args.methods = _csv(args.methods)
    args.checkpointing = _csv(args.checkpointing)
    for name, values, allowed in (("--shapes", args.shapes, tuple(SHAPES)),
                                  ("--methods", args.methods, METHODS),
                                  ("--checkpointing", args.checkpointing, ("off", "on"))):
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            parser.error(f"{name}: unknown {unknown}; choose from {', '.join(allowed)}")
    if args.method or args.compute_masks:  # a child: one setting
        args.checkpointing = args.checkpointing[0]
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
    if args.method:
        print(json.dumps(measure(args)))
        return
    start = time.perf_counter()
    report = run_benchmark(args)
    report["wall_s"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(markdown_report(report))
    print(f"\nwall time {report['wall_s']:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
