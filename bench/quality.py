"""The quality suite: SPEFT against full fine-tuning and LoRA on several tasks, one protocol.

Tasks (`bench/quality_tasks.py`): sst2, sst5 and mpqa on MiniLM-L6; tinyshakespeare and a chat
run on alpaca200 on the tiny decoder stories-260k. Methods on every task: full fine-tuning,
LoRA r=8, LoRA at SPEFT's 1% budget (`lora-budget`; on the decoder that is rank 1, `lora-r1`),
and SPEFT at 1% with gradient, random and magnitude salience; on the decoders also SPEFT-
gradient at LoRA r=1's and r=8's budgets (and random at r=8's). Every method's learning rate is
tuned on dev at the first seed over a grid that starts at three points half a decade apart
and grows past whichever edge wins (`quality_runs.tune`); the other seeds run at the chosen
rate; test is reported for the chosen rate only. Mean ± std over seeds.

`--levers` screens salience recipes instead (`LEVERS`): SPEFT-gradient with each recipe, its
rate tuned the same way, on every task, dev only; ranked by mean dev rank across tasks.

    .venv/bin/python bench/quality.py                    # the suite (see README for its time)
    .venv/bin/python bench/quality.py --levers           # the salience-recipe screen
    .venv/bin/python bench/quality.py --quick            # minutes: tiny subsets, one seed
    .venv/bin/python bench/quality.py --tasks sst2 mpqa --recipe '{"head_warmup_steps": 16}'
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from common import REPO, start_run
from probes import machine_info
from quality_runs import START_GRIDS, Method, run_one, tune
from quality_tasks import TASKS, Data, TaskSpec, load_task

log = logging.getLogger("bench.quality")
RESULTS = REPO / "bench" / "results"

# Salience recipes screened by --levers (SpeftConfig fields on top of the defaults).
# Every recipe states the levers that are now on by default: the screen began when none was
# (no warm-up, raw scores, no cap, a static mask), and "baseline" stays that recipe.
RAW = {"head_warmup_steps": 0, "score_normalization": "none", "spread_cap": 0, "mask": "static"}
WARMUP_NORM = {"head_warmup_steps": 16, "score_normalization": "module", "mask": "static"}
LEVERS: dict[str, dict[str, Any]] = {  # most promising first: a screen cut short keeps them
    "baseline": RAW,
    "head-warmup": {**RAW, "head_warmup_steps": 16},
    "module-norm": {**RAW, "score_normalization": "module"},
    "warmup+norm": {**WARMUP_NORM, "spread_cap": 0},  # the default until the spread cap
    "floor-25%": {**RAW, "module_floor": 0.25},
    "explore-20%": {**RAW, "explore_fraction": 0.2},
    "dynamic": {**RAW, "mask": "dynamic", "update_interval": 8},
    "scoring-64": {**RAW, "scoring_examples": 64},
    # only matters with a warmed head: measured on top of the default recipe
    "default+holdout-25%": {**WARMUP_NORM, "spread_cap": 0, "scoring_holdout": 0.25},
    # on top of warmup+norm: no row or column beyond N times its even share of the budget
    **{f"default+spread-{cap}": {**WARMUP_NORM, "spread_cap": cap} for cap in (4, 8, 2)},
    # the cap on input features (columns) alone: classification piles onto a few of them,
    # the decoders onto a few output features (rows)
    "default+input-spread-4": {**WARMUP_NORM, "spread_cap": 4, "spread_lines": "inputs"},
    # the default until the auto mask: the cap of 4 on classification, none on the decoders
    "auto-spread": {**WARMUP_NORM, "spread_cap": "auto"},
    # more scoring examples than the protocol's 512 (SST-*, MPQA: all 1,000 training examples;
    # alpaca-chat has 150 in all, so there it is the default's runs)
    "default+scoring-1024": {**WARMUP_NORM, "spread_cap": "auto", "scoring_examples": 1024},
    # the dynamic mask on top of auto-spread
    "default+dynamic": {**WARMUP_NORM, "spread_cap": "auto", "mask": "dynamic",
                        "update_interval": 8},
    # the default: auto-spread, and the dynamic mask on causal LM only, about 12 re-selections
    # a job (every 8 steps in the suite's 54- and 94-step decoder runs)
    "auto-mask": {**WARMUP_NORM, "spread_cap": "auto", "mask": "auto", "update_interval": "auto"},
}
# Cells that are another lever's runs exactly (the same settings once resolved for the task:
# no new head on a decoder; 'auto' is 4 on classification and 0 on causal LM): not re-run.
SAME_AS: dict[str, dict[str, str]] = {
    "head-warmup": {"causal_lm": "baseline"},
    "auto-spread": {"classification": "default+spread-4", "causal_lm": "warmup+norm"},
    "auto-mask": {"classification": "default+spread-4", "causal_lm": "default+dynamic"},
}


def methods_for(spec: TaskSpec) -> list[Method]:
    """The methods compared on a task."""
    rows = [Method("full", "full"), Method("lora-r8", "lora", lora_rank=8)]
    rows.append(Method("lora-r1", "lora", lora_rank=1) if spec.is_decoder
                else Method("lora-budget", "lora", lora_rank="budget"))
    rows += [Method(f"speft-{m}", "speft", {"metric": m})
             for m in ("gradient", "random", "magnitude")]
    if spec.is_decoder:
        rows += [Method("speft-gradient-at-r1", "speft", {"metric": "gradient"}, budget_rank=1),
                 Method("speft-gradient-at-r8", "speft", {"metric": "gradient"}, budget_rank=8),
                 Method("speft-random-at-r8", "speft", {"metric": "random"}, budget_rank=8)]
    return rows


def _grid(method: Method, quick: bool) -> tuple[float, ...]:
    grid = START_GRIDS[method.family]
    return grid[1:2] if quick else grid


def compare(data: Data, methods: Sequence[Method], args: argparse.Namespace,
            recipe: dict[str, Any]) -> dict[str, Any]:
    """Tune each method's rate at the first seed, then run the other seeds at it."""
    device = torch.device(args.device)
    runs: list[dict[str, Any]] = []
    rates: dict[str, float] = {}
    edges: list[str] = []
    for method in methods:
        best, tried, interior = tune(method, data, args.seeds[0], device=device,
                                     grid=_grid(method, args.quick), widen=not args.quick,
                                     recipe=recipe)
        rates[method.name] = best
        runs += [dict(r, tuning=True) for r in tried]
        if not interior and not args.quick:
            edges.append(method.name)
        for seed in args.seeds[1:]:
            runs.append(run_one(method, best, seed, data, device=device, recipe=recipe))
            log.info("%s %s seed=%d: %s", data.spec.name, method.name, seed, runs[-1])
    return {"rates": rates, "rate_at_grid_edge": edges, "runs": runs,
            "summary": summarise(runs, methods, rates, data.task)}


def summarise(runs: list[dict[str, Any]], methods: Sequence[Method], rates: dict[str, float],
              task: str) -> list[dict[str, Any]]:
    """Mean ± std over seeds at each method's chosen rate."""
    keys = (("dev_eval_accuracy", "test_eval_accuracy") if task == "classification"
            else ("dev_eval_loss", "test_eval_loss", "dev_eval_perplexity",
                  "test_eval_perplexity"))
    rows = []
    for method in methods:
        mine = [r for r in runs if r["method"] == method.name and r["lr"] == rates[method.name]]
        row: dict[str, Any] = {"method": method.name, "family": method.family,
                               "lr": rates[method.name], "seeds": len(mine),
                               "trainable_params": mine[0]["trainable_params"]}
        for key in (*keys, "seconds", "peak_mem_mib"):
            values = [r[key] for r in mine if key in r]
            if values:
                row[key] = statistics.fmean(values)
                row[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def dev_ranks(scores: dict[str, float]) -> dict[str, float]:
    """Rank 1 = best (highest score); ties share the mean of their ranks. Scores are compared
    to 6 decimals: runs of the same settings can differ by float noise below that."""
    rounded = {name: round(score, 6) for name, score in scores.items()}
    ordered = sorted(rounded.values(), reverse=True)
    return {name: statistics.fmean(i + 1 for i, s in enumerate(ordered) if s == score)
            for name, score in rounded.items()}


def _dev_score(row: dict[str, Any], task: str) -> float:
    return row["dev_eval_accuracy"] if task == "classification" else -row["dev_eval_loss"]


def across_tasks(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per method: its dev rank on each task and the mean over the tasks it ran on."""
    ranks: dict[str, dict[str, float]] = {}
    for name, task in report["tasks"].items():
        kind = TASKS[name].task
        scores = {row["method"]: _dev_score(row, kind) for row in task["summary"]}
        for method, rank in dev_ranks(scores).items():
            ranks.setdefault(method, {})[name] = rank
    return sorted(({"method": m, "dev_rank": r, "mean_dev_rank": statistics.fmean(r.values())}
                   for m, r in ranks.items()), key=lambda row: row["mean_dev_rank"])


def _test(row: dict[str, Any], task: str) -> float:
    """Test score in points (accuracy %) or minus perplexity: higher is better either way."""
    if task == "classification":
        return 100 * row["test_eval_accuracy"]
    return -row["test_eval_perplexity"]


def _margin(rows: dict[str, dict[str, Any]], kind: str, a: str, b: str,
            slack: float) -> float | None:
    """How far method a's test score is above b's (plus `slack`); None when either is missing."""
    key = "test_eval_accuracy" if kind == "classification" else "test_eval_perplexity"
    if key not in rows.get(a, {}) or key not in rows.get(b, {}):
        return None
    return _test(rows[a], kind) - _test(rows[b], kind) + slack


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 15's targets per task on test (mean over seeds): the margin, positive = met."""
    checks = []
    for name, task in report["tasks"].items():
        kind = TASKS[name].task
        rows = {row["method"]: row for row in task["summary"]}

        if kind == "classification":
            pairs = [("speft-gradient >= lora-budget", "speft-gradient", "lora-budget", 0.0),
                     ("speft-gradient within 1 point of full", "speft-gradient", "full", 1.0),
                     ("speft-gradient >= speft-random", "speft-gradient", "speft-random", 0.0)]
        else:
            pairs = [("speft-gradient-at-r8 >= lora-r8", "speft-gradient-at-r8", "lora-r8", 0.0),
                     ("speft-gradient >= speft-random", "speft-gradient", "speft-random", 0.0),
                     ("speft-gradient-at-r8 >= speft-random-at-r8", "speft-gradient-at-r8",
                      "speft-random-at-r8", 0.0)]
        for label, a, b, slack in pairs:
            value = _margin(rows, kind, a, b, slack)
            checks.append({"task": name, "target": label, "margin": value,
                           "met": value is not None and value >= 0})
    return checks


# --- tables -----------------------------------------------------------------------------------


def markdown(summary: list[dict[str, Any]], task: str) -> str:
    """A task's summary as a markdown table."""
    if task == "classification":
        head = "| method | trainable params | lr | dev acc | test acc | s / run |"
        cols = ("dev_eval_accuracy", "test_eval_accuracy")
        fmt = lambda m, s: f"{100 * m:.1f} ± {100 * s:.1f}"
    else:
        head = "| method | trainable params | lr | dev loss | test perplexity | s / run |"
        cols = ("dev_eval_loss", "test_eval_perplexity")
        fmt = lambda m, s: f"{m:.3f} ± {s:.3f}"
    lines = [head, "|---|---:|---:|---:|---:|---:|"]
    for row in summary:
        cells = [fmt(row[c], row.get(c + "_std", 0.0)) if c in row else "–" for c in cols]
        lines.append(f"| {row['method']} | {row['trainable_params']:,} | {row['lr']:.2g} | "
                     f"{cells[0]} | {cells[1]} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def ranks_markdown(rows: list[dict[str, Any]], tasks: Sequence[str]) -> str:
    """Dev ranks per task and their mean, best first."""
    lines = ["| method | " + " | ".join(tasks) + " | mean dev rank |",
             "|---|" + "---:|" * (len(tasks) + 1)]
    for row in rows:
        cells = [f"{row['dev_rank'][t]:g}" if t in row["dev_rank"] else "–" for t in tasks]
        lines.append(f"| {row['method']} | " + " | ".join(cells)
                     + f" | {row['mean_dev_rank']:.2f} |")
    return "\n".join(lines)


# --- the lever screen ---------------------------------------------------------------------------


def screen_levers(datas: dict[str, Data], args: argparse.Namespace,
                  save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """SPEFT-gradient with every recipe of LEVERS on every task: tuned dev score at seed 1
    (`save(partial)` after every cell, so a long screen leaves its results as it goes)."""
    device = torch.device(args.device)
    method = Method("speft-gradient", "speft", {"metric": "gradient"})
    table: dict[str, dict[str, Any]] = {}
    for lever, recipe in LEVERS.items():
        if args.levers_only and lever not in args.levers_only:
            continue
        for name, data in datas.items():
            if data.spec.task in SAME_AS.get(lever, {}):
                continue  # another lever's runs exactly
            best, tried, interior = tune(method, data, args.seeds[0], device=device,
                                         grid=_grid(method, args.quick), widen=not args.quick,
                                         recipe={**args.recipe, **recipe})
            row = next(r for r in tried if r["lr"] == best)
            table.setdefault(lever, {})[name] = {
                "lr": best, "dev": _dev_score(row, data.task), "interior": interior,
                "runs": tried}
            log.info("lever %s on %s: lr %g dev %.4f", lever, name, best, table[lever][name]["dev"])
            save({"table": table})
    return rank_levers(table, list(datas))


def rank_levers(table: dict[str, dict[str, Any]], tasks: Sequence[str]) -> dict[str, Any]:
    """The screen's table with each lever's dev rank per task and their mean, best first. A
    SAME_AS cell takes its source lever's cell: for a lever screened on the other tasks, or one
    made of other levers' cells alone (SAME_AS for both task kinds)."""
    for lever, sources in SAME_AS.items():
        composed = set(sources) == {"classification", "causal_lm"}
        if lever not in table and not composed:
            continue
        for name in tasks:
            source = sources.get(TASKS[name].task)
            if source and name in table.get(source, {}) and name not in table.get(lever, {}):
                table.setdefault(lever, {})[name] = dict(table[source][name], same_as=source)
    ranks: dict[str, dict[str, float]] = {}
    for name in tasks:
        scores = {lever: cells[name]["dev"] for lever, cells in table.items() if name in cells}
        for lever, rank in dev_ranks(scores).items():
            ranks.setdefault(lever, {})[name] = rank
    order = sorted(ranks, key=lambda lever: statistics.fmean(ranks[lever].values()))
    return {"levers": {k: LEVERS[k] for k in table}, "table": table,
            "ranking": [{"lever": k, "dev_rank": ranks[k],
                         "mean_dev_rank": statistics.fmean(ranks[k].values())} for k in order]}


def merge_reports(paths: Sequence[Path]) -> dict[str, Any]:
    """The finished tasks of several suite results, in order: a later file's rows replace an
    earlier one's for the same (task, method) (e.g. baselines from one run, SPEFT rows from a
    later one), listed in the suite's method order; then the cross-task ranks and the targets
    over the merge."""
    merged: dict[str, Any] = {"sources": [str(p) for p in paths], "tasks": {}}
    for path in paths:
        for name, task in json.loads(path.read_text())["tasks"].items():
            if "summary" not in task:
                continue
            into = merged["tasks"].setdefault(name, {"model": task["model"], "summary": [],
                                                     "rates": {}, "rate_at_grid_edge": [],
                                                     "runs": []})
            methods = {row["method"] for row in task["summary"]}
            into["summary"] = [r for r in into["summary"] if r["method"] not in methods]
            into["summary"] += task["summary"]
            into["rates"] |= task.get("rates", {})
            into["rate_at_grid_edge"] = sorted(
                {m for m in into["rate_at_grid_edge"] if m not in methods}
                | set(task.get("rate_at_grid_edge", [])))
            into["runs"] = [r for r in into["runs"] if r["method"] not in methods]
            into["runs"] += task.get("runs", [])
            for key in ("train_examples", "dev_examples", "test_examples", "protocol"):
                if key in task:
                    into[key] = task[key]
    for name, task in merged["tasks"].items():  # rows in the suite's method order
        order = [m.name for m in methods_for(TASKS[name])]
        task["summary"].sort(key=lambda row: (order.index(row["method"])
                                              if row["method"] in order else len(order)))
    merged["across_tasks"] = across_tasks(merged)
    merged["targets"] = targets(merged)
    return merged


def render(paths: Sequence[Path], out: Path | None = None) -> str:
    """The markdown tables of results JSONs (also ones a run left partial): a lever screen's,
    or the suite's merged over every file given, with the targets; `out`: write the merge."""
    first = json.loads(paths[0].read_text())
    if "levers" in first or "levers_partial" in first:  # screens: their tables, ranked together
        names = list(first["tasks"])
        table: dict[str, dict[str, Any]] = {}
        for path in paths:
            report = json.loads(path.read_text())
            screened = report.get("levers") or report.get("levers_partial") or {}
            for lever, cells in screened.get("table", {}).items():
                table.setdefault(lever, {}).update(
                    {task: cell for task, cell in cells.items() if "same_as" not in cell})
        result = rank_levers(table, names)
        if out is not None:
            out.write_text(json.dumps({"sources": [str(p) for p in paths], "tasks": names,
                                       "levers": result}, indent=1, default=str) + "\n")
        return levers_markdown(result, names)
    merged = merge_reports(paths)
    if out is not None:
        out.write_text(json.dumps(merged, indent=1, default=str) + "\n")
    done = merged["tasks"]
    parts = [f"{n} ({t['model']}):\n{markdown(t['summary'], TASKS[n].task)}"
             for n, t in done.items()]
    if done:
        parts.append(ranks_markdown(merged["across_tasks"], list(done)))
        parts.append(targets_markdown(merged["targets"]))
    edges = {n: t["rate_at_grid_edge"] for n, t in done.items() if t["rate_at_grid_edge"]}
    if edges:
        parts.append(f"rates on a grid edge: {edges}")
    return "\n\n".join(parts)


def targets_markdown(checks: Sequence[dict[str, Any]]) -> str:
    """Each target per task with its margin (points, or perplexity for decoders)."""
    lines = ["| task | target | margin | met |", "|---|---|---:|---|"]
    for c in checks:
        margin = "—" if c["margin"] is None else f"{c['margin']:+.2f}"
        lines.append(f"| {c['task']} | {c['target']} | {margin} | "
                     f"{'yes' if c['met'] else 'no' if c['margin'] is not None else 'not run'} |")
    return "\n".join(lines)


def levers_markdown(result: dict[str, Any], tasks: Sequence[str]) -> str:
    """Dev score of every lever per task (accuracy % or loss), with its rank, best first."""
    lines = ["| lever | " + " | ".join(tasks) + " | mean dev rank |",
             "|---|" + "---:|" * (len(tasks) + 1)]
    for entry in result["ranking"]:
        cells = []
        for name in tasks:
            cell = result["table"][entry["lever"]].get(name)
            if cell is None:
                cells.append("–")
                continue
            value = (f"{100 * cell['dev']:.1f}" if TASKS[name].task == "classification"
                     else f"{-cell['dev']:.3f}")
            edge = "" if cell["interior"] else "*"
            cells.append(f"{value}{edge} ({entry['dev_rank'][name]:g})")
        lines.append(f"| {entry['lever']} | " + " | ".join(cells)
                     + f" | {entry['mean_dev_rank']:.2f} |")
    return "\n".join(lines)


# --- command line -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tasks", nargs="+", choices=tuple(TASKS), default=list(TASKS))
    parser.add_argument("--methods", nargs="+", help="only these method names")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--recipe", type=json.loads, default={},
                        help="JSON SpeftConfig fields added to every SPEFT method")
    parser.add_argument("--levers", action="store_true", help="screen salience recipes")
    parser.add_argument("--levers-only", nargs="+", choices=tuple(LEVERS),
                        help="with --levers: only these recipes")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="tiny subsets, one seed, one rate per family (smoke test)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--render", type=Path, nargs="+", metavar="JSON",
                        help="print the tables of results files (also partial ones; suite "
                             "files are merged in order, later rows replacing earlier ones) "
                             "and the targets over them, write the merge to --out if given, "
                             "and exit")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
    if args.out is None and not args.render:
        args.out = RESULTS / ("quality_levers.json" if args.levers else "quality.json")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the suite (or the lever screen), write the JSON, print the tables."""
    args = parse_args(argv)
    if args.render:
        print(render(args.render, args.out))
        return {}
    start_run(args.threads)
    started = time.perf_counter()
    report: dict[str, Any] = {"machine": machine_info(args), "recipe": args.recipe,
                              "command": " ".join(["bench/quality.py", *(argv or sys.argv[1:])]),
                              "seeds": args.seeds, "tasks": {}}
    datas = {name: load_task(TASKS[name], quick=args.quick) for name in args.tasks}
    for name, data in datas.items():
        report["tasks"][name] = {"model": data.spec.model, "train_examples": len(data.train),
                                 "dev_examples": len(data.dev), "test_examples": len(data.test),
                                 "protocol": vars(data.spec.protocol)}
    def save(partial: dict[str, Any] | None = None) -> None:
        if partial is not None:
            report["levers_partial"] = partial
        report["wall_s"] = round(time.perf_counter() - started, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")

    if args.levers:
        report["levers"] = screen_levers(datas, args, save)
        report.pop("levers_partial", None)
    else:
        for name, data in datas.items():
            chosen = [m for m in methods_for(data.spec)
                      if not args.methods or m.name in args.methods]
            report["tasks"][name] |= compare(data, chosen, args, args.recipe)
            save()
        report["across_tasks"] = across_tasks(report)
        report["targets"] = targets(report)
    save()
    if args.levers:
        print(levers_markdown(report["levers"], args.tasks))
    else:
        for name in args.tasks:
            print(f"\n{name} ({TASKS[name].model}):\n"
                  f"{markdown(report['tasks'][name]['summary'], TASKS[name].task)}")
        print("\n" + ranks_markdown(report["across_tasks"], args.tasks))
        for check in report["targets"]:
            print(check)
    print(f"\nwall time {report['wall_s']:.0f} s; results in {args.out}")
    return report


if __name__ == "__main__":
    main()
