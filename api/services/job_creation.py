"""Creating a fine-tuning job: validated, idempotent, then enqueued after the commit.

The state machine lives in `api.services.jobs`, reads and cancel in `api.services.job_reads`;
this module decides what a request may create. Creation never commits: the route registers
`enqueue_created_job` as an after-commit action and the session dependency commits, then runs it
(polar's "enqueue after commit"), so a worker never looks for a row that is not there yet.

Idempotency: `Idempotency-Key` is unique per tenant (a constraint on `jobs`). The request hash is
the sha256 of the canonical JSON of the body with defaults filled in, so `{}` and the explicit
defaults are the same body. The insert is `ON CONFLICT DO NOTHING` on (tenant_id,
idempotency_key): of two racing requests one inserts, the other re-reads the winner's row.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.core.db import dialect_insert
from api.core.models import File, Job, JobStatus, RegisteredModel, new_id, utcnow
from api.core.unit_of_work import unit_of_work
from api.errors import Conflict, InvalidRequest
from api.schemas.jobs import JobCreate
from api.services import jobs
from speft_core.config import AUTO, AUTO_FIELDS, AUTO_RULES, resolve_auto
from speft_core.data import check_label_sets

log = logging.getLogger(__name__)

IDEMPOTENCY_PARAM = "Idempotency-Key"
EnqueueJob = Callable[[str, str], None]  # (job id, device)


def request_hash(body: JobCreate) -> str:
    """sha256 of the body's canonical JSON (defaults filled in, keys sorted)."""
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _job_for_key(session: Session, *, tenant_id: str, key: str, body_hash: str) -> Job | None:
    """The tenant's job made with `key`, if any; Conflict when it was made from another body."""
    job = session.scalar(select(Job).where(Job.tenant_id == tenant_id,
                                           Job.idempotency_key == key))
    if job is not None and job.request_hash != body_hash:
        raise Conflict(f"Idempotency-Key {key!r} was already used with a different request body",
                       param=IDEMPOTENCY_PARAM)
    return job


def _base_model(session: Session, *, model_id: str) -> RegisteredModel:
    """The registered base model; 400 naming the valid ids otherwise."""
    row = session.get(RegisteredModel, model_id)
    if row is None:
        valid = ", ".join(session.scalars(select(RegisteredModel.id).order_by(RegisteredModel.id)))
        raise InvalidRequest(f"unknown model {model_id!r}; valid models: {valid}", param="model")
    return row


def _datasets(session: Session, *, tenant_id: str, task: str,
              file_ids: dict[str, str]) -> dict[str, File]:
    """Check in one query that each `{field: file_id}` is the tenant's live file written for
    `task`, and that a classifier's label sets fit (`check_label_sets`); 400 naming the first
    bad field otherwise. The rows are locked (`FOR UPDATE`) until the commit, so a delete of
    one of them waits and then sees the new job (409), or wins and the file is gone here (see
    `job_reads.refuse_if_file_in_use`)."""
    rows = {row.id: row for row in session.scalars(
        select(File).where(File.tenant_id == tenant_id, File.deleted_at.is_(None),
                           File.id.in_(set(file_ids.values()))).with_for_update())}
    for field, file_id in file_ids.items():
        row = rows.get(file_id)
        if row is None:
            raise InvalidRequest(f"no such file: {file_id}", param=field)
        if row.task is not None and row.task != task:
            raise InvalidRequest(f"file {file_id} is {row.task} data; the job's task is {task}",
                                 param=field)
    files = {field: rows[file_id] for field, file_id in file_ids.items()}
    training, validation = files["training_file"], files.get("validation_file")
    if training.labels is not None:  # recorded at upload (None: a file from before, or an LM's)
        check_label_sets(training.labels, validation.labels if validation is not None else None)
    return files


def create_job(session: Session, *, tenant_id: str, body: JobCreate, idempotency_key: str | None,
               default_device: str = "cpu") -> tuple[Job, bool]:
    """Validate and insert a queued job; (job, True), or (the earlier job, False) on a key replay.

    Model, files and spec are checked here, in the request (files were validated at upload), so
    the job is inserted straight as `queued`; its event log still shows both steps. Four
    statements: the model, the files, the job (INSERT … RETURNING), its two events.
    """
    body_hash = request_hash(body)
    if idempotency_key is not None:
        earlier = _job_for_key(session, tenant_id=tenant_id, key=idempotency_key,
                               body_hash=body_hash)
        if earlier is not None:
            return earlier, False
    model = _base_model(session, model_id=body.model)
    task = body.task or model.task
    file_ids = {"training_file": body.training_file}
    if body.validation_file is not None:
        file_ids["validation_file"] = body.validation_file
    files = _datasets(session, tenant_id=tenant_id, task=task, file_ids=file_ids)
    if body.hyperparameters.early_stopping is not None and body.validation_file is None:
        raise InvalidRequest("early_stopping watches the validation loss: give a "
                             "validation_file", param="hyperparameters.early_stopping")
    auto = [name for name in AUTO_FIELDS if getattr(body.hyperparameters, name) == AUTO]
    body = body.model_copy(update={"hyperparameters": resolve_auto(
        body.hyperparameters, files["training_file"].num_examples)})
    body.to_spec(task=task, training_file=body.training_file,
                 validation_file=body.validation_file)  # the core's own checks (ConfigError: 400)
    job = session.scalar(
        dialect_insert(session, Job).values(
            id=new_id("ftjob"), tenant_id=tenant_id, model=model.id, status=JobStatus.QUEUED,
            spec=body.stored_body(task, body.device or default_device), training_file=body.training_file,
            validation_file=body.validation_file, created_at=utcnow(), attempts=0,
            progress_step=0, idempotency_key=idempotency_key, request_hash=body_hash,
        ).on_conflict_do_nothing(index_elements=["tenant_id", "idempotency_key"])
        .returning(Job)  # None when a concurrent request with the same key won the race
    )
    if job is None:
        assert idempotency_key is not None  # NULL keys never conflict
        winner = _job_for_key(session, tenant_id=tenant_id, key=idempotency_key,
                              body_hash=body_hash)
        if winner is None:
            raise LookupError(f"job with Idempotency-Key {idempotency_key!r} vanished")
        return winner, False
    jobs.add_events(session, job_id=job.id, events=[
        {"type": jobs.EVENT_STATUS, "message": "job created",
         "data": {"status": JobStatus.VALIDATING_FILES.value}},
        {"type": jobs.EVENT_STATUS, "message": "job queued",
         "data": {"status": JobStatus.QUEUED.value}},
        *([{"type": jobs.EVENT_MESSAGE, "message": "auto hyperparameters chosen",
            "data": {**{name: getattr(body.hyperparameters, name) for name in auto},
                     "training_examples": files["training_file"].num_examples,
                     "rule": AUTO_RULES}}] if auto else []),
    ])
    return job, True


def enqueue_created_job(session: Session, *, enqueue: EnqueueJob, job: Job) -> bool:
    """Send the committed job to its device's queue; on failure log and record an event, return
    False.

    The job stays queued either way (a 2xx means the job exists); a reconciler re-enqueues
    queued jobs whose message was lost.
    """
    job_id, device = job.id, job.device
    try:
        enqueue(job_id, device)
    except Exception as err:
        log.exception("speft.job enqueue failed job_id=%s", job_id)
        with unit_of_work(session):
            jobs.add_event(session, job_id=job_id, level="warning", message="enqueue failed",
                           data={"error": f"{type(err).__name__}: {err}"})
        return False
    log.info("speft.job enqueued job_id=%s device=%s", job_id, device)
    return True
