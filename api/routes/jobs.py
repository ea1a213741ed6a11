"""`/v1/fine_tuning/jobs`: create (idempotent), list, read, cancel; events and metrics."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response, status

from api.core.config import Settings
from api.core.models import Job, JobStatus
from api.core.unit_of_work import after_commit
from api.deps import SessionDep, SessionRoute, SettingsDep, TenantDep
from api.errors import COMMON_ERRORS, error_responses
from api.schemas.jobs import JobCreate, JobEvent, JobEventList, JobList, JobMetricList, JobObject
from api.services import job_creation, job_reads, quotas

router = APIRouter(prefix="/fine_tuning/jobs", tags=["fine-tuning jobs"],
                   responses=error_responses(*COMMON_ERRORS),
                   route_class=SessionRoute)

MAX_PAGE = 100
DEFAULT_PAGE = 20


def _shown(job: Job, settings: Settings) -> JobObject:
    """The job as a reader sees it now: a running job whose worker was not heard from for
    SPEFT_HEARTBEAT_TIMEOUT_S (the reconciler's own limit) is `progress.stale`."""
    return JobObject.shown(job, stale_after_s=settings.heartbeat_timeout_s)


@router.post("", response_model=JobObject, status_code=status.HTTP_201_CREATED,
             responses={200: {"model": JobObject,
                              "description": "an Idempotency-Key replay: the earlier job"},
                        **error_responses(409)})
def create_job(
    body: JobCreate,
    request: Request,
    response: Response,
    session: SessionDep,
    tenant: TenantDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1,
                                                  max_length=255)] = None,
) -> JobObject:
    """Create a queued job (201); a replayed Idempotency-Key with the same body returns it (200).

    The row is committed (by the session dependency) before the run message is sent: the send
    is an after-commit action. If sending fails (broker down) the job
    still exists and stays queued with an "enqueue failed" event, and the answer is still 201:
    a 2xx means the job exists, and a reconciler re-enqueues queued jobs later.
    """
    settings = request.app.state.settings
    job, created = job_creation.create_job(
        session, tenant_id=tenant.id, body=body, idempotency_key=idempotency_key,
        default_device=settings.default_device)
    if not created:
        response.status_code = status.HTTP_200_OK
        return _shown(job, settings)
    quotas.check_active_jobs(session, tenant_id=tenant.id,  # 429 rolls the insert back
                             limit=settings.max_active_jobs_per_tenant)
    enqueue = request.app.state.enqueue_job
    after_commit(session, lambda: job_creation.enqueue_created_job(session, enqueue=enqueue,
                                                                   job=job))
    return _shown(job, settings)


@router.get("", response_model=JobList)
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
    after: Annotated[str | None, Query(max_length=64)] = None,
    status: JobStatus | None = None,
) -> JobList:
    """The tenant's jobs, newest first; pass the last id as `after` for the next page."""
    rows, has_more = job_reads.list_jobs(session, tenant_id=tenant.id, limit=limit,
                                         after=after, status=status)
    return JobList(data=[_shown(row, settings) for row in rows], has_more=has_more)


@router.get("/{job_id}", response_model=JobObject, responses=error_responses(404))
def get_job(job_id: str, session: SessionDep, tenant: TenantDep,
            settings: SettingsDep) -> JobObject:
    """One job."""
    return _shown(job_reads.get_job(session, tenant_id=tenant.id, job_id=job_id), settings)


@router.post("/{job_id}/cancel", response_model=JobObject, responses=error_responses(404, 409))
def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep,
               settings: SettingsDep) -> JobObject:
    """Cancel a job: at once if not started, else `cancel_requested`; 409 if already finished."""
    return _shown(job_reads.cancel_job(session, tenant_id=tenant.id, job_id=job_id), settings)


@router.post("/{job_id}/pause", response_model=JobObject, responses=error_responses(404, 409))
def pause_job(job_id: str, session: SessionDep, tenant: TenantDep,
              settings: SettingsDep) -> JobObject:
    """Pause a job: at once if queued, else `pause_requested` until its worker has saved a
    checkpoint and stopped (then `paused`); 409 unless queued or running."""
    return _shown(job_reads.pause_job(session, tenant_id=tenant.id, job_id=job_id), settings)


@router.post("/{job_id}/resume", response_model=JobObject, responses=error_responses(404, 409))
def resume_job(job_id: str, request: Request, session: SessionDep,
               tenant: TenantDep, settings: SettingsDep) -> JobObject:
    """Resume a paused job: queued again, it continues from its newest checkpoint (a pending
    pause is withdrawn instead); 409 unless paused or pausing."""
    job, send = job_reads.resume_job(session, tenant_id=tenant.id, job_id=job_id)
    if send:
        enqueue = request.app.state.enqueue_job
        after_commit(session, lambda: job_creation.enqueue_created_job(session, enqueue=enqueue,
                                                                       job=job))
    return _shown(job, settings)


@router.get("/{job_id}/events", response_model=JobEventList, responses=error_responses(404))
def list_job_events(job_id: str, session: SessionDep, tenant: TenantDep) -> JobEventList:
    """The job's events, oldest first."""
    rows = job_reads.list_events(session, tenant_id=tenant.id, job_id=job_id)
    return JobEventList(data=[JobEvent.model_validate(row) for row in rows])


@router.get("/{job_id}/metrics", response_model=JobMetricList, responses=error_responses(404))
def list_job_metrics(job_id: str, session: SessionDep, tenant: TenantDep) -> JobMetricList:
    """The job's metrics, one row per step (train and eval values merged)."""
    return JobMetricList(data=job_reads.list_metrics(session, tenant_id=tenant.id,
                                                     job_id=job_id))
