"""The heartbeat thread that keeps a running attempt's lease alive (`heartbeat_at`)."""
from __future__ import annotations

import logging
import threading
from typing import Self

from api.core.db import get_session_factory
from api.services.jobs import heartbeat

log = logging.getLogger(__name__)


class Heartbeat:
    """A thread that stamps the job's `heartbeat_at` every `interval_s` while the attempt runs,
    with its own database session (training may hold the main one for minutes between steps:
    model download, salience scoring). A failed stamp is logged and retried on the next tick."""

    def __init__(self, job_id: str, attempt: int, *, interval_s: float) -> None:
        self.job_id, self.attempt, self.interval_s = job_id, attempt, interval_s
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
            try:
                with get_session_factory()() as session:
                    alive = heartbeat(session, job_id=self.job_id, attempt=self.attempt)
                    session.commit()
            except Exception:  # a missed beat is retried on the next tick; the job goes on
                log.warning("speft.job heartbeat failed job_id=%s", self.job_id, exc_info=True)
                continue
            if not alive:  # finished, cancelled or taken over: nothing left to keep alive
                return
