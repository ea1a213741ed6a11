"""Every benchmark in one command: JSON results and PNG plots under bench/results/.

    .venv/bin/python bench/run_all.py                # train_step, serve, quality (~90 min), plots
    .venv/bin/python bench/run_all.py --quick        # each benchmark's --quick mode, plots
    .venv/bin/python bench/run_all.py --plots-only   # redraw the plots from the JSON present

Plots (matplotlib, no display needed):
  quality_accuracy_vs_params.png  every method's test score per task of the quality suite
  train_step_time.png             step time per method (CPU, and CUDA where its JSON exists)
  serve_throughput.png            rows/s vs distinct adapters in the request mix, per model
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
SCRIPTS = ("train_step.py", "serve.py", "quality.py")
FAMILY_COLOURS = {"full": "tab:red", "lora": "tab:blue", "speft": "tab:green"}


def run_benchmarks(quick: bool, results: Path) -> None:
    """Run each benchmark script in its own process (each writes its JSON)."""
    for script in SCRIPTS:
        command = [sys.executable, str(BENCH / script),
                   "--out", str(results / script.replace(".py", ".json"))]
        if quick:
            command.append("--quick")
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True)


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def plot_quality(report: dict[str, Any], out: Path) -> None:
    """One panel per task of the suite: every method's test score (accuracy %, or perplexity
    on the decoders; mean ± std over seeds) as a bar, best first, coloured by family, with its
    trainable parameters in the label."""
    import matplotlib.pyplot as plt

    tasks = report["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 5.2), squeeze=False)
    for ax, (name, task) in zip(axes[0], tasks.items(), strict=True):
        classification = "test_eval_accuracy" in task["summary"][0]
        key = "test_eval_accuracy" if classification else "test_eval_perplexity"
        scale = 100 if classification else 1
        rows = sorted((r for r in task["summary"] if key in r), key=lambda r: r[key],
                      reverse=classification)
        labels = [f"{r['method']} ({r['trainable_params']:,})" for r in rows]
        values = [scale * r[key] for r in rows]
        ax.barh(labels, values, xerr=[scale * r.get(key + "_std", 0.0) for r in rows],
                color=[FAMILY_COLOURS.get(r["family"], "black") for r in rows], capsize=2)
        for i, value in enumerate(values):
            ax.text(value, i, f" {value:.1f}" if classification else f" {value:.2f}",
                    va="center", fontsize=7)
        if classification:
            ax.set_xlim(max(0.0, min(values) - 10), 100)
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlabel("test accuracy (%)" if classification else "test perplexity (lower wins)")
        ax.set_title(f"{name} ({task['model']}, {task['train_examples']} examples)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("Quality suite: rates tuned on dev per method; bars are test, mean ± std")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_train_step(reports: dict[str, dict[str, Any]], out: Path) -> None:
    """Step time per method, one group of bars per device."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(5.5 * len(reports), 4.5), squeeze=False)
    for ax, (device, report) in zip(axes[0], reports.items(), strict=True):
        names = list(report["results"])
        times = [report["results"][n]["step_ms"] for n in names]
        colours = ["tab:green" if n == "speft" else "tab:gray" for n in names]
        ax.barh(names, times, color=colours)
        for i, value in enumerate(times):
            ax.text(value, i, f" {value:.0f}", va="center", fontsize=8)
        ax.set_xlabel("ms per training step (forward + backward + AdamW)")
        ax.set_title(f"MiniLM-L6, batch 32 × 64 tokens, {device}")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_serving(reports: dict[str, dict[str, Any]], out: Path) -> None:
    """Rows/s vs distinct adapters in the request mix (auto path), base-only as a line."""
    import matplotlib.pyplot as plt

    models = sorted({name for report in reports.values() for name in report["models"]})
    fig, axes = plt.subplots(len(reports), len(models), figsize=(5 * len(models),
                                                                  3.8 * len(reports)),
                             squeeze=False)
    panels = [(axes[i][j], device, name, report["models"][name])
              for i, (device, report) in enumerate(reports.items())
              for j, name in enumerate(models) if name in report["models"]]
    for ax, device, name, model in panels:
        rows = model["throughput"]
        base = next(v for k, v in rows.items() if k.startswith("base-only"))
        mixes = sorted((v["adapters"], v["rows_per_s"]) for k, v in rows.items()
                       if k.endswith("auto"))
        ax.plot([m for m, _ in mixes], [r for _, r in mixes], "o-", color="tab:green",
                label="mixed adapters (auto path)")
        ax.axhline(base["rows_per_s"], color="tab:gray", linestyle="--", label="base-only")
        ax.set_xscale("log", base=2)
        ax.set_xticks([m for m, _ in mixes], [str(m) for m, _ in mixes])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("distinct adapters in the request mix")
        ax.set_ylabel("rows / s")
        ax.set_title(f"{name}, {device}", fontsize=10)
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def draw_plots(results: Path) -> list[Path]:
    """Every plot whose JSON is present; the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    written = []
    # the suite as run in parts and merged (`quality.py --render … --out`), else one run's
    quality = _load(results / "quality_suite_merged.json") or _load(results / "quality.json")
    if quality and quality.get("tasks") and "summary" in next(iter(quality["tasks"].values())):
        plot_quality(quality, results / "quality_accuracy_vs_params.png")
        written.append(results / "quality_accuracy_vs_params.png")
    steps = {device: r for device, r in (("CPU", _load(results / "train_step.json")),
                                         ("CUDA", _load(results / "train_step_cuda.json"))) if r}
    if steps:
        plot_train_step(steps, results / "train_step_time.png")
        written.append(results / "train_step_time.png")
    serving = {device: r for device, r in (("CPU", _load(results / "serve.json")),
                                           ("CUDA", _load(results / "serve_cuda.json"))) if r}
    if serving:
        plot_serving(serving, results / "serve_throughput.png")
        written.append(results / "serve_throughput.png")
    return written


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmarks (unless --plots-only), then draw the plots."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="each benchmark's quick mode")
    parser.add_argument("--plots-only", action="store_true", help="only redraw the plots")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    if not args.plots_only:
        run_benchmarks(args.quick, args.results)
    for path in draw_plots(args.results):
        print("wrote", path)


if __name__ == "__main__":
    main()
