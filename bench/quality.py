"""Quality: SPEFT against full fine-tuning and LoRA on real labelled data, same loop and budget.

Every method trains the same model on the same (optionally subsampled) training set, with the
same epochs, batch size, maximum length, seeds and training loop (`speft_core.train`: AdamW,
linear warm-up and decay, clipping; SPEFT through `train_sparse`, the baselines through
`train_parameters`), and every method trains the new classification head densely:
  full               every parameter
  lora-r8            HF peft LoRA r=8, alpha 16, on SPEFT's target modules (the paper's baseline)
  lora-budget        LoRA at the rank whose parameter count is closest to SPEFT's at 1%
  speft-<metric>     SPEFT at 1% density, static mask, global top-k, for each of 9 metrics
  speft-gradient-dynamic / -per-layer / -d0.1 / -d0.5 / -d5   the paper's other axes
Learning rates are tuned on dev only, over a small grid per family (three rates), at the first
seed: by default for every method on its own; `--tune family` tunes once per family with its
reference method (full, lora-r8, speft-gradient), every method of the family then using that
rate (about 0.6× the run). Tuning runs score the test split only while they lead on dev, and the
chosen rate's tuning run is the first seed's result.
Reported: dev and test accuracy (mean ± std over seeds), trainable parameters, wall time and
peak memory per run. With `--lm-train/--lm-dev` a causal-LM run adds dev perplexity of
SPEFT vs LoRA vs full on a tiny decoder.

    .venv/bin/python bench/quality.py                      # SST-2 + tinyshakespeare, ~80 min
    .venv/bin/python bench/quality.py --quick              # a few minutes: smoke run
    .venv/bin/python bench/quality.py --train T.jsonl --dev D.jsonl --test X.jsonl --model M
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import start_run
from probes import MemoryProbe, machine_info

from speft_core import data as datasets
from speft_core.config import SpeftConfig, TrainConfig
from speft_core.delta import apply_delta, revert_delta
from speft_core.models import classification_head, load_model, load_tokenizer, resolve_model
from speft_core.targets import find_target_linears
from speft_core.tasks import evaluate
from speft_core.train import train_parameters, train_sparse

log = logging.getLogger("bench.quality")
DATA = Path(os.environ.get("SPEFT_DATA_DIR", REPO.parent / "shared" / "data"))
DEFAULT_OUT = REPO / "bench" / "results" / "quality.json"
METRICS = ("gradient", "magnitude", "snip", "taylor", "fisher", "force", "grasp", "synflow",
           "random")
LR_GRIDS = {"full": (6e-5, 2e-4, 6e-4), "lora": (2e-3, 6e-3, 2e-2), "speft": (2e-3, 6e-3, 2e-2)}
REFERENCE = {"full": "full", "lora": "lora-r8", "speft": "speft-gradient"}


@dataclass(frozen=True)
class Method:
    """One row of the comparison: a family (full, lora, speft) and its settings."""

    name: str
    family: str
    speft: dict[str, Any] = field(default_factory=dict)  # SpeftConfig fields
    lora_rank: int | str | None = None  # an int, or "budget"


def methods(quick: bool) -> list[Method]:
    """Every method compared (a subset with --quick)."""
    rows = [Method("full", "full"), Method("lora-r8", "lora", lora_rank=8),
            Method("lora-budget", "lora", lora_rank="budget")]
    rows += [Method(f"speft-{m}", "speft", {"metric": m}) for m in METRICS]
    rows += [Method("speft-gradient-dynamic", "speft",
                    {"metric": "gradient", "mask": "dynamic", "update_interval": 20}),
             Method("speft-gradient-per-layer", "speft", {"metric": "gradient", "scope": "layer"})]
    rows += [Method(f"speft-gradient-d{d * 100:g}", "speft", {"metric": "gradient", "density": d})
             for d in (0.001, 0.005, 0.05)]
    if quick:
        keep = {"full", "lora-r8", "lora-budget", "speft-gradient", "speft-random",
                "speft-gradient-dynamic"}
        rows = [m for m in rows if m.name in keep]
    return rows


@dataclass
class Data:
    """Tokenised splits and what the models need to know about them."""

    task: str
    train: list[dict[str, Any]]
    dev: list[dict[str, Any]]
    test: list[dict[str, Any]]
    labels: list[str] | None
    pad_token_id: int


def load_data(path: Path, task: str, args: argparse.Namespace, files: Sequence[Path | None],
              limits: Sequence[int | None]) -> Data:
    """Read, subsample (fixed seed) and tokenise train/dev/test for `task`."""
    tokenizer = load_tokenizer(path)
    splits = []
    for file, limit in zip(files, limits, strict=True):
        examples = datasets.read_jsonl(file, task) if file is not None else []
        if limit is not None and len(examples) > limit:
            order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0))
            examples = [examples[i] for i in sorted(order[:limit].tolist())]
        splits.append(examples)
    labels = datasets.label_set(splits[0]) if task == "classification" else None
    label2id = {label: i for i, label in enumerate(labels)} if labels else None
    tokenised = [datasets.tokenize(s, tokenizer, task, max_length=args.max_length,
                                   label2id=label2id) if s else [] for s in splits]
    return Data(task, *tokenised, labels=labels, pad_token_id=tokenizer.pad_token_id)


def lora_budget_rank(model: torch.nn.Module, speft_params: int) -> int:
    """The LoRA rank whose adapter size (r·(in+out) summed) is closest to `speft_params`."""
    per_rank = sum(m.in_features + m.out_features for m in find_target_linears(model).values())
    return max(1, round(speft_params / per_rank))


def speft_budget(model: torch.nn.Module, density: float = 0.01) -> int:
    """Sparse entries SPEFT trains at `density` of the targeted weights."""
    return round(density * sum(m.weight.numel() for m in find_target_linears(model).values()))


def run_one(method: Method, lr: float, seed: int, path: Path, data: Data,
            args: argparse.Namespace,
            want_test: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """Train one method at one learning rate and seed; dev and test metrics, cost.

    `want_test(row)`, given the row with its dev metrics, says whether to score the test split
    too (tuning skips it for rates that are already beaten on dev); by default always.
    """
    hyper = TrainConfig(n_epochs=args.epochs, batch_size=args.batch_size, learning_rate=lr,
                        max_length=args.max_length, seed=seed)
    torch.manual_seed(seed)  # the new classification head is drawn here: same seed, same head
    model = load_model(path, data.task, labels=data.labels)
    for p in model.parameters():
        p.requires_grad_(False)
    common = {"task": data.task, "hyper": hyper, "train_features": data.train,
              "pad_token_id": data.pad_token_id, "device": torch.device(args.device)}
    _release_freed_memory()  # so the previous run's freed heap does not hide this run's peak
    probe = MemoryProbe(args.device)
    probe.start()
    started = time.perf_counter()
    if method.family == "speft":
        speft = SpeftConfig(**{"density": 0.01, "scoring_examples": args.scoring_examples,
                               **method.speft})
        result = train_sparse(model, speft=speft, base_model=str(path), labels=data.labels,
                              **common)
        seconds, memory = time.perf_counter() - started, probe.result()
        trainable = result.trainable_params
        apply_delta(model, result.delta, verify=False)
    else:
        model, params = _dense_trainable(model, method, data)
        trainable = sum(p.numel() for p in params)
        train_parameters(model, [{"params": params}], **common)
        seconds, memory = time.perf_counter() - started, probe.result()
    row = {"method": method.name, "lr": lr, "seed": seed, "trainable_params": trainable,
           "seconds": round(seconds, 2), "peak_mem_mib": round(memory["peak_mem_mib"], 1)}
    if data.dev:
        row |= {f"dev_{k}": v for k, v in _evaluate(model, data.dev, data, args).items()}
    if data.test and (want_test is None or want_test(row)):
        row |= {f"test_{k}": v for k, v in _evaluate(model, data.test, data, args).items()}
    if method.family == "speft":
        revert_delta(model)
    return row


def _release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), where possible."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _dense_trainable(model: torch.nn.Module, method: Method,
                     data: Data) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """Full fine-tuning or LoRA (peft) set up on the model: the parameters to train."""
    head = (list(classification_head(model)) if data.task == "classification" else [])
    if method.family == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, list(model.parameters())
    from peft import LoraConfig, get_peft_model

    rank = method.lora_rank
    if rank == "budget":
        rank = lora_budget_rank(model, speft_budget(model))
    targets = list(find_target_linears(model))
    config = LoraConfig(r=int(rank), lora_alpha=2 * int(rank), lora_dropout=0.0,
                        target_modules=targets,
                        modules_to_save=sorted({name.split(".")[0] for name in head}) or None)
    model = get_peft_model(model, config)
    return model, [p for p in model.parameters() if p.requires_grad]


def _evaluate(model: torch.nn.Module, features: list[dict[str, Any]], data: Data,
              args: argparse.Namespace) -> dict[str, float]:
    device = torch.device(args.device)
    by_length = sorted(features, key=lambda f: len(f["input_ids"]))  # less padding; same metrics
    batches = ({k: v.to(device) for k, v in b.items()}
               for b in datasets.batches(by_length, args.batch_size,
                                         pad_token_id=data.pad_token_id, shuffle=False, seed=0))
    return evaluate(model, batches, data.task)


def score_of(row: dict[str, Any], task: str) -> float:
    """What tuning maximises: dev accuracy, or minus dev loss for language models."""
    return row["dev_eval_accuracy"] if task == "classification" else -row["dev_eval_loss"]


def leads_on_dev(tried: list[dict[str, Any]], task: str) -> Callable[[dict[str, Any]], bool]:
    """Whether a row beats every row in `tried` on dev (so its test score may be reported)."""
    return lambda row: all(score_of(row, task) > score_of(r, task) for r in tried)


def compare(path: Path, data: Data, args: argparse.Namespace,
            chosen: Sequence[Method]) -> dict[str, Any]:
    """Tune rates on dev at the first seed (per family or per method), then run every method
    on every seed at its rate."""
    runs: list[dict[str, Any]] = []
    grids = {family: grid[:1] if args.quick else grid for family, grid in LR_GRIDS.items()}
    tuned = (list(chosen) if args.tune == "method"
             else [m for m in chosen if m.name in REFERENCE.values()])
    best_rate: dict[str, float] = {}
    for method in tuned:
        tried: list[dict[str, Any]] = []
        for lr in grids[method.family]:
            row = run_one(method, lr, args.seeds[0], path, data, args,
                          want_test=leads_on_dev(tried, data.task))
            log.info("tune %s lr=%g: %s", method.name, lr, row)
            tried.append(row)
        best_rate[method.name] = max(tried, key=lambda r: score_of(r, data.task))["lr"]
        runs += [dict(r, tuning=True) for r in tried]
    rates = {m.name: best_rate.get(m.name, best_rate.get(REFERENCE[m.family],
                                                          grids[m.family][0]))
             for m in chosen}
    for method in chosen:
        for seed in args.seeds:
            if any(r["method"] == method.name and r["lr"] == rates[method.name]
                   and r["seed"] == seed for r in runs):
                continue
            row = run_one(method, rates[method.name], seed, path, data, args)
            log.info("%s seed=%d: %s", method.name, seed, row)
            runs.append(row)
    return {"rates": rates, "tune": args.tune, "runs": runs,
            "summary": summarise(runs, chosen, rates, data.task)}


def summarise(runs: list[dict[str, Any]], chosen: Sequence[Method], rates: dict[str, float],
              task: str) -> list[dict[str, Any]]:
    """Mean ± std over seeds at each method's chosen rate."""
    keys = (("dev_eval_accuracy", "test_eval_accuracy") if task == "classification"
            else ("dev_eval_loss", "dev_eval_perplexity"))
    rows = []
    for method in chosen:
        lr = rates[method.name]
        mine = [r for r in runs if r["method"] == method.name and r["lr"] == lr]
        if not mine:
            continue
        row: dict[str, Any] = {"method": method.name, "family": method.family, "lr": lr,
                               "seeds": len(mine), "trainable_params": mine[0]["trainable_params"]}
        for key in (*keys, "seconds", "peak_mem_mib"):
            values = [r[key] for r in mine if key in r]
            if values:
                row[key] = statistics.fmean(values)
                row[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def markdown(summary: list[dict[str, Any]], task: str) -> str:
    """The summary as a markdown table."""
    if task == "classification":
        head = "| method | trainable params | lr | dev acc | test acc | s / run | peak MiB |"
        cols = ("dev_eval_accuracy", "test_eval_accuracy")
        fmt = lambda m, s: f"{100 * m:.1f} ± {100 * s:.1f}"
    else:
        head = "| method | trainable params | lr | dev loss | dev perplexity | s / run | peak MiB |"
        cols = ("dev_eval_loss", "dev_eval_perplexity")
        fmt = lambda m, s: f"{m:.3f} ± {s:.3f}"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for row in summary:
        cells = [fmt(row.get(c, float("nan")), row.get(c + "_std", 0.0)) for c in cols]
        lines.append(f"| {row['method']} | {row['trainable_params']:,} | {row['lr']:g} | "
                     f"{cells[0]} | {cells[1]} | {row['seconds']:.0f} | {row['peak_mem_mib']:.0f} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (defaults: SST-2 on MiniLM, tinyshakespeare on stories-260k)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--train", type=Path, default=DATA / "sst2" / "train.jsonl")
    parser.add_argument("--dev", type=Path, default=DATA / "sst2" / "dev.jsonl")
    parser.add_argument("--test", type=Path, default=DATA / "sst2" / "test.jsonl")
    parser.add_argument("--task", default="classification", choices=("classification", "causal_lm"))
    parser.add_argument("--model", default="minilm-l6", help="registered name or HF folder")
    parser.add_argument("--train-limit", type=int, default=1000,
                        help="subsample the training set to this many examples (0: all)")
    parser.add_argument("--eval-limit", type=int, default=0, help="cap dev and test (0: all)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--scoring-examples", type=int, default=512)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--methods", nargs="+", help="only these method names")
    parser.add_argument("--tune", choices=("method", "family"), default="method",
                        help="tune the rate for every method, or once per family (its "
                             "reference method) to save time")
    parser.add_argument("--lm-model", default="stories-260k")
    parser.add_argument("--lm-train", type=Path, default=DATA / "tinyshakespeare" / "train.jsonl")
    parser.add_argument("--lm-dev", type=Path, default=DATA / "tinyshakespeare" / "dev.jsonl")
    parser.add_argument("--lm-train-limit", type=int, default=3000)
    parser.add_argument("--no-lm", action="store_true", help="skip the causal-LM run")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="tiny subsets, one seed, one rate per family, 6 methods")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.train_limit, args.eval_limit, args.seeds = 192, 96, args.seeds[:1]
        args.scoring_examples, args.lm_train_limit = 64, 96
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the comparison(s), write the JSON, print the tables."""
    args = parse_args(argv)
    start_run(args.threads)
    started = time.perf_counter()
    chosen = [m for m in methods(args.quick) if not args.methods or m.name in args.methods]
    report: dict[str, Any] = {"machine": machine_info(args),
                              "command": " ".join(["bench/quality.py", *(argv or sys.argv[1:])])}
    limit = args.eval_limit or None
    source = resolve_model(args.model, args.task)
    data = load_data(source.path, args.task, args, (args.train, args.dev, args.test),
                     (args.train_limit or None, limit, limit))
    report["classification" if args.task == "classification" else "causal_lm"] = {
        "model": source.name, "train_examples": len(data.train), "dev_examples": len(data.dev),
        "test_examples": len(data.test), **compare(source.path, data, args, chosen)}
    if not args.no_lm and args.task == "classification" and args.lm_train.exists():
        lm = resolve_model(args.lm_model, "causal_lm")
        lm_data = load_data(lm.path, "causal_lm", args, (args.lm_train, args.lm_dev, None),
                            (args.lm_train_limit or None, limit, None))
        lm_methods = [m for m in chosen if m.name in ("full", "lora-r8", "lora-budget",
                                                     "speft-gradient", "speft-random")]
        report["causal_lm"] = {"model": lm.name, "train_examples": len(lm_data.train),
                               "dev_examples": len(lm_data.dev),
                               **compare(lm.path, lm_data, args, lm_methods)}
    report["wall_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    for task in ("classification", "causal_lm"):
        if task in report:
            print(f"\n{task} ({report[task]['model']}):\n{markdown(report[task]['summary'], task)}")
    print(f"\nwall time {report['wall_s']:.0f} s; results in {args.out}")
    return report


if __name__ == "__main__":
    main()
