"""A running attempt's phase (`speft_core.progress.PHASES`): recorded on the job with the
phase's own progress and estimate, and an event each time the phase changes.

The caller owns the transaction; every write is leased to the attempt (see `api.services.jobs`).
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from api.core.models import ACTIVE_STATUSES, Job, utcnow
from api.services.jobs import add_event


def record_phase(
    session: Session,
    *,
    job_id: str,
    attempt: int,
    phase: str,
    step: int = 0,
    total: int | None = None,
    total_steps: int | None = None,
    estimated_finish: datetime | None = None,
    entered: bool = False,
) -> bool:
    """Store the attempt's phase, its progress (`step` of `total`) and estimated finish (and the
    run's planned steps once known), stamping the heartbeat; when the phase was just `entered`,
    also an event naming it. False if the job is not active (or no longer on `attempt`)."""
    values: dict[str, Any] = {"progress_phase": phase, "phase_step": step, "phase_total": total,
                              "phase_estimated_finish": estimated_finish,
                              "heartbeat_at": utcnow()}
    if total_steps is not None:
        values["progress_total"] = total_steps
    active = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(ACTIVE_STATUSES), Job.attempts == attempt)
        .values(**values)
        .execution_options(synchronize_session=False)
    ).rowcount == 1
    if active and entered:
        add_event(session, job_id=job_id, message=f"phase: {phase}",
                  data={"phase": phase, "total": total})
    return active
