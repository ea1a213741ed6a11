"""Training callbacks that record a running attempt: progress, phases, metrics, events, cancel
polls."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from api.core.models import JobStatus, utcnow
from api.core.storage import Storage
from api.core.unit_of_work import commit_and_run
from api.services.checkpoints import record_checkpoint
from api.services.job_progress import record_phase
from api.services.job_runs import json_safe
from api.services.jobs import add_event, record_eval, record_progress, stop_requested
from speft_core.checkpoint import CheckpointReport, state_to_bytes
from speft_core.delta import delta_to_bytes
from speft_core.progress import LOADING, PhaseReport, StepReport, TrainCallbacks
from worker.heartbeat import ProgressClock

CANCEL_POLL_S = 2.0  # how often a running job rereads its status to notice a cancel request
PHASE_WRITE_S = 1.0  # a phase's own progress is written at most this often (a new phase at once)


class StepRate:
    """This attempt's measured step rate, and when the job will finish at that rate: the
    median of the recent steps' durations (a slow first step, which includes warm-up, or one
    stall does not swing it)."""

    WINDOW = 50

    def __init__(self) -> None:
        self.last: tuple[int, float] | None = None
        self.durations: list[float] = []

    def estimate(self, step: int, total: int) -> datetime | None:
        """The finish time once two steps have been seen, else None."""
        now = time.monotonic()
        if self.last is not None and step > self.last[0]:
            self.durations.append((now - self.last[1]) / (step - self.last[0]))
            self.durations = self.durations[-self.WINDOW:]
        self.last = (step, now)
        if not self.durations:
            return None
        per_step = statistics.median(self.durations)
        return utcnow() + timedelta(seconds=per_step * max(0, total - step))


class JobRecorder:
    """Training callbacks that write progress, phases, metrics and events to the job and poll for
    cancel and pause; each step, phase report, evaluation and event also moves the attempt's
    `progress` clock (the heartbeat stops when it stands still for SPEFT_STALL_TIMEOUT_S)."""

    def __init__(self, session: Session, job_id: str, attempt: int,
                 progress: ProgressClock | None = None, *, storage: Storage | None = None,
                 keep_checkpoints: int | None = None,
                 after_checkpoint: Callable[[], object] | None = None) -> None:
        self.session, self.job_id, self.attempt = session, job_id, attempt
        self.progress = progress or ProgressClock()
        self.storage, self.keep_checkpoints = storage, keep_checkpoints
        self.after_checkpoint = after_checkpoint
        self.rate = StepRate()
        self.stop = False  # the attempt lost the job (it is no longer active, or not ours)
        self.stop_for: JobStatus | None = None
        self.last_poll = float("-inf")
        self.phase = LOADING  # what the claim recorded
        self.phase_rate = StepRate()
        self.last_phase_write = float("-inf")

    def callbacks(self) -> TrainCallbacks:
        """The TrainCallbacks to hand to speft_core."""
        return TrainCallbacks(on_step=self.on_step, on_eval=self.on_eval,
                              on_event=self.on_event, should_cancel=self.should_cancel,
                              on_phase=self.on_phase,
                              on_checkpoint=self.on_checkpoint if self.storage else None,
                              should_pause=self.should_pause if self.storage else None)

    def on_step(self, report: StepReport) -> None:
        """Progress, heartbeat and one train metric row, committed at once."""
        active = record_progress(self.session, job_id=self.job_id, step=report.step,
                                 total=report.total_steps, train_loss=report.train_loss,
                                 lr=report.lr, grad_norm=report.grad_norm,
                                 attempt=self.attempt, trained_tokens=report.tokens,
                                 estimated_finish=self.rate.estimate(report.step,
                                                                     report.total_steps))
        self.session.commit()
        self.progress.touch()
        self.stop = self.stop or not active

    def on_phase(self, report: PhaseReport) -> None:
        """The phase and its progress and estimate: a new phase written at once with its event,
        its progress at most every PHASE_WRITE_S (and when it completes)."""
        entered = report.phase != self.phase
        if entered:
            self.phase, self.phase_rate = report.phase, StepRate()
        estimate = (self.phase_rate.estimate(report.step, report.total)
                    if report.total is not None else None)
        self.progress.touch()
        now = time.monotonic()
        written_lately = now - self.last_phase_write < PHASE_WRITE_S
        if not entered and report.step != report.total and written_lately:
            return
        self.last_phase_write = now
        active = record_phase(self.session, job_id=self.job_id, attempt=self.attempt,
                              phase=report.phase, step=report.step, total=report.total,
                              total_steps=report.total_steps, estimated_finish=estimate,
                              entered=entered)
        self.session.commit()
        self.stop = self.stop or not active

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        """One eval metric row and event."""
        record_eval(self.session, job_id=self.job_id, step=step, metrics=json_safe(metrics))
        self.session.commit()
        self.progress.touch()

    def on_event(self, message: str, data: dict[str, Any]) -> None:
        """A free-form training event."""
        add_event(self.session, job_id=self.job_id, message=message, data=json_safe(data))
        self.session.commit()
        self.progress.touch()

    def on_checkpoint(self, report: CheckpointReport) -> None:
        """Store the checkpoint (delta, training state, metrics), prune, and log it."""
        metrics = json_safe(report.metrics)
        row = record_checkpoint(self.session, storage=self.storage, job_id=self.job_id,
                                attempt=self.attempt, step=report.step, metrics=metrics,
                                delta=delta_to_bytes(report.delta()),
                                state=state_to_bytes(report.state()), keep=self.keep_checkpoints)
        if row is not None:
            add_event(self.session, job_id=self.job_id, message="checkpoint created",
                      data={"checkpoint_id": row.id, "step": report.step, "metrics": metrics,
                            "best_so_far": report.is_best})
        commit_and_run(self.session)  # settles the upload's undo and runs the prune's purges
        if self.after_checkpoint is not None:
            self.after_checkpoint()  # e.g. send the checkpoint's webhook deliveries
        self.progress.touch()

    def _poll(self) -> None:
        """Reread the job's status every CANCEL_POLL_S: a cancel or a pause request stops it."""
        now = time.monotonic()
        if self.stop_for is None and now - self.last_poll >= CANCEL_POLL_S:
            self.last_poll = now
            self.stop_for = stop_requested(self.session, job_id=self.job_id)
            self.session.commit()

    def should_cancel(self) -> bool:
        """True once the job is no longer active or a cancel was requested (read every few seconds)."""
        self._poll()
        return self.stop or self.stop_for == JobStatus.CANCEL_REQUESTED

    def should_pause(self) -> bool:
        """True once a pause was requested (read every few seconds)."""
        self._poll()
        return self.stop_for == JobStatus.PAUSE_REQUESTED
