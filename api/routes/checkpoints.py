"""`/v1/fine_tuning/jobs/{id}/checkpoints`: list, download and delete a job's checkpoints
(serve one by passing its id as `adapter` or `model` to any inference endpoint)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from api.deps import SessionDep, SessionRoute, StorageDep, TenantDep
from api.errors import COMMON_ERRORS, error_responses
from api.routes import DOWNLOAD_RESPONSE, download_response
from api.schemas.checkpoints import CheckpointDeleted, CheckpointList, CheckpointObject
from api.services import checkpoints

router = APIRouter(prefix="/fine_tuning/jobs/{job_id}/checkpoints",
                   tags=["fine-tuning jobs"], responses=error_responses(*COMMON_ERRORS),
                   route_class=SessionRoute)


@router.get("", response_model=CheckpointList, responses=error_responses(404))
def list_checkpoints(job_id: str, session: SessionDep, tenant: TenantDep) -> CheckpointList:
    """The job's checkpoints, newest first."""
    rows = checkpoints.list_checkpoints(session, tenant_id=tenant.id, job_id=job_id)
    data = [CheckpointObject.model_validate(row) for row in rows]
    return CheckpointList(data=data, first_id=data[0].id if data else None,
                          last_id=data[-1].id if data else None)


@router.get("/{checkpoint_id}/content", response_class=StreamingResponse,
            responses=DOWNLOAD_RESPONSE | error_responses(404))
def get_checkpoint_content(job_id: str, checkpoint_id: str, session: SessionDep,
                           storage: StorageDep, tenant: TenantDep) -> StreamingResponse:
    """The checkpoint's delta file (safetensors), verified against its sha256 while streaming."""
    row, chunks = checkpoints.checkpoint_content(session, storage=storage, tenant_id=tenant.id,
                                                 job_id=job_id, checkpoint_id=checkpoint_id)
    return download_response(chunks, size=row.bytes, filename=f"{row.id}.safetensors")


@router.delete("/{checkpoint_id}", response_model=CheckpointDeleted,
               responses=error_responses(404))
def delete_checkpoint(job_id: str, checkpoint_id: str, request: Request, session: SessionDep,
                      storage: StorageDep, tenant: TenantDep) -> CheckpointDeleted:
    """Delete a checkpoint (its files are removed and it leaves every adapter cache)."""
    row = checkpoints.delete_checkpoint(session, storage=storage, tenant_id=tenant.id,
                                        job_id=job_id, checkpoint_id=checkpoint_id)
    request.app.state.inference.unload_adapter(row.id)
    return CheckpointDeleted(id=row.id)
