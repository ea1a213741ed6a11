"""`/v1/files` schemas: an uploaded dataset, a page of them, a delete answer."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from api.schemas.common import CursorList, PublicModel, TaskName, UnixTime


class FileObject(PublicModel):
    """An uploaded dataset, as OpenAI's file object (with `sha256`, `num_examples` and `task`)."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    filename: str
    purpose: str
    created_at: UnixTime
    sha256: str
    num_examples: int | None = None
    task: TaskName | None = None
    # OpenAI's (deprecated) status: an upload is validated before it is stored, so always
    # "processed". Its `status_details` (a string when present) and `expires_at` (uploads do
    # not expire) are left out.
    status: Literal["processed"] = "processed"


class FileList(CursorList):
    """A page of files (GET /v1/files)."""

    data: list[FileObject]


class FileDeleted(BaseModel):
    """DELETE /v1/files/{id} answer."""

    id: str
    object: Literal["file"] = "file"
    deleted: bool = True
