"""A job's checkpoints: recorded by its worker, listed, downloaded, served and deleted like
adapters; the newest one's training state is what a re-queued job resumes from.

A checkpoint's two objects (the delta, `checkpoints/<id>.safetensors`, and the training state
beside it) are uploaded before its row is inserted; a rollback deletes them again. The row is
written only while the job is still on the uploading attempt (a worker presumed dead cannot
add one). Beyond `keep_checkpoints`, the oldest are soft-deleted (objects removed after the
commit), never the one with the lowest validation loss.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.core.models import Checkpoint, Job, new_id
from api.core.storage import ObjectNotFound, Storage
from api.core.unit_of_work import after_rollback
from api.errors import NotFound
from api.services import stored_objects, webhooks
from api.services.job_reads import get_job
from api.services.jobs import ACTIVE_STATUSES
from speft_core.checkpoint import TrainingState, state_from_bytes

log = logging.getLogger(__name__)


def checkpoint_key(checkpoint_id: str) -> str:
    """Where a checkpoint's delta file is stored."""
    return f"checkpoints/{checkpoint_id}.safetensors"


def record_checkpoint(session: Session, *, storage: Storage, job_id: str, attempt: int,
                      step: int, metrics: dict[str, float], delta: bytes, state: bytes,
                      keep: int | None) -> Checkpoint | None:
    """Store a checkpoint of the running attempt and prune beyond `keep` (flushed; the caller
    commits). None, with nothing left stored, when the job is no longer on `attempt`."""
    job = session.get(Job, job_id)
    if job is None or job.status not in ACTIVE_STATUSES or job.attempts != attempt:
        return None
    _retire_step(session, storage, job_id=job_id, step=step)
    checkpoint_id = new_id("ftckpt")
    key = checkpoint_key(checkpoint_id)
    # registered first: a state upload that fails after the delta's still removes the delta
    after_rollback(session, lambda: stored_objects.delete_stored(storage, Checkpoint, key))
    stored = storage.put(key, delta)
    storage.put(Checkpoint.state_key_for(key), state)
    row = Checkpoint(id=checkpoint_id, tenant_id=job.tenant_id, job_id=job_id,
                     base_model=job.model, step=step, attempt=attempt, metrics=metrics,
                     bytes=stored.size, sha256=stored.sha256, storage_key=key)
    session.add(row)
    session.flush()
    from api.schemas.checkpoints import CheckpointObject  # the API's own rendering

    webhooks.record_event(session, tenant_id=job.tenant_id, event_type=webhooks.CHECKPOINT_EVENT,
                          data=CheckpointObject.model_validate(row).model_dump(mode="json"),
                          job_id=job_id)
    if keep is not None:
        _prune(session, storage, job_id=job_id, keep=keep)
    return row


def _retire_step(session: Session, storage: Storage, *, job_id: str, step: int) -> None:
    """Soft-delete a live checkpoint of an earlier attempt at `step`: an attempt that resumed from
    an older state (the newer one unreadable) saves that step again, and the new one replaces it."""
    for row in live_for_job(session, job_id=job_id):
        if row.step == step:
            stored_objects.soft_delete(session, storage, row)


def _valid_loss(row: Checkpoint) -> float:
    value = (row.metrics or {}).get("valid_loss")
    return value if isinstance(value, (int, float)) and math.isfinite(value) else math.inf


def _prune(session: Session, storage: Storage, *, job_id: str, keep: int) -> None:
    """Soft-delete all but the newest `keep` live checkpoints of a job and its best one."""
    rows = live_for_job(session, job_id=job_id)
    best = min(rows, key=lambda r: (_valid_loss(r), r.step))
    newest = {row.id for row in rows[-keep:]}
    for row in rows:
        if row.id not in newest and row.id != best.id:
            stored_objects.soft_delete(session, storage, row)


def live_for_job(session: Session, *, job_id: str) -> list[Checkpoint]:
    """A job's live checkpoints, by step."""
    return list(session.scalars(select(Checkpoint).where(
        Checkpoint.job_id == job_id, Checkpoint.deleted_at.is_(None)).order_by(Checkpoint.step)))


def latest_state(session: Session, *, storage: Storage, job_id: str) -> TrainingState | None:
    """The training state of the job's newest live checkpoint that has a readable one."""
    for row in reversed(live_for_job(session, job_id=job_id)):
        try:
            return state_from_bytes(storage.get(Checkpoint.state_key_for(row.storage_key)))
        except (ObjectNotFound, ValueError) as err:
            log.warning("speft.checkpoint %s: no usable training state (%s)", row.id, err)
    return None


def list_checkpoints(session: Session, *, tenant_id: str, job_id: str) -> list[Checkpoint]:
    """The tenant's job's live checkpoints, newest first (NotFound for another's job)."""
    get_job(session, tenant_id=tenant_id, job_id=job_id)
    return list(reversed(live_for_job(session, job_id=job_id)))


def get_checkpoint(session: Session, *, tenant_id: str, job_id: str,
                   checkpoint_id: str) -> Checkpoint:
    """The tenant's live checkpoint of that job; NotFound otherwise."""
    row = stored_objects.get_live(session, Checkpoint, tenant_id=tenant_id,
                                  object_id=checkpoint_id, noun="checkpoint",
                                  param="checkpoint_id")
    if row.job_id != job_id:
        raise NotFound(f"no such checkpoint: {checkpoint_id}", param="checkpoint_id")
    return row


def checkpoint_content(session: Session, *, storage: Storage, tenant_id: str, job_id: str,
                       checkpoint_id: str) -> tuple[Checkpoint, Iterator[bytes]]:
    """A checkpoint and its delta file, verified against its sha256 while streaming."""
    row = get_checkpoint(session, tenant_id=tenant_id, job_id=job_id,
                         checkpoint_id=checkpoint_id)
    return row, stored_objects.verified_stream(storage, row)


def delete_checkpoint(session: Session, *, storage: Storage, tenant_id: str, job_id: str,
                      checkpoint_id: str) -> Checkpoint:
    """Soft-delete a checkpoint; its objects go after the commit."""
    row = get_checkpoint(session, tenant_id=tenant_id, job_id=job_id,
                         checkpoint_id=checkpoint_id)
    return stored_objects.soft_delete(session, storage, row)
