"""What a run tells its caller while it goes, and how the caller stops it.

`TrainCallbacks` are the hooks a caller plugs in: step reports, evaluations, free-form events,
phase reports, and the cancel and pause checks. A run goes through named phases (`PHASES`), each
with its own progress: `evaluating_base` and `evaluating` count examples evaluated,
`head_warmup` its steps, `scoring_salience` examples scored (per pass over the scoring set),
`training` optimizer steps; `loading`, `selecting_mask` (top-k of the scores, or a dynamic
mask's drop and grow), `checkpointing` and `saving` (the caller's upload of the result) report
none. `PhaseTracker` reports them and polls the stop check between batches, so a
cancel (or, before training has begun, a pause) stops scoring and evaluation within a batch.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from .checkpoint import CheckpointReport
from .errors import TrainingCancelled, TrainingPaused

log = logging.getLogger(__name__)

LOADING = "loading"
EVALUATING_BASE = "evaluating_base"
HEAD_WARMUP = "head_warmup"
SCORING_SALIENCE = "scoring_salience"
SELECTING_MASK = "selecting_mask"
TRAINING = "training"
EVALUATING = "evaluating"
CHECKPOINTING = "checkpointing"
SAVING = "saving"
PHASES = (LOADING, EVALUATING_BASE, HEAD_WARMUP, SCORING_SALIENCE, SELECTING_MASK, TRAINING,
          EVALUATING, CHECKPOINTING, SAVING)

Batch = TypeVar("Batch", bound=Mapping[str, Any])


@dataclass(frozen=True)
class StepReport:
    """What the step callback receives after every optimizer step."""

    step: int
    total_steps: int
    epoch: int
    train_loss: float
    lr: float
    grad_norm: float
    tokens: int = 0  # tokens trained on so far (attention-mask ones over every step's batches)


@dataclass(frozen=True)
class PhaseReport:
    """What the phase callback receives on entering a phase and as the phase advances."""

    phase: str  # one of PHASES
    step: int = 0  # units of this phase done (examples, or steps: see the module's docstring)
    total: int | None = None  # units this phase (pass) has; None when it counts none
    total_steps: int | None = None  # the run's planned optimizer steps, once known


@dataclass
class TrainCallbacks:
    """Hooks the caller plugs in: progress, evaluation, free-form events, phases, and the checks
    that stop a run (polled between batches and steps)."""

    on_step: Callable[[StepReport], None] | None = None
    on_eval: Callable[[int, dict[str, float]], None] | None = None
    on_event: Callable[[str, dict[str, Any]], None] | None = None
    should_cancel: Callable[[], bool] | None = None
    on_checkpoint: Callable[[CheckpointReport], None] | None = None
    should_pause: Callable[[], bool] | None = None  # checkpoint, then raise TrainingPaused
    on_phase: Callable[[PhaseReport], None] | None = None

    def event(self, message: str, **data: Any) -> None:
        """Forward an event to the caller and the log."""
        log.info("speft.train %s %s", message, data)
        if self.on_event is not None:
            self.on_event(message, data)

    def phase(self, report: PhaseReport) -> None:
        """Forward a phase report to the caller."""
        if self.on_phase is not None:
            self.on_phase(report)

    def check_stop(self, *, pause_step: int | None = None) -> None:
        """Raise TrainingCancelled when a cancel was requested; with `pause_step` (the last step
        done, when there is nothing to checkpoint) also raise TrainingPaused on a pause request."""
        if self.should_cancel is not None and self.should_cancel():
            raise TrainingCancelled("training cancelled on request")
        if pause_step is not None and self.should_pause is not None and self.should_pause():
            raise TrainingPaused(f"training paused on request after step {pause_step}",
                                 step=pause_step)


def examples_in(batch: Mapping[str, Any]) -> int:
    """How many examples a batch holds (the leading size of its tensors)."""
    return len(next(iter(batch.values())))


class PhaseTracker:
    """The phase a run is in: reported when it changes and as it advances, each report with the
    run's planned steps; the stop check its batches poll. Until training begins a pause stops
    the run at once (there is no state to checkpoint yet: it resumes from `pause_step`'s
    checkpoint, or from the start); afterwards only a cancel does, and the training loop
    checkpoints before it pauses."""

    def __init__(self, callbacks: TrainCallbacks, *, total_steps: int,
                 pause_step: int | None = 0) -> None:
        self.callbacks, self.total_steps, self.pause_step = callbacks, total_steps, pause_step
        self.phase: str | None = None
        self.total: int | None = None

    def enter(self, phase: str, total: int | None = None, step: int = 0) -> None:
        """Report entering `phase` (of `total` units, `step` of them done); nothing when the run
        is in it already."""
        if phase == TRAINING:
            self.pause_step = None
        if phase == self.phase:
            return
        self.phase, self.total = phase, total
        self.advance(step)

    def advance(self, step: int) -> None:
        """Report `step` units of the current phase done."""
        if self.phase is not None:
            self.callbacks.phase(PhaseReport(self.phase, step, self.total, self.total_steps))

    def stop(self) -> None:
        """Raise if the run should stop now (see the class docstring)."""
        self.callbacks.check_stop(pause_step=self.pause_step)

    def iterate(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        """`batches`, polling the stop check before each and reporting the examples done after
        each."""
        done = 0
        for batch in batches:
            self.stop()
            yield batch
            done += examples_in(batch)
            self.advance(done)

    def track(self, phase: str, batches: Sequence[Batch]) -> Sequence[Batch]:
        """Enter `phase`, counting the examples of `batches`; the batches, each pass over them
        tracked by `iterate`."""
        self.enter(phase, total=sum(examples_in(batch) for batch in batches))
        return TrackedBatches(self, batches)


class TrackedBatches(Sequence[Batch]):
    """A sequence of batches whose every pass is tracked by its phase tracker (a scorer may
    index it, or pass over it more than once)."""

    def __init__(self, tracker: PhaseTracker, batches: Sequence[Batch]) -> None:
        self.tracker, self.batches = tracker, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: Any) -> Any:
        return self.batches[index]

    def __iter__(self) -> Iterator[Batch]:
        return self.tracker.iterate(self.batches)
