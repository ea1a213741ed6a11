"""`speft train SPEC.json --out DELTA.safetensors`: run one job locally, without the service."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .config import JobSpec
from .delta import save_delta
from .errors import ConfigError, SpeftError
from .progress import LOADING, TRAINING, PhaseReport, StepReport, TrainCallbacks
from .train import fine_tune

app = typer.Typer(help="speft: salience-aware sparse fine-tuning.", no_args_is_help=True,
                  add_completion=False)
console = Console(stderr=True)


@app.callback()
def main() -> None:
    """speft command line."""


def _local_file(value: str | None, spec_dir: Path) -> str | None:
    """A path as given if it exists, else relative to the spec file's folder."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_absolute() and not path.exists() and (spec_dir / path).exists():
        path = spec_dir / path
    return str(path)


def load_spec(spec_path: Path) -> JobSpec:
    """Read a REST-style job body from JSON, with local file paths."""
    try:
        body = json.loads(spec_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # also too deep, too many digits
        raise typer.BadParameter(f"cannot read {spec_path}: {err}", param_hint="SPEC") from err
    spec = JobSpec.from_dict(body)
    spec = dataclasses.replace(
        spec,
        training_file=_local_file(spec.training_file, spec_path.parent),
        validation_file=_local_file(spec.validation_file, spec_path.parent),
    )
    for field in ("training_file", "validation_file"):
        value = getattr(spec, field)
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"{field} {value!r} is not a readable file", param=field)
    return spec


@app.command()
def train(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC.json", help="job body (REST shape)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="where to write the delta")],
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda if present)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Train a sparse delta from SPEC.json and write it to --out."""
    logging.basicConfig(level=logging.WARNING)
    try:
        spec = load_spec(spec_path)
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                      console=console, disable=quiet) as progress:
            bar = progress.add_task(LOADING, total=None, status="")

            def on_phase(report: PhaseReport) -> None:
                if report.phase != TRAINING:  # training shows its steps (on_step)
                    progress.update(bar, description=report.phase, total=report.total,
                                    completed=report.step, status="")

            def on_step(report: StepReport) -> None:
                progress.update(bar, description="training", total=report.total_steps,
                                completed=report.step,
                                status=f"loss {report.train_loss:.4f} lr {report.lr:.2e}")

            def on_eval(step: int, metrics: dict[str, float]) -> None:
                shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "epoch")
                progress.console.print(f"step {step}: {shown}")

            callbacks = TrainCallbacks(on_step=on_step, on_eval=on_eval, on_phase=on_phase)
            result = fine_tune(spec, callbacks=callbacks,
                               device=torch.device(device) if device else None)
    except SpeftError as err:
        where = f" ({err.param})" if err.param else ""
        console.print(f"[red]error{where}:[/red] {err.message}")
        raise typer.Exit(code=2) from err
    save_delta(result.delta, out)
    summary = {"out": str(out), "nnz": result.delta.nnz, "bytes": out.stat().st_size,
               "steps": result.steps, "seconds": round(result.seconds, 1),
               "base_eval": result.base_eval, "eval": result.eval}
    typer.echo(json.dumps(summary))
if __name__ == "__main__":
    app()
