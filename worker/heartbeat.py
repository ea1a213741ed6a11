"""The heartbeat thread that keeps a running attempt's lease alive (`heartbeat_at`), while the
attempt makes progress."""
from __future__ import annotations

import logging
import threading
import time
from typing import Self

from sqlalchemy.orm import Session

from api.core.db import get_session_factory
from api.services.jobs import add_event, heartbeat

log = logging.getLogger(__name__)


class ProgressClock:
    """When the attempt last showed progress: a step, a phase report, an evaluation or an event
    (the recorder touches it; what reports none until it ends, such as model download or mask
    selection, does not)."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def touch(self) -> None:
        """The attempt made progress now."""
        self.last = time.monotonic()

    def idle_s(self) -> float:
        """Seconds since the attempt last made progress."""
        return time.monotonic() - self.last


class Heartbeat:
    """A thread that stamps the job's `heartbeat_at` every `interval_s` while the attempt runs,
    with its own database session (training may hold the main one for minutes between steps:
    model download, salience scoring). A failed stamp is logged and retried on the next tick.

    An attempt whose `progress` clock has not moved for `stall_timeout_s` (stuck: a lock that is
    never released, a hung call) stops being stamped: the thread logs an error, records a warning
    event and ends, so the reconciler re-queues (or fails) the job as a lost worker, and the
    attempt's lease keeps the stuck attempt from writing to the job again."""

    def __init__(self, job_id: str, attempt: int, *, interval_s: float,
                 stall_timeout_s: float = float("inf")) -> None:
        self.job_id, self.attempt, self.interval_s = job_id, attempt, interval_s
        self.stall_timeout_s = stall_timeout_s
        self.progress = ProgressClock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}",
                                       daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopped.set()
        self.thread.join()

    def _beat(self) -> None:
        while not self.stopped.wait(self.interval_s):
            stalled = self.progress.idle_s() > self.stall_timeout_s
            try:
                with get_session_factory()() as session:
                    alive = heartbeat(session, job_id=self.job_id, attempt=self.attempt)
                    if alive and stalled:
                        self._give_up(session)
                    session.commit()
            except Exception:  # a missed beat is retried on the next tick; the job goes on
                log.warning("speft.job heartbeat failed job_id=%s", self.job_id, exc_info=True)
                continue
            if not alive or stalled:  # finished, cancelled, taken over, or stuck: stop stamping
                return

    def _give_up(self, session: Session) -> None:
        """Say (log and event) that the attempt is stuck and will be treated as a lost worker."""
        idle = self.progress.idle_s()
        log.error("speft.job stalled job_id=%s attempt=%d: no progress for %.0f s "
                  "(SPEFT_STALL_TIMEOUT_S=%g); heartbeat stopped, the reconciler takes over",
                  self.job_id, self.attempt, idle, self.stall_timeout_s)
        add_event(session, job_id=self.job_id, level="warning",
                  message=f"attempt {self.attempt} stalled: no step, evaluation or event for "
                          f"{idle:.0f} s (SPEFT_STALL_TIMEOUT_S); its heartbeat stopped, so "
                          "the reconciler re-queues (or fails) the job as if its worker were "
                          "lost",
                  data={"attempt": self.attempt, "idle_s": round(idle, 1)})
