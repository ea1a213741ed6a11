"""`/v1/adapters`: list, read, download and delete trained sparse deltas."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from api.deps import SessionDep, SessionRoute, StorageDep, TenantDep
from api.errors import COMMON_ERRORS, error_responses
from api.routes import DOWNLOAD_RESPONSE, download_response
from api.schemas.adapters import AdapterDeleted, AdapterList, AdapterObject
from api.services import adapters

router = APIRouter(prefix="/adapters", tags=["adapters"],
                   responses=error_responses(*COMMON_ERRORS),
                   route_class=SessionRoute)


@router.get("", response_model=AdapterList)
def list_adapters(session: SessionDep, tenant: TenantDep) -> AdapterList:
    """The tenant's adapters, newest first."""
    rows = adapters.list_adapters(session, tenant_id=tenant.id)
    return AdapterList(data=[AdapterObject.model_validate(row) for row in rows])


@router.get("/{adapter_id}", response_model=AdapterObject, responses=error_responses(404))
def get_adapter(adapter_id: str, session: SessionDep, tenant: TenantDep) -> AdapterObject:
    """One adapter's metadata."""
    return AdapterObject.model_validate(adapters.get_adapter(session, tenant_id=tenant.id,
                                                             adapter_id=adapter_id))


@router.get("/{adapter_id}/content", response_class=StreamingResponse,
            responses=DOWNLOAD_RESPONSE | error_responses(404))
def get_adapter_content(adapter_id: str, session: SessionDep, storage: StorageDep,
                        tenant: TenantDep) -> StreamingResponse:
    """The adapter's delta file (safetensors), verified against its sha256 while streaming."""
    row, chunks = adapters.adapter_content(session, storage=storage, tenant_id=tenant.id,
                                           adapter_id=adapter_id)
    return download_response(chunks, size=row.bytes, filename=f"{row.id}.safetensors")


@router.delete("/{adapter_id}", response_model=AdapterDeleted, responses=error_responses(404))
def delete_adapter(adapter_id: str, request: Request, session: SessionDep, storage: StorageDep,
                   tenant: TenantDep) -> AdapterDeleted:
    """Delete an adapter (its delta file is removed, it leaves memory; the job keeps its record)."""
    row = adapters.delete_adapter(session, storage=storage, tenant_id=tenant.id,
                                  adapter_id=adapter_id)
    request.app.state.inference.unload_adapter(row.id)
    return AdapterDeleted(id=row.id)
