"""One training run of the quality suite, and learning-rate tuning on dev with a grid that grows
until no method's chosen rate sits on its edge.

Every method trains the same model on the same examples in the same order with the same loop
(`speft_core.train`: AdamW, linear warm-up and decay, clipping; SPEFT through `train_sparse`,
the baselines through `train_parameters`); on classification every method also trains the new
classification head densely.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from probes import MemoryProbe
from quality_tasks import Data

from speft_core import data as datasets
from speft_core.config import SpeftConfig, TrainConfig
from speft_core.delta import apply_delta, revert_delta
from speft_core.models import classification_head, load_model
from speft_core.targets import find_target_linears
from speft_core.tasks import evaluate
from speft_core.train import train_parameters, train_sparse

log = logging.getLogger("bench.quality")

# Starting grids, half a decade apart; `tune` adds points beyond whichever edge wins.
START_GRIDS = {"full": (1e-4, 3e-4, 1e-3), "lora": (3e-3, 1e-2, 3e-2),
               "speft": (3e-3, 1e-2, 3e-2)}
GRID_STEP = math.sqrt(10.0)
MAX_WIDENINGS = 4
MAX_RATE = 1.0


@dataclass(frozen=True)
class Method:
    """One row of a comparison: a family (full, lora, speft) and its settings."""

    name: str
    family: str
    speft: dict[str, Any] = field(default_factory=dict)  # SpeftConfig fields
    lora_rank: int | str | None = None  # an int, or "budget" (closest to SPEFT at 1%)
    budget_rank: int | None = None  # speft: train as many entries as LoRA at this rank has


def lora_params(model: torch.nn.Module, rank: int) -> int:
    """Parameters of LoRA at `rank` on every targeted Linear: r·(in + out) summed."""
    return rank * sum(m.in_features + m.out_features for m in find_target_linears(model).values())


def speft_budget(model: torch.nn.Module, density: float = 0.01) -> int:
    """Sparse entries SPEFT trains at `density` of the targeted weights."""
    return round(density * sum(m.weight.numel() for m in find_target_linears(model).values()))


def lora_budget_rank(model: torch.nn.Module) -> int:
    """The LoRA rank whose adapter size is closest to SPEFT's at 1% (at least 1)."""
    return max(1, round(speft_budget(model) / lora_params(model, 1)))


def _release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), where possible."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _dense_trainable(model: torch.nn.Module, method: Method,
                     data: Data) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """Full fine-tuning or LoRA (peft) set up on the model: the parameters to train."""
    head = list(classification_head(model)) if data.task == "classification" else []
    if method.family == "full":
        model.requires_grad_(True)
        return model, list(model.parameters())
    from peft import LoraConfig, get_peft_model

    rank = lora_budget_rank(model) if method.lora_rank == "budget" else int(method.lora_rank)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                        target_modules=list(find_target_linears(model)),
                        modules_to_save=sorted({name.split(".")[0] for name in head}) or None)
    model = get_peft_model(model, config)
    return model, [p for p in model.parameters() if p.requires_grad]


def _evaluate(model: torch.nn.Module, features: list[dict[str, Any]], data: Data,
              device: torch.device) -> dict[str, float]:
    by_length = sorted(features, key=lambda f: len(f["input_ids"]))  # less padding; same metrics
    batches = ({k: v.to(device) for k, v in b.items()}
               for b in datasets.batches(by_length, data.spec.protocol.batch_size,
                                         pad_token_id=data.pad_token_id, shuffle=False, seed=0))
    return evaluate(model, batches, data.task)


def score_of(row: dict[str, Any], task: str) -> float:
    """What tuning maximises: dev accuracy, or minus dev loss for language models."""
    return row["dev_eval_accuracy"] if task == "classification" else -row["dev_eval_loss"]


def run_one(method: Method, lr: float, seed: int, data: Data, *, device: torch.device,
            recipe: dict[str, Any] | None = None,
            want_test: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """Train one method at one rate and seed: dev (and, where `want_test(row)` says so, test)
    metrics and cost. `recipe` adds SpeftConfig fields to every SPEFT method."""
    protocol = data.spec.protocol
    hyper = TrainConfig(n_epochs=protocol.epochs, batch_size=protocol.batch_size,
                        learning_rate=lr, max_length=protocol.max_length, seed=seed)
    torch.manual_seed(seed)  # the new classification head is drawn here: same seed, same head
    model = load_model(data.path, data.task, labels=data.labels)
    model.requires_grad_(False)
    common = {"task": data.task, "hyper": hyper, "train_features": data.train,
              "pad_token_id": data.pad_token_id, "device": device}
    _release_freed_memory()
    probe = MemoryProbe(device.type)
    probe.start()
    started = time.perf_counter()
    if method.family == "speft":
        settings = {"density": 0.01, "scoring_examples": protocol.scoring_examples,
                    **(recipe or {}), **method.speft}
        if method.budget_rank is not None:
            settings["density"] = lora_params(model, method.budget_rank)
        result = train_sparse(model, speft=SpeftConfig(**settings), base_model=str(data.path),
                              labels=data.labels, **common)
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
    row |= {f"dev_{k}": v for k, v in _evaluate(model, data.dev, data, device).items()}
    if data.test and (want_test is None or want_test(row)):
        row |= {f"test_{k}": v for k, v in _evaluate(model, data.test, data, device).items()}
    if method.family == "speft":
        revert_delta(model)
    return row


def _widened(grid: list[float], best: float) -> float | None:
    """The next rate beyond the edge `best` sits on, or None when it is interior (or capped)."""
    if best == grid[0]:
        return grid[0] / GRID_STEP
    if best == grid[-1] and grid[-1] * GRID_STEP <= MAX_RATE:
        return grid[-1] * GRID_STEP
    return None


def tune(method: Method, data: Data, seed: int, *, device: torch.device,
         grid: tuple[float, ...], widen: bool = True,
         recipe: dict[str, Any] | None = None) -> tuple[float, list[dict[str, Any]], bool]:
    """Tune the rate on dev at `seed`: (best rate, every run, whether the best is interior).

    Starts from `grid`; while the best rate is the grid's lowest or highest point, one more
    point beyond it is tried (up to MAX_WIDENINGS). Test is scored only for a run that leads on
    dev so far, so the chosen rate's run carries its test metrics.
    """
    tried: list[dict[str, Any]] = []

    def leads(row: dict[str, Any]) -> bool:
        return all(score_of(row, data.task) > score_of(r, data.task) for r in tried)

    rates = sorted(grid)
    for lr in rates:
        tried.append(run_one(method, lr, seed, data, device=device, recipe=recipe,
                             want_test=leads))
        log.info("%s tune %s lr=%g: %s", data.spec.name, method.name, lr, tried[-1])
    for _ in range(MAX_WIDENINGS if widen else 0):
        best = max(tried, key=lambda r: score_of(r, data.task))["lr"]
        extra = _widened(rates, best)
        if extra is None:
            break
        rates = sorted([*rates, extra])
        tried.append(run_one(method, extra, seed, data, device=device, recipe=recipe,
                             want_test=leads))
        log.info("%s widen %s lr=%g: %s", data.spec.name, method.name, extra, tried[-1])
    best = max(tried, key=lambda r: score_of(r, data.task))["lr"]
    interior = len(rates) < 3 or best not in (rates[0], rates[-1])
    return best, tried, interior
