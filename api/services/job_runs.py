"""One run (attempt) of a claimed job: its inputs, its adapter's objects, its published outcome.

Shared by the worker's `run_job` (inputs, publish) and `reconcile` (discard) tasks, which own
the claim, the training and the failure paths. Every write is leased to the attempt number.

Adapters: one adapter id per job (`adapter_id_for`), one object key per attempt
(`attempt_key`). The object is uploaded before the success transition and deleted again when that
transition loses (the job was cancelled, failed or re-queued meanwhile); after a success, the
objects of earlier, killed attempts are deleted. So a job that succeeds leaves exactly one adapter
row and one object, and no adapter row ever points at a missing object.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from sqlalchemy.orm import Session

from api.core.models import File, Job, RegisteredModel, new_id
from api.core.storage import ObjectNotFound, Storage
from api.core.unit_of_work import (
    after_commit,
    after_rollback,
    commit_and_run,
    rollback_and_undo,
    unit_of_work,
)
from api.services.job_reads import merged_metrics
from api.services.jobs import finish_cancelled, finish_succeeded
from api.services.models import model_reference
from speft_core.config import JobSpec
from speft_core.delta import delta_to_bytes
from speft_core.errors import SpeftError
from speft_core.train import TrainResult

log = logging.getLogger(__name__)


def adapter_id_for(job_id: str) -> str:
    """The id of the adapter a job makes: the same for every attempt (`ftjob-X` → `adapter-X`)."""
    return f"adapter-{job_id.removeprefix('ftjob-')}"


def attempt_key(adapter_id: str, attempt: int) -> str:
    """The storage key of the delta file uploaded by one attempt of the adapter's job."""
    return f"adapters/{adapter_id}.attempt-{attempt}.safetensors"


def delete_attempt_objects(storage: Storage, adapter_id: str, attempts: range) -> None:
    """Delete the delta files of the given attempts (missing ones are fine)."""
    for attempt in attempts:
        storage.delete(attempt_key(adapter_id, attempt))


def discard_attempts(storage: Storage, *, job_id: str, attempts: int) -> None:
    """Delete the uploads of every attempt of a job that ended without an adapter."""
    delete_attempt_objects(storage, adapter_id_for(job_id), range(1, attempts + 1))


def json_safe(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of `data` that a JSON column accepts (numbers stay numbers, the rest become strings)."""
    return json.loads(json.dumps(data, default=str))


class DeviceUnavailable(RuntimeError):
    """The job names a device kind this worker does not have (it was consumed from the wrong
    queue): an operator's problem, so the job fails as an internal error with this message."""


def training_device(kind: str) -> torch.device:
    """The torch device for a job's device kind; DeviceUnavailable when this machine lacks it."""
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(
            "the job asked for device 'cuda' but this worker has no CUDA device; run "
            "`speft worker --device cuda` on a GPU machine (it consumes the cuda queue)")
    return torch.device(kind)


def _enter_local_file(stack: contextlib.ExitStack, session: Session, *, storage: Storage,
                      field: str, file_id: str) -> Path:
    """A verified local copy of the job's file `file_id`, removed when `stack` closes. A file
    deleted, or whose object is gone, is the user's doing: a SpeftError naming `field`, so the
    job fails as user_error (never internal_error)."""
    row = session.get(File, file_id)
    if row is None or row.deleted_at is not None:
        raise SpeftError(f"{field} {file_id} was deleted before the job could read it",
                         param=field)
    try:
        path: Path = stack.enter_context(storage.open_local(row.storage_key, sha256=row.sha256))
    except ObjectNotFound as err:
        raise SpeftError(f"{field} {file_id} is no longer stored (deleted before the job could "
                         "read it)", param=field) from err
    return path


def _with_model_dtype(session: Session, hyperparameters: dict, *, model_id: str) -> dict:
    """`dtype: "auto"` (or none) resolved to the registered model's own dtype, where it has one."""
    model = session.get(RegisteredModel, model_id)
    if hyperparameters.get("dtype", "auto") == "auto" and model is not None:
        hyperparameters["dtype"] = model.dtype
    return hyperparameters


@contextlib.contextmanager
def local_inputs(session: Session, *, storage: Storage, job_id: str,
                 cache_dir: Path) -> Iterator[tuple[JobSpec, torch.device]]:
    """The job's stored body as a JobSpec whose model is what speft_core loads and whose files
    are verified local copies (removed on exit), and the device it trains on."""
    job = session.get(Job, job_id)
    if job is None:
        raise LookupError(f"job {job_id} vanished after being claimed")
    body = dict(job.spec)
    device = training_device(body.pop("device", "cpu"))
    body["model"] = model_reference(session, storage=storage, model_id=job.model,
                                    cache_dir=cache_dir)
    body["hyperparameters"] = _with_model_dtype(session, dict(body.get("hyperparameters") or {}),
                                                model_id=job.model)
    with contextlib.ExitStack() as stack:
        for field, file_id in (("training_file", job.training_file),
                               ("validation_file", job.validation_file)):
            body[field] = None
            if file_id is not None:
                body[field] = str(_enter_local_file(stack, session, storage=storage, field=field,
                                                    file_id=file_id))
        commit_and_run(session)  # end the read transaction before training starts
        yield JobSpec.from_dict(body), device


RESULTS_PURPOSE = "fine-tune-results"
RESULT_COLUMNS = ("step", "train_loss", "lr", "grad_norm", "valid_loss", "valid_accuracy")


def results_csv(session: Session, *, job_id: str) -> tuple[bytes, int]:
    """The job's per-step metrics as CSV (OpenAI's result file: one row a step, validation
    columns filled at evaluated steps) and its row count."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(RESULT_COLUMNS)
    rows = merged_metrics(session, job_id=job_id)
    for row in rows:
        writer.writerow(["" if v is None else v for v in (
            row.step, row.train_loss, row.lr, row.grad_norm, row.eval_loss, row.eval_accuracy)])
    return buffer.getvalue().encode(), len(rows)


def _store_results(session: Session, storage: Storage, *, job_id: str) -> str:
    """Store the results CSV as a file of the job's tenant (flushed); its id. The object is
    deleted again if the transaction rolls back."""
    job = session.get(Job, job_id)
    content, count = results_csv(session, job_id=job_id)
    file_id = new_id("file")
    key = f"files/{file_id}.csv"
    stored = storage.put(key, content)
    after_rollback(session, lambda: storage.delete(key))
    session.add(File(id=file_id, tenant_id=job.tenant_id, filename="step_metrics.csv",
                     purpose=RESULTS_PURPOSE, bytes=stored.size, sha256=stored.sha256,
                     storage_key=key, num_examples=count))
    session.flush()
    return file_id


def publish_adapter(session: Session, *, storage: Storage, job_id: str, attempt: int,
                    spec: JobSpec, result: TrainResult) -> bool:
    """Upload the delta and make the job succeeded (committed); True when it did. Otherwise the
    object is deleted again and a cancel that came after the last step is applied."""
    adapter_id = adapter_id_for(job_id)
    key = attempt_key(adapter_id, attempt)
    stored = storage.put(key, delta_to_bytes(result.delta))
    with unit_of_work(session):
        after_rollback(session, lambda: storage.delete(key))  # the commit failed: no adapter row
        results = _store_results(session, storage, job_id=job_id)
        succeeded = finish_succeeded(
            session, job_id=job_id, adapter_id=adapter_id, storage_key=key,
            nnz=result.delta.nnz, density=float(spec.speft.density), metric=spec.speft.metric,
            bytes=stored.size, sha256=stored.sha256, eval=json_safe(result.eval),
            trainable_params=result.trainable_params, attempt=attempt,
            result_step=result.best_step or result.steps, result_file=results,
        )
        if not succeeded:  # drop the results file's row and object, and the delta object
            rollback_and_undo(session)
        if succeeded:  # killed attempts' uploads
            after_commit(session, lambda: delete_attempt_objects(storage, adapter_id,
                                                                 range(1, attempt)))
    if succeeded:
        log.info("speft.job succeeded job_id=%s adapter_id=%s", job_id, adapter_id)
        return True
    # The rollback above deleted the delta and results objects. A cancel that came after the
    # last step is applied (a no-op when the job was re-queued meanwhile).
    with unit_of_work(session):
        cancelled = finish_cancelled(session, job_id=job_id, attempt=attempt)
    log.info("speft.job finished elsewhere, adapter discarded job_id=%s cancelled=%s",
             job_id, cancelled)
    return False
