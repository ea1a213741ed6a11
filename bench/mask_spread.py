"""How spread out a recipe's chosen entries are over each module's rows and columns.

For each task and recipe, SPEFT at 1% trains one epoch on the quality suite's data
(`bench/quality_tasks.py`, seed 1, the task's protocol) and the static mask is read off the
delta. Per module: the share of its entries in its busiest 5% of input features (columns) and
of output features (rows); a uniform draw puts about 5–10% there, a block of a few features
nearly 100%. The table gives the median over modules, weighted by their entries.

    .venv/bin/python bench/mask_spread.py                       # every task, three recipes
    .venv/bin/python bench/mask_spread.py --tasks sst5 --recipes default spread-4
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from common import REPO, start_run
from probes import machine_info
from quality_tasks import TASKS, Data, load_task

from speft_core.config import SpeftConfig, TrainConfig
from speft_core.models import load_model
from speft_core.targets import find_target_linears
from speft_core.train import train_sparse

RECIPES: dict[str, dict[str, Any]] = {
    "random": {"metric": "random", "spread_cap": 0},
    "uncapped": {"spread_cap": 0},  # gradient, warm-up and per-module normalisation
    **{f"spread-{cap}": {"spread_cap": cap} for cap in (2, 4, 8)},
    "input-spread-4": {"spread_cap": 4, "spread_lines": "inputs"},
}
BUSIEST = 0.05


def busiest_share(positions: torch.Tensor, lines: int, *, of_rows: bool, cols: int) -> float:
    """Share of a module's entries in its busiest `BUSIEST` of rows (or columns)."""
    line = positions // cols if of_rows else positions % cols
    counts = torch.bincount(line, minlength=lines).sort(descending=True).values
    return float(counts[:max(1, round(BUSIEST * lines))].sum() / max(1, positions.numel()))


def weighted_median(values: Sequence[float], weights: Sequence[int]) -> float:
    """The median of `values`, each counted `weights` times."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    half, seen = sum(weights) / 2, 0
    for i in order:
        seen += weights[i]
        if seen >= half:
            return values[i]
    return float("nan")


def spread_of(modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
              shapes: Mapping[str, torch.Size]) -> dict[str, float]:
    """Entry-weighted medians over modules of the busiest-rows and busiest-columns shares."""
    rows, cols, weights = [], [], []
    for name, (indices, _values) in modules.items():
        out_features, in_features = shapes[name]
        flat = indices.long()
        rows.append(busiest_share(flat, out_features, of_rows=True, cols=in_features))
        cols.append(busiest_share(flat, in_features, of_rows=False, cols=in_features))
        weights.append(int(flat.numel()))
    return {"busiest_rows_share": weighted_median(rows, weights),
            "busiest_cols_share": weighted_median(cols, weights)}


def measure(data: Data, recipe: Mapping[str, Any]) -> dict[str, Any]:
    """Train SPEFT at 1% with `recipe` for one epoch; the spread of its mask."""
    protocol = data.spec.protocol
    torch.manual_seed(1)
    model = load_model(data.path, data.task, labels=data.labels)
    shapes = {n: m.weight.shape for n, m in find_target_linears(model).items()}
    speft = SpeftConfig(**{"density": 0.01, "mask": "static",  # the spread as chosen
                           "scoring_examples": protocol.scoring_examples, **recipe})
    hyper = TrainConfig(n_epochs=1, batch_size=protocol.batch_size, learning_rate=0.01,
                        max_length=protocol.max_length, seed=1)
    started = time.perf_counter()
    result = train_sparse(model, task=data.task, speft=speft, hyper=hyper,
                          train_features=data.train, pad_token_id=data.pad_token_id,
                          base_model=str(data.path), labels=data.labels,
                          device=torch.device("cpu"))
    return {**spread_of(result.delta.modules, shapes), "nnz": result.delta.nnz,
            "seconds": round(time.perf_counter() - started, 1)}


def markdown(table: Mapping[str, Mapping[str, Mapping[str, Any]]], recipes: Sequence[str]) -> str:
    lines = ["| task | " + " | ".join(recipes) + " |", "|---|" + "---:|" * len(recipes)]
    for task, cells in table.items():
        lines.append(f"| {task} | " + " | ".join(
            f"{100 * cells[r]['busiest_cols_share']:.0f}% / {100 * cells[r]['busiest_rows_share']:.0f}%"
            for r in recipes) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=tuple(TASKS), default=list(TASKS))
    parser.add_argument("--recipes", nargs="+", choices=tuple(RECIPES),
                        default=["random", "uncapped", "spread-4"])
    parser.add_argument("--quick", action="store_true", help="the quality suite's tiny subsets")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "mask_spread.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start_run(args.threads)
    table: dict[str, dict[str, Any]] = {}
    for name in args.tasks:
        data = load_task(TASKS[name], quick=args.quick)
        table[name] = {r: measure(data, RECIPES[r]) for r in args.recipes}
    report = {"machine": machine_info(args), "busiest": BUSIEST, "recipes":
              {r: RECIPES[r] for r in args.recipes}, "table": table}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print("share of a module's entries in its busiest 5% of columns / rows "
          "(entry-weighted median over modules):\n" + markdown(table, args.recipes))
    return report


if __name__ == "__main__":
    main()
