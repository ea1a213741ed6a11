"""The kernels on the device: Triton against the torch references, checked and timed side by side.

Per module shape of MiniLM-L6 and of bench/llm_scale.py's 1B Llama, at 1% density:
  1. the values' gradient: Triton's sampled product against cuSPARSE's sampled_addmm (fp32, the
     reference) on fresh random inputs in the model's dtype; max relative error, then the median
     time of each and of the dense dW = gᵀx that full fine-tuning computes;
  2. the mixed batch: Triton's segmented sparse add against x·dense(Δ)ᵀ per segment for 8 and
     64 adapters (2 rows each; 1 token a row as when decoding, and 64); the median time of each and of the module's own base product, so the delta's
     cost reads as a share of the layer's;
  3. a real model end to end: a served stories-260k (and a random Llama of the chosen shape)
     with 8 adapters in one mixed batch, logits checked row by row against each adapter swapped
     into the weights (the merged reference), base weights bit-identical afterwards.

    python bench/gpu_check.py --device cuda --out bench/results/gpu_check.json
    TRITON_INTERPRET=1 SPEFT_TRITON=1 python bench/gpu_check.py --device cpu --quick  # smoke

`bench/gpu_run.sh` runs this and then the GPU rows of train_step, llm_scale and serve, in one go.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from common import REPO, start_run
from probes import machine_info

from speft_core import kernels
from speft_core.kernels import RowEntries, SegmentPlan, SparsePattern

# (name, n_out, n_in, tokens of a training step, dtype)
SHAPES = [
    ("minilm.attention", 384, 384, 32 * 64, torch.float32),
    ("minilm.ffn_up", 1536, 384, 32 * 64, torch.float32),
    ("llama-1b.attention", 2048, 2048, 512, torch.bfloat16),
    ("llama-1b.mlp_up", 5632, 2048, 512, torch.bfloat16),
]
QUICK_SHAPES = [("tiny.attention", 40, 24, 70, torch.float32),
                ("tiny.mlp_up", 56, 24, 33, torch.bfloat16)]
DENSITY = 0.01


def timed(fn: Callable[[], Any], device: str, repeats: int) -> float:
    """Median milliseconds of `fn` over `repeats` runs after two warm-ups."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    samples = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - started) * 1e3)
    return statistics.median(samples)


def random_entries(n_out: int, n_in: int, k: int, device: str, seed: int) -> RowEntries:
    """k random entries of an (n_out, n_in) weight, sorted, with random values."""
    generator = torch.Generator().manual_seed(seed)
    flat = torch.randperm(n_out * n_in, generator=generator)[:k].sort().values.to(device)
    values = torch.randn(k, generator=generator).to(device)
    return RowEntries.from_rows(flat // n_in, flat % n_in, values)


def check_sampled_grad(shape: tuple, device: str, repeats: int) -> dict[str, Any]:
    """Triton vs sampled_addmm at one module shape: error and median times."""
    name, n_out, n_in, tokens, dtype = shape
    k = max(1, int(n_out * n_in * DENSITY))
    entries = random_entries(n_out, n_in, k, device, seed=1)
    pattern = SparsePattern.from_indices(entries.rows * n_in + entries.cols, (n_out, n_in))
    grad_out = torch.randn(tokens, n_out, device=device).to(dtype)
    x = torch.randn(tokens, n_in, device=device).to(dtype)
    gpu = kernels.triton_for(torch.device(device))
    if gpu is None:
        raise SystemExit("Triton kernels not chosen for this device (set SPEFT_TRITON=1 and "
                         "TRITON_INTERPRET=1 for a CPU smoke run)")
    ours = gpu.sampled_grad(grad_out, x, pattern.rows, pattern.cols)
    reference = kernels._sampled_addmm(grad_out.float(), x.float(), pattern)
    error = float((ours - reference).abs().max() / reference.abs().max().clamp_min(1e-12))
    return {
        "shape": name, "n_out": n_out, "n_in": n_in, "tokens": tokens, "k": k,
        "dtype": str(dtype).removeprefix("torch."), "max_rel_error": error, "ok": error < 1e-4,
        "triton_ms": timed(lambda: gpu.sampled_grad(grad_out, x, pattern.rows, pattern.cols),
                           device, repeats),
        "sampled_addmm_ms": timed(lambda: kernels._sampled_addmm(grad_out, x, pattern)
                                  if dtype == torch.float32 else
                                  kernels._sampled_addmm(grad_out.float(), x.float(), pattern),
                                  device, repeats),
        "dense_dw_ms": timed(lambda: grad_out.t() @ x, device, repeats),
    }


def check_segment_add(shape: tuple, adapters: int, tokens: int, device: str,
                      repeats: int) -> dict[str, Any]:
    """Triton vs the merged reference for `adapters` adapters, 2 rows each."""
    name, n_out, n_in, _, dtype = shape
    k = max(1, int(n_out * n_in * DENSITY))
    segments = [(2 * i, 2 * i + 2, random_entries(n_out, n_in, k, device, seed=10 + i))
                for i in range(adapters)]
    plan = SegmentPlan.build(segments)
    if plan.triton is None:
        raise SystemExit("the mixed-batch plan did not choose Triton on this device")
    rows = 2 * adapters
    x = torch.randn(rows, tokens, n_in, device=device).to(dtype)
    weight = torch.randn(n_out, n_in, device=device).to(dtype) / n_in**0.5
    base = torch.nn.functional.linear(x, weight)
    ours, reference = base.clone(), base.float().clone()
    kernels.segment_sparse_add(x, ours, plan)
    for start, stop, entries in segments:  # the merged reference: x · dense(Δ)ᵀ per segment
        delta = torch.zeros(n_out, n_in, device=device)
        delta[entries.rows, entries.cols] = entries.values
        reference[start:stop] += x[start:stop].float() @ delta.t()
    scale = (reference - base.float()).abs().max().clamp_min(1e-12)
    error = float((ours.float() - reference).abs().max() / scale)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    scratch = base.clone()
    return {
        "shape": name, "adapters": adapters, "rows": rows, "tokens_per_row": tokens, "k": k,
        "dtype": str(dtype).removeprefix("torch."), "max_rel_error": error,
        "ok": error < tolerance,
        "triton_ms": timed(lambda: kernels.segment_sparse_add(x, scratch, plan), device, repeats),
        "plan_ms": timed(lambda: SegmentPlan.build(segments), device, repeats),
        "base_linear_ms": timed(lambda: torch.nn.functional.linear(x, weight), device, repeats),
    }


def check_served(model_path: Path, device: str, adapters: int) -> dict[str, Any]:
    """A real served decoder: a mixed batch's logits against each adapter swapped in."""
    from speft_core.models import load_model, load_tokenizer
    from speft_core.serving import prepare_adapter, random_delta
    from speft_core.serving.execution import Segment, ServedModel

    model = load_model(model_path, "causal_lm").to(device)
    tokenizer = load_tokenizer(model_path)
    served = ServedModel(model, "causal_lm")
    before = served.packed.flat.clone()
    served_adapters = [prepare_adapter(random_delta(model, density=DENSITY, seed=100 + i),
                                       served.packed, key=f"a{i}", task="causal_lm",
                                       head_prefix=None) for i in range(adapters)]
    ids = torch.tensor([tokenizer("Once upon a time there was")["input_ids"]] * 2 * adapters,
                       device=device)
    segments = [Segment(2 * i, 2 * i + 2, a) for i, a in enumerate(served_adapters)]
    with torch.inference_mode():
        with served.segments(segments, mixed=True):
            mixed = served.model(input_ids=ids).logits.float()
        worst = 0.0
        for segment in segments:
            rows = ids[segment.start : segment.stop]
            with served.swapped(segment.adapter), served.segments(
                    [Segment(0, len(rows), segment.adapter)], mixed=False):
                merged = served.model(input_ids=rows).logits.float()
            part = mixed[segment.start : segment.stop]
            worst = max(worst, float((part - merged).abs().max() / merged.abs().max()))
    intact = bool(torch.equal(before, served.packed.flat))
    tolerance = 1e-4 if model.dtype == torch.float32 else 2e-2
    return {"model": model_path.name, "dtype": str(model.dtype).removeprefix("torch."),
            "adapters": adapters, "max_rel_error_vs_merged": worst,
            "base_bit_identical": intact, "ok": intact and worst < tolerance}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every check; `ok` is true only where all of them are."""
    shapes = QUICK_SHAPES if args.quick else SHAPES
    repeats = 1 if args.quick else 50
    report: dict[str, Any] = {"machine": machine_info(args), "density": DENSITY}
    report["sampled_grad"] = [check_sampled_grad(s, args.device, repeats) for s in shapes]
    report["segment_add"] = [
        check_segment_add(s, adapters, tokens, args.device, repeats)
        for s in shapes for adapters in ((3,) if args.quick else (8, 64))
        for tokens in (1, 64 if not args.quick else 5)]
    report["served"] = [check_served(path, args.device, 2 if args.quick else 8)
                        for path in args.models]
    report["ok"] = all(row["ok"] for part in ("sampled_grad", "segment_add", "served")
                       for row in report[part])
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat (smoke)")
    parser.add_argument("--models", type=Path, nargs="*", help="decoder folders to serve "
                        "(default: ../shared/models/stories260k)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu_check.json")
    args = parser.parse_args(argv)
    if args.models is None:
        shared = Path(os.environ.get("SPEFT_MODELS_DIR", REPO.parent / "shared" / "models"))
        args.models = [shared / "stories260k"]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run, write the JSON, print one line per check; exit 1 when any check fails."""
    args = parse_args(argv)
    start_run(args.threads)
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    for part in ("sampled_grad", "segment_add", "served"):
        for row in report[part]:
            print(part, json.dumps(row))
    print("all checks passed" if report["ok"] else "SOME CHECKS FAILED")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
