"""Long runs: when to checkpoint, which checkpoint is best, when to stop early, and the whole
training state a run resumes from.

A checkpoint is taken after an optimizer step (`checkpoint_steps`): the validation set is
scored there, and the caller receives the delta as it stands and, on request, the
`TrainingState` — everything the loop needs to continue exactly as if it had never stopped:
the masks and values, the classification head, AdamW's moments, the scheduler's position,
where in which epoch's data order the next step starts, the RNG states, and the best
checkpoint so far (kept for `select: "best"`). On the CPU a resumed run's final delta equals
an uninterrupted run's bit for bit (`tests/core/test_checkpoint.py`).
"""
from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

STATE_FORMAT = "speft-training-state/1"


def checkpoint_steps(total: int, steps_per_epoch: int, *, n_checkpoints: int | None,
                     every_steps: int | None) -> list[int]:
    """The optimizer steps after which a checkpoint is taken, ascending, always ending at
    `total`: every `every_steps` steps, else `n_checkpoints` evenly spaced, else one per epoch."""
    if total <= 0:
        return []
    if every_steps:
        steps = set(range(every_steps, total + 1, every_steps))
    elif n_checkpoints:
        count = min(n_checkpoints, total)
        steps = {math.ceil(total * i / count) for i in range(1, count + 1)}
    else:
        steps = set(range(steps_per_epoch, total + 1, steps_per_epoch))
    return sorted(steps | {total})


def validation_score(metrics: dict[str, float]) -> float | None:
    """What "best" means: the lowest validation loss (None without a validation set)."""
    return metrics.get("eval_loss")


@dataclass
class BestSoFar:
    """The best checkpoint so far and how many checkpoints since it failed to improve."""

    step: int = 0
    loss: float = math.inf
    stale: int = 0
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    head: dict[str, torch.Tensor] = field(default_factory=dict)

    def update(self, step: int, loss: float, min_delta: float) -> bool:
        """Record a checkpoint's validation loss; True when it is the new best (it improved on
        the best by more than `min_delta`, or it is the first)."""
        if self.step == 0 or loss < self.loss - min_delta:
            self.step, self.loss, self.stale = step, loss, 0
            return True
        self.stale += 1
        return False


@dataclass
class TrainingState:
    """Where a run stands after `step` optimizer steps (see the module docstring)."""

    step: int
    epoch: int  # the epoch the next step belongs to
    groups_done: int  # accumulation groups of that epoch already trained
    masks: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, torch.Tensor]
    scoring_round: int = 0
    mask_updates: int = 0
    best: BestSoFar = field(default_factory=BestSoFar)
    trained_tokens: int = 0


def capture_rng() -> dict[str, torch.Tensor]:
    """The torch RNG states (CPU, and every CUDA device where there is one)."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states |= {f"cuda:{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return states


def restore_rng(states: dict[str, torch.Tensor]) -> None:
    """Put back RNG states taken by `capture_rng`."""
    torch.set_rng_state(states["cpu"])
    cuda = [states[f"cuda:{i}"] for i in range(torch.cuda.device_count()) if f"cuda:{i}" in states]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().cpu().clone() for name, t in tensors.items()}


def state_to_bytes(state: TrainingState) -> bytes:
    """Serialise a training state (torch.save of plain containers of tensors and numbers)."""
    best = state.best
    payload = {
        "format": STATE_FORMAT, "step": state.step, "epoch": state.epoch,
        "groups_done": state.groups_done, "masks": _cpu(state.masks),
        "values": _cpu(state.values), "head": _cpu(state.head),
        "optimizer": state.optimizer, "scheduler": state.scheduler, "rng": state.rng,
        "scoring_round": state.scoring_round, "mask_updates": state.mask_updates,
        "trained_tokens": state.trained_tokens,
        "best": {"step": best.step, "loss": best.loss, "stale": best.stale,
                 "masks": _cpu(best.masks), "values": _cpu(best.values), "head": _cpu(best.head)},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def state_from_bytes(data: bytes) -> TrainingState:
    """Read a state written by `state_to_bytes` (tensors only: `weights_only` loading, so a
    crafted file cannot run code); ValueError when it is not one."""
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"not a training state: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        raise ValueError("not a training state (format mismatch)")
    best = payload["best"]
    return TrainingState(
        step=payload["step"], epoch=payload["epoch"], groups_done=payload["groups_done"],
        masks=payload["masks"], values=payload["values"], head=payload["head"],
        optimizer=payload["optimizer"], scheduler=payload["scheduler"], rng=payload["rng"],
        scoring_round=payload["scoring_round"], mask_updates=payload["mask_updates"],
        trained_tokens=payload.get("trained_tokens", 0),
        best=BestSoFar(step=best["step"], loss=best["loss"], stale=best["stale"],
                       masks=best["masks"], values=best["values"], head=best["head"]))


@dataclass(frozen=True)
class CheckpointReport:
    """What the checkpoint callback receives. `delta()` and `state()` build the delta and the
    training state as they stand: call them during the callback, before training moves on."""

    step: int
    total_steps: int
    epoch: int
    metrics: dict[str, float]  # train_loss, valid_loss, valid_accuracy / valid_mean_token_...
    is_best: bool
    delta: Callable[[], Any]
    state: Callable[[], TrainingState]


def report_metrics(train_loss: float, evaluation: dict[str, float]) -> dict[str, float]:
    """A checkpoint's metrics in OpenAI's names: train_loss and valid_* for each eval_*."""
    return {"train_loss": train_loss,
            **{"valid_" + k.removeprefix("eval_"): v for k, v in evaluation.items()
               if k != "eval_perplexity"}}


class Checkpointer:
    """Takes the checkpoints of one run: tracks the best, decides early stopping, hands each
    checkpoint to the callback. `snapshot()` returns the live masks, values and head."""

    def __init__(self, *, best: BestSoFar, select: str,
                 early_stopping: Any | None, snapshot: Callable[[], tuple[dict, dict, dict]],
                 make_delta: Callable[[], Any],
                 make_state: Callable[[int, int, int, Any], TrainingState],
                 on_checkpoint: Callable[[CheckpointReport], None] | None,
                 on_event: Callable[..., None]) -> None:
        self.best, self.select = best, select
        self.early_stopping, self.snapshot = early_stopping, snapshot
        self.make_delta, self.make_state = make_delta, make_state
        self.on_checkpoint, self.on_event = on_checkpoint, on_event
        self.stopped_early = False

    def _hand_over(self, *, step: int, total: int, epoch: int, resume_at: tuple[int, int],
                   scheduler: Any, metrics: dict[str, float], is_best: bool) -> None:
        """Give the callback its report; the state is built only if it asks."""
        if self.on_checkpoint is not None:
            self.on_checkpoint(CheckpointReport(
                step=step, total_steps=total, epoch=epoch, metrics=metrics, is_best=is_best,
                delta=self.make_delta,
                state=lambda: self.make_state(step, *resume_at, scheduler)))

    def pause(self, *, step: int, total: int, epoch: int, resume_at: tuple[int, int],
              scheduler: Any) -> None:
        """A checkpoint of where the run stands, without evaluation, for a pause."""
        self._hand_over(step=step, total=total, epoch=epoch, resume_at=resume_at,
                        scheduler=scheduler, metrics={}, is_best=False)

    def take(self, *, step: int, total: int, epoch: int, resume_at: tuple[int, int],
             scheduler: Any, train_loss: float, evaluation: dict[str, float]) -> bool:
        """The checkpoint after `step` (of `epoch`; the next step is group `resume_at[1]` of
        epoch `resume_at[0]`; `scheduler` is saved in its state); True when training should
        stop early."""
        loss = validation_score(evaluation)
        is_best = False
        if loss is not None:
            min_delta = self.early_stopping.min_delta if self.early_stopping else 0.0
            is_best = self.best.update(step, loss, min_delta)
            if is_best and self.select == "best":
                masks, values, head = self.snapshot()
                self.best.masks, self.best.values, self.best.head = (
                    _cpu(masks), _cpu(values), _cpu(head))
        self._hand_over(step=step, total=total, epoch=epoch, resume_at=resume_at,
                        scheduler=scheduler, metrics=report_metrics(train_loss, evaluation),
                        is_best=is_best)
        patience = self.early_stopping.patience if self.early_stopping else None
        if loss is not None and patience is not None and self.best.stale >= patience and step < total:
            self.stopped_early = True
            self.on_event("early stopping", step=step, best_step=self.best.step,
                          best_valid_loss=round(self.best.loss, 6), patience=patience,
                          reason=f"validation loss did not improve by more than "
                                 f"{self.early_stopping.min_delta:g} for {patience} "
                                 "checkpoints in a row")
            return True
        return False
