"""The SPEFT training loop: score, select the mask, train the sparse delta, return it.

`fine_tune(spec, ...)` runs a whole job from local files; `train_sparse(...)` is the loop on an
already loaded model and tokenised data (the worker and notebooks use either).
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import chat
from . import data as datasets
from .checkpoint import (
    BestSoFar,
    Checkpointer,
    TrainingState,
    capture_rng,
    checkpoint_steps,
    restore_rng,
)
from .config import JobSpec, SpeftConfig, TrainConfig, resolve_auto
from .delta import CHAT_TEMPLATE_KEY, FORMAT, Delta, fingerprint
from .errors import ConfigError, DatasetFormatError, TrainingPaused
from .lengths import effective_max_length
from .masks import MaskUpdate, choose_mask, drop_and_grow, normalise_per_module
from .models import classification_head, load_model, load_tokenizer, resolve_model
from .progress import (
    CHECKPOINTING,
    EVALUATING,
    EVALUATING_BASE,
    HEAD_WARMUP,
    LOADING,
    SCORING_SALIENCE,
    SELECTING_MASK,
    TRAINING,
    PhaseReport,
    PhaseTracker,
    StepReport,
    TrainCallbacks,
)
from .salience import SalienceInputs, compute_salience
from .sparse_linear import SparseDeltaLinear, inject_sparse_deltas, remove_sparse_deltas
from .targets import find_target_linears
from .tasks import batch_loss, evaluate, example_losses

@dataclass
class TrainResult:
    """The trained delta, its evaluation, and the run's bookkeeping."""

    delta: Delta
    eval: dict[str, float] = field(default_factory=dict)
    base_eval: dict[str, float] = field(default_factory=dict)
    trainable_params: int = 0
    steps: int = 0
    mask_updates: int = 0
    seconds: float = 0.0
    best_step: int | None = None  # the checkpoint whose delta this is, with `select: best`
    stopped_early: bool = False
    trained_tokens: int = 0


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _linear_schedule(total: int, warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


class _Trainer:
    """One training run's state; `run()` does the work."""

    def __init__(self, model: nn.Module, *, task: str, speft: SpeftConfig, hyper: TrainConfig,
                 train_features: Sequence[Mapping[str, Any]],
                 eval_features: Sequence[Mapping[str, Any]] | None, pad_token_id: int,
                 callbacks: TrainCallbacks, device: torch.device,
                 make_delta: Callable[[Mapping[str, tuple[torch.Tensor, torch.Tensor]]], Delta]
                 | None = None) -> None:
        self.model, self.task, self.speft, self.hyper = model, task, speft, hyper
        self.train_features, self.eval_features = train_features, eval_features
        self.pad_token_id, self.callbacks, self.device = pad_token_id, callbacks, device
        self.make_delta = make_delta
        self.scoring_round = 0
        self.best_step: int | None = None
        self.stopped_early = False
        self.trained_tokens = 0
        # training examples to score on, and those the head warm-up trains on
        self.scoring_pool, self.warmup_pool = self._holdout_split()
        self.phases = PhaseTracker(callbacks, total_steps=self._total_steps())

    # -- data -----------------------------------------------------------------------------
    def _batches(self, features, *, shuffle: bool, seed: int, size: int | None = None):
        for batch in datasets.batches(features, size or self.hyper.batch_size,
                                      pad_token_id=self.pad_token_id, shuffle=shuffle, seed=seed):
            yield _to(batch, self.device)

    def _holdout_split(self) -> tuple[list[int], list[int]]:
        """(held-out, the rest) indices of the training examples: `scoring_holdout` of them
        (seeded; at least one, and at least one left) for scoring only, the rest for the head
        warm-up. Nothing is held out at 0."""
        n = len(self.train_features)
        if self.speft.scoring_holdout == 0 or n < 2:
            return list(range(n)), list(range(n))
        held = min(n - 1, max(1, round(float(self.speft.scoring_holdout) * n)))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(
            self.hyper.seed + 15_485_863)).tolist()
        return sorted(order[:held]), sorted(order[held:])

    def _scoring_batches(self) -> list[dict[str, torch.Tensor]]:
        """`scoring_examples` training examples (of the held-out part, when there is one), a
        fresh draw each round (dynamic masks)."""
        seed = self.hyper.seed + 7919 * (self.scoring_round + 1)
        self.scoring_round += 1
        pool = self.scoring_pool
        count = min(self.speft.scoring_examples, len(pool))
        order = torch.randperm(len(pool),
                               generator=torch.Generator().manual_seed(seed))[:count].tolist()
        chosen = [self.train_features[pool[i]] for i in order]
        size = self.speft.scoring_batch_size or self.hyper.batch_size
        return list(self._batches(chosen, shuffle=False, seed=seed, size=size))

    def _eval(self, phase: str = EVALUATING) -> dict[str, float]:
        if not self.eval_features:
            return {}
        self.phases.enter(phase, total=len(self.eval_features))
        with _autocast(self.device):
            return evaluate(self.model, self.phases.iterate(
                self._batches(self.eval_features, shuffle=False, seed=0)), self.task)

    # -- salience and masks ---------------------------------------------------------------
    def _scores(self, targets: Mapping[str, nn.Linear]) -> dict[str, torch.Tensor]:
        inputs = SalienceInputs(
            model=self.model, targets=targets,
            batches=self.phases.track(SCORING_SALIENCE, self._scoring_batches()),
            loss_fn=lambda m, b: example_losses(m, b, self.task), seed=self.hyper.seed,
        )
        with _autocast(self.device):
            return compute_salience(self.speft.metric, inputs)

    def _update_mask(self, layers: Mapping[str, SparseDeltaLinear],
                     optimizer: torch.optim.Optimizer) -> int:
        """Dynamic mask: re-score the current model, drop smallest |value|, grow top salience."""
        scores = self._scores({n: layer.base for n, layer in layers.items()})
        self.phases.enter(SELECTING_MASK)
        if self.speft.score_normalization == "module":
            normalise_per_module(scores)
        current = {n: (layer.indices, layer.values.detach()) for n, layer in layers.items()}
        updates = drop_and_grow(current, scores, self.speft.update_fraction, self.speft.scope,
                                consume_scores=True)
        del scores
        moved = 0
        for name, layer in layers.items():
            moved += int((updates[name].source < 0).sum())
            _move_layer_mask(layer, updates[name], optimizer)
        return moved

    def _warm_up_head(self) -> None:
        """`head_warmup_steps` AdamW steps on the new classification head alone, before scoring:
        the backward pass stops at the head, so each costs about one forward pass."""
        steps = self.speft.head_warmup_steps
        if steps == 0 or self.task != "classification":
            return
        self.phases.enter(HEAD_WARMUP, total=steps)
        head = list(classification_head(self.model).values())
        for p in head:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(head, weight_decay=0.0,
                                      lr=self.hyper.head_learning_rate or self.hyper.learning_rate)
        self.model.train()
        done, losses = 0, []
        warmup_features = [self.train_features[i] for i in self.warmup_pool]
        while done < steps:
            for batch in self._batches(warmup_features, shuffle=True,
                                       seed=self.hyper.seed + 104_729 + done):
                self.phases.stop()
                with _autocast(self.device):
                    loss = batch_loss(self.model, batch, self.task)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                done += 1
                self.phases.advance(done)
                if done == steps:
                    break
        self.model.eval()
        self.callbacks.event("head warmed up", steps=steps, loss=round(losses[-1], 4))

    # -- the loop -------------------------------------------------------------------------
    def _update_interval(self) -> int | None:
        """Steps between re-selections of this run's mask; None for a static mask."""
        if self.speft.mask_for(self.task) != "dynamic":
            return None
        return self.speft.update_interval_for(self._total_steps())

    def _select_mask(self, targets: Mapping[str, nn.Linear],
                     interval: int | None) -> dict[str, torch.Tensor]:
        self._warm_up_head()
        started = time.perf_counter()
        scores = self._scores(targets)
        self.phases.enter(SELECTING_MASK)
        masks = choose_mask(scores, self.speft, seed=self.hyper.seed, task=self.task)
        del scores
        self.callbacks.event("mask selected", metric=self.speft.metric,
                             mask="static" if interval is None else "dynamic",
                             **({} if interval is None else {"update_interval": interval}),
                             spread_cap=self.speft.spread_cap_for(self.task),
                             nnz=sum(int(m.numel()) for m in masks.values()),
                             targeted=sum(t.weight.numel() for t in targets.values()),
                             seconds=round(time.perf_counter() - started, 3))
        return masks

    def _head(self) -> dict[str, nn.Parameter]:
        return classification_head(self.model) if self.task == "classification" else {}

    def run(self, resume: TrainingState | None = None) -> tuple[int, int, dict[str, float]]:
        """Select the mask (or take the resumed state's) and train; returns the steps, mask
        updates and last evaluation. With `select: best` the layers end holding the best
        checkpoint's values."""
        targets = find_target_linears(self.model, self.speft.target_modules)
        interval = self._update_interval()
        if resume is None:
            layers = inject_sparse_deltas(self.model, self._select_mask(targets, interval))
        else:
            if set(resume.masks) != set(targets):
                raise ConfigError("the training state was saved for other target modules",
                                  param="target_modules")
            layers = inject_sparse_deltas(self.model, {n: resume.masks[n] for n in targets},
                                          resume.values)
            _load_head(self._head(), resume.head)
            self.scoring_round = resume.scoring_round
        optimizer = self._optimizer(layers)
        mask_updates = resume.mask_updates if resume else 0
        if resume is not None:
            optimizer.load_state_dict(resume.optimizer)
            self.callbacks.event(f"resumed from step {resume.step}", step=resume.step)

        def after_step(step: int, total: int) -> None:
            nonlocal mask_updates
            if interval is not None and step % interval == 0 and step < total:
                grown = self._update_mask(layers, optimizer)
                mask_updates += 1
                self.callbacks.event("mask updated", step=step, grown=grown)

        def live() -> tuple[dict, dict, dict]:
            return ({n: layer.indices for n, layer in layers.items()},
                    {n: layer.values.detach() for n, layer in layers.items()},
                    {n: p.detach() for n, p in self._head().items()})

        def state(step: int, epoch: int, groups_done: int, scheduler) -> TrainingState:
            masks, values, head = live()
            return TrainingState(step=step, epoch=epoch, groups_done=groups_done, masks=masks,
                                 values=values, head=head, optimizer=optimizer.state_dict(),
                                 scheduler=scheduler.state_dict(), rng=capture_rng(),
                                 scoring_round=self.scoring_round, mask_updates=mask_updates,
                                 best=checkpointer.best, trained_tokens=self.trained_tokens)

        checkpointer = Checkpointer(
            best=resume.best if resume else BestSoFar(), select=self.hyper.select,
            early_stopping=self.hyper.early_stopping, snapshot=live,
            make_delta=lambda: self.make_delta(
                {n: (layer.indices, layer.values) for n, layer in layers.items()}),
            make_state=state, on_checkpoint=self.callbacks.on_checkpoint,
            on_event=self.callbacks.event)
        step, metrics = self.optimize(optimizer, after_step, checkpointer=checkpointer,
                                      resume=resume)
        self.stopped_early = checkpointer.stopped_early
        best = checkpointer.best
        if self.hyper.select == "best" and best.step:
            self.best_step = best.step
            if best.step != step:
                for name, layer in layers.items():
                    layer.set_mask(best.masks[name], best.values[name])
                _load_head(self._head(), best.head)
                self.callbacks.event("best checkpoint selected", step=best.step,
                                     valid_loss=round(best.loss, 6))
        return step, mask_updates, metrics

    def _steps_per_epoch(self) -> int:
        batches = math.ceil(len(self.train_features) / self.hyper.batch_size)
        return math.ceil(batches / self.hyper.gradient_accumulation_steps)

    def _total_steps(self) -> int:
        """Optimizer steps in the whole run (early stopping may end it sooner)."""
        return self._steps_per_epoch() * self.hyper.n_epochs

    def optimize(self, optimizer: torch.optim.Optimizer,
                 after_step: Callable[[int, int], None] | None = None, *,
                 checkpointer: Checkpointer | None = None,
                 resume: TrainingState | None = None) -> tuple[int, dict[str, float]]:
        """The loop every method shares: epochs of (accumulated) steps with AdamW, linear
        warm-up and decay, clipping, callbacks, and an evaluation at each checkpoint step (by
        default at the end of every epoch). With a `checkpointer` every such step is also a
        checkpoint, and early stopping may end the run; with `resume` the loop continues from
        that state's step, data position, scheduler and RNG."""
        hyper, callbacks = self.hyper, self.callbacks
        steps_per_epoch = self._steps_per_epoch()
        total = self._total_steps()
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _linear_schedule(total, int(round(hyper.warmup_ratio * total)))
        )
        evaluate_at = set(checkpoint_steps(total, steps_per_epoch,
                                           n_checkpoints=hyper.n_checkpoints,
                                           every_steps=hyper.checkpoint_every_steps))
        step, first_epoch, skip = 0, 0, 0
        if resume is not None:
            scheduler.load_state_dict(resume.scheduler)
            for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
                group["lr"] = lr  # building the scheduler reset them to step 0's
            step, first_epoch, skip = resume.step, resume.epoch, resume.groups_done
            self.trained_tokens = resume.trained_tokens
            restore_rng(resume.rng)
        metrics: dict[str, float] = {}
        self.model.train()
        for epoch in range(first_epoch, hyper.n_epochs):
            for index, group in enumerate(self._accumulation_groups(epoch)):
                if epoch == first_epoch and index < skip:
                    continue  # trained before the resumed state was taken
                self.phases.enter(TRAINING, total=total, step=step)
                callbacks.check_stop()
                if checkpointer is not None and callbacks.should_pause and callbacks.should_pause():
                    self.phases.enter(CHECKPOINTING)
                    checkpointer.pause(step=step, total=total, epoch=epoch,
                                       resume_at=(epoch, index), scheduler=scheduler)
                    raise TrainingPaused(f"training paused on request after step {step}",
                                         step=step)
                loss_sum = 0.0
                self.trained_tokens += sum(int(b["attention_mask"].sum()) for b in group)
                for batch in group:
                    with _autocast(self.device):
                        loss = batch_loss(self.model, batch, self.task) / len(group)
                    loss.backward()
                    loss_sum += loss.item()
                del loss  # free the graph: a mask update may resize the values it points to
                trainable = [p for g in optimizer.param_groups for p in g["params"]]
                grad_norm = float(torch.nn.utils.clip_grad_norm_(
                    trainable, hyper.max_grad_norm if hyper.max_grad_norm > 0 else float("inf")))
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if callbacks.on_step is not None:
                    callbacks.on_step(StepReport(step, total, epoch, loss_sum, lr, grad_norm,
                                                 self.trained_tokens))
                if after_step is not None:
                    after_step(step, total)
                if step not in evaluate_at:
                    continue
                metrics = self._eval()
                if metrics and callbacks.on_eval is not None:
                    callbacks.on_eval(step, {**metrics, "epoch": epoch})
                resume_at = ((epoch + 1, 0) if index + 1 == steps_per_epoch
                             else (epoch, index + 1))
                if checkpointer is not None and callbacks.on_checkpoint is not None:
                    self.phases.enter(CHECKPOINTING)
                if checkpointer is not None and checkpointer.take(
                        step=step, total=total, epoch=epoch, resume_at=resume_at,
                        scheduler=scheduler, train_loss=loss_sum, evaluation=metrics):
                    self.model.eval()
                    return step, metrics
        self.model.eval()
        return step, metrics

    def _accumulation_groups(self, epoch: int) -> Iterator[list[dict[str, torch.Tensor]]]:
        group: list[dict[str, torch.Tensor]] = []
        for batch in self._batches(self.train_features, shuffle=True, seed=self.hyper.seed + epoch):
            group.append(batch)
            if len(group) == self.hyper.gradient_accumulation_steps:
                yield group
                group = []
        if group:
            yield group

    def _optimizer(self, layers: Mapping[str, SparseDeltaLinear]) -> torch.optim.Optimizer:
        groups: list[dict[str, Any]] = [{
            "params": [layer.values for layer in layers.values()],
            "lr": self.hyper.learning_rate, "weight_decay": self.hyper.weight_decay,
        }]
        if self.task == "classification":
            head = list(classification_head(self.model).values())
            for p in head:
                p.requires_grad_(True)
            groups.append({"params": head, "weight_decay": 0.0,
                           "lr": self.hyper.head_learning_rate or self.hyper.learning_rate})
        return torch.optim.AdamW(groups, lr=self.hyper.learning_rate)


def _load_head(head: Mapping[str, nn.Parameter], saved: Mapping[str, torch.Tensor]) -> None:
    """Copy saved classification-head tensors into the live head (same names, same shapes)."""
    with torch.no_grad():
        for name, param in head.items():
            param.copy_(saved[name].to(param.device))


def _move_layer_mask(layer: SparseDeltaLinear, update: MaskUpdate,
                     optimizer: torch.optim.Optimizer) -> None:
    """Give a layer its new mask; kept entries keep their optimizer moments, new ones start at 0."""
    state = optimizer.state.get(layer.values, {})
    old_shape = layer.values.shape
    layer.set_mask(update.indices, update.values)
    kept = update.source >= 0
    for key, moment in list(state.items()):
        if torch.is_tensor(moment) and moment.shape == old_shape:  # per entry, not the step count
            moved = torch.zeros_like(layer.values)
            moved[kept] = moment[update.source[kept].to(moment.device)]
            state[key] = moved


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@contextlib.contextmanager
def gradient_checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """HF gradient checkpointing (non-reentrant, so frozen inputs need no grad) for the block."""
    if not enabled:
        yield
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{type(model).__name__} does not support gradient checkpointing",
                          param="hyperparameters.gradient_checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 names
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        disable = model.activation_checkpointing_disable
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        disable = model.gradient_checkpointing_disable
    try:
        yield
    finally:
        disable()


def train_sparse(
    model: nn.Module,
    *,
    task: str,
    speft: SpeftConfig,
    hyper: TrainConfig,
    train_features: Sequence[Mapping[str, Any]],
    eval_features: Sequence[Mapping[str, Any]] | None = None,
    pad_token_id: int,
    base_model: str,
    labels: Sequence[str] | None = None,
    callbacks: TrainCallbacks | None = None,
    device: torch.device | None = None,
    chat_template: str | None = None,
    resume: TrainingState | None = None,
) -> TrainResult:
    """Train a sparse delta on a loaded model; the model's base weights are restored afterwards.

    `chat_template` (the features are chat conversations rendered with it) goes into the
    delta's metadata for serving. `resume` continues a run from a state its checkpoint
    callback saved (same model, data and settings), skipping salience scoring.
    """
    callbacks = callbacks or TrainCallbacks()
    device = device or default_device()
    hyper = resolve_auto(hyper, len(train_features))
    torch.manual_seed(hyper.seed)
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    targets = find_target_linears(model, speft.target_modules)
    metadata = {
        "format": FORMAT, "base_model": base_model, "base_fingerprint": fingerprint(model, targets),
        "metric": speft.metric, "density": str(speft.density), "task": task,
        "labels": json.dumps(list(labels or [])), "mask": speft.mask_for(task), "scope": speft.scope,
        **({CHAT_TEMPLATE_KEY: chat_template} if chat_template is not None else {}),
        "base_dtype": ",".join(sorted({_dtype_name(t.weight.dtype) for t in targets.values()})),
    }

    def make_delta(modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> Delta:
        extras = ({n: p.detach().cpu().clone() for n, p in classification_head(model).items()}
                  if task == "classification" else {})
        nnz = sum(int(i.numel()) for i, _ in modules.values())
        return Delta(modules={n: (i.cpu().clone(), v.detach().cpu().clone())
                              for n, (i, v) in modules.items()},
                     extras=extras, metadata={**metadata, "nnz": str(nnz)})

    trainer = _Trainer(model, task=task, speft=speft, hyper=hyper, train_features=train_features,
                       eval_features=eval_features, pad_token_id=pad_token_id,
                       callbacks=callbacks, device=device, make_delta=make_delta)
    started = time.perf_counter()
    if resume is not None:
        trainer.phases.pause_step = resume.step
    base_eval = trainer._eval(EVALUATING_BASE)
    if base_eval:
        callbacks.event("base model evaluated", **base_eval)
    try:
        with gradient_checkpointing(model, hyper.gradient_checkpointing):
            steps, mask_updates, final_eval = trainer.run(resume)
    finally:
        modules = remove_sparse_deltas(model)  # restores the base weights bit for bit
    delta = make_delta(modules)
    return TrainResult(delta=delta, eval=final_eval, base_eval=base_eval,
                       trainable_params=delta.nnz + sum(e.numel() for e in delta.extras.values()),
                       steps=steps, mask_updates=mask_updates,
                       seconds=time.perf_counter() - started, best_step=trainer.best_step,
                       stopped_early=trainer.stopped_early, trained_tokens=trainer.trained_tokens)


def train_parameters(
    model: nn.Module,
    param_groups: Sequence[dict[str, Any]],
    *,
    task: str,
    hyper: TrainConfig,
    train_features: Sequence[Mapping[str, Any]],
    eval_features: Sequence[Mapping[str, Any]] | None = None,
    pad_token_id: int,
    callbacks: TrainCallbacks | None = None,
    device: torch.device | None = None,
) -> tuple[int, dict[str, float]]:
    """Train the given parameters with SPEFT's own loop (baselines: full fine-tuning, LoRA).

    `param_groups` are AdamW groups (`params`, optional `lr`, `weight_decay`); the model is
    moved to `device` first, and only those parameters change. Returns (steps, last eval).
    """
    device = device or default_device()
    hyper = resolve_auto(hyper, len(train_features))
    torch.manual_seed(hyper.seed)
    model.to(device)
    trainer = _Trainer(model, task=task, speft=SpeftConfig(), hyper=hyper,
                       train_features=train_features, eval_features=eval_features,
                       pad_token_id=pad_token_id, callbacks=callbacks or TrainCallbacks(),
                       device=device)
    groups = [{"weight_decay": hyper.weight_decay, "lr": hyper.learning_rate, **group}
              for group in param_groups]
    return trainer.optimize(torch.optim.AdamW(groups, lr=hyper.learning_rate))


def fine_tune(
    spec: JobSpec,
    *,
    callbacks: TrainCallbacks | None = None,
    device: torch.device | None = None,
    resume: TrainingState | None = None,
) -> TrainResult:
    """Run a whole job from local JSONL files: load data and model, train, return the delta
    (`resume`: continue from a state an earlier run of the same job saved at a checkpoint)."""
    hyper = spec.hyperparameters
    callbacks = callbacks or TrainCallbacks()
    callbacks.phase(PhaseReport(LOADING))
    source = resolve_model(spec.model, spec.task)
    train_examples = datasets.read_jsonl(spec.training_file, spec.task)
    eval_examples = (datasets.read_jsonl(spec.validation_file, spec.task)
                     if spec.validation_file else None)
    tokenizer = load_tokenizer(source.path)
    labels = datasets.label_set(train_examples) if spec.task == "classification" else None
    if labels is not None:
        datasets.check_label_sets(labels, datasets.label_set(eval_examples or []))
    label2id = {label: i for i, label in enumerate(labels)} if labels else None
    torch.manual_seed(hyper.seed)  # a new classification head is drawn here: same seed, same head
    dtype = hyper.dtype if hyper.dtype != "auto" else source.dtype
    model = load_model(source.path, spec.task, labels=labels, dtype=dtype)
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and isinstance(hyper.max_length, int) and (
            hyper.max_length > positions):
        raise ConfigError(f"max_length {hyper.max_length} is beyond the {positions} positions "
                          f"of {source.name}", param="hyperparameters.max_length")
    max_length = effective_max_length(tokenizer, hyper.max_length, positions)  # 'auto': context
    if hyper.early_stopping is not None and not eval_examples:
        raise ConfigError("early_stopping watches the validation loss: give a validation_file",
                          param="hyperparameters.early_stopping")
    is_chat = isinstance(train_examples[0], datasets.ChatExample)
    choice = (chat.choose_chat_template(tokenizer, [*train_examples, *(eval_examples or [])])
              if is_chat else None)
    template = choice.template if choice else None
    if choice and choice.unrendered:
        callbacks.event("the model's chat template leaves out fields the data uses; the default "
                        "chat template is used", fields=list(choice.unrendered))

    def tokenize(examples: Sequence[datasets.Example], param: str) -> list[dict[str, Any]]:
        if isinstance(examples[0], datasets.ChatExample) != is_chat:
            raise DatasetFormatError("the validation file must be chat rows exactly when the "
                                     "training file is", param="validation_file")
        if not is_chat:
            return datasets.tokenize(examples, tokenizer, spec.task, max_length=max_length,
                                     label2id=label2id)
        result = chat.tokenize_chat(examples, tokenizer, max_length=max_length, template=template)
        if result.dropped_lines:
            callbacks.event("conversations longer than max_length dropped", file=param,
                            count=len(result.dropped_lines), lines=result.dropped_lines[:20],
                            max_length=max_length)
        return result.features

    return train_sparse(
        model, task=spec.task, speft=spec.speft, hyper=hyper,
        train_features=tokenize(train_examples, "training_file"),
        eval_features=tokenize(eval_examples, "validation_file") if eval_examples else None,
        pad_token_id=tokenizer.pad_token_id, base_model=source.name, labels=labels,
        callbacks=callbacks, device=device, chat_template=template, resume=resume,
    )
