"""`/v1/files`: upload, list, read, download and delete datasets."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.responses import StreamingResponse

from api.core.models import ID_LENGTH
from api.deps import SessionDep, SessionRoute, SettingsDep, StorageDep, TenantDep
from api.errors import COMMON_ERRORS, error_responses
from api.routes import DOWNLOAD_RESPONSE, download_response
from api.schemas.files import FileDeleted, FileList, FileObject
from api.services import files
from api.services.pages import SortOrder

FILES_PAGE_MAX = 10_000  # OpenAI's bound of `limit`, also its default: one page of every file

router = APIRouter(prefix="/files", tags=["files"],
                   responses=error_responses(*COMMON_ERRORS),
                   route_class=SessionRoute)


@router.post("", response_model=FileObject, responses=error_responses(413))
def upload_file(
    file: UploadFile,
    purpose: Annotated[str, Form(min_length=1, json_schema_extra={"enum": [files.FILE_PURPOSE]})],
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    tenant: TenantDep,
) -> FileObject:
    """Upload a JSONL dataset; it is validated now (400 names the first bad line)."""
    row = files.create_file(
        session, storage=storage, tenant_id=tenant.id, filename=file.filename or "upload.jsonl",
        purpose=purpose, data=file.file, max_bytes=settings.max_upload_bytes,
        max_lines=settings.max_file_lines, max_line_bytes=settings.max_line_bytes,
    )
    return FileObject.model_validate(row)


@router.get("", response_model=FileList)
def list_files(
    session: SessionDep,
    tenant: TenantDep,
    after: Annotated[str | None, Query(max_length=ID_LENGTH, description=(
        "a file id: the page starts after it (the previous page's `last_id`)"))] = None,
    limit: Annotated[int, Query(ge=1, le=FILES_PAGE_MAX)] = FILES_PAGE_MAX,
    order: Annotated[SortOrder, Query(description="by `created_at`")] = "desc",
    purpose: Annotated[str | None, Query(max_length=64, description=(
        "only files of this purpose"))] = None,
) -> FileList:
    """A page of the tenant's files, newest first unless `order=asc`; while `has_more`, pass
    `last_id` as `after` for the next page (the `openai` SDK's iteration does)."""
    rows, has_more = files.list_files(session, tenant_id=tenant.id, limit=limit, after=after,
                                      order=order, purpose=purpose)
    return FileList(data=[FileObject.model_validate(row) for row in rows], has_more=has_more)


@router.get("/{file_id}", response_model=FileObject, responses=error_responses(404))
def get_file(file_id: str, session: SessionDep, tenant: TenantDep) -> FileObject:
    """One file's metadata."""
    return FileObject.model_validate(files.get_file(session, tenant_id=tenant.id,
                                                    file_id=file_id))


@router.get("/{file_id}/content", response_class=StreamingResponse,
            responses=DOWNLOAD_RESPONSE | error_responses(404))
def get_file_content(file_id: str, session: SessionDep, storage: StorageDep,
                     tenant: TenantDep) -> StreamingResponse:
    """The file's bytes as uploaded."""
    row, chunks = files.file_content(session, storage=storage, tenant_id=tenant.id,
                                     file_id=file_id)
    return download_response(chunks, size=row.bytes, filename=f"{row.id}.jsonl")


@router.delete("/{file_id}", response_model=FileDeleted, responses=error_responses(404, 409))
def delete_file(file_id: str, session: SessionDep, storage: StorageDep,
                tenant: TenantDep) -> FileDeleted:
    """Delete a file (its bytes are removed; jobs that used it keep their record); 409 naming
    the job while an unfinished job uses it."""
    row = files.delete_file(session, storage=storage, tenant_id=tenant.id, file_id=file_id)
    return FileDeleted(id=row.id)
