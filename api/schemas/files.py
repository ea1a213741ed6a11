"""`/v1/files` schemas: an uploaded dataset, a page of them, a delete answer."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from api.schemas.common import PublicModel, TaskName, UnixTime


class FileObject(PublicModel):
    """An uploaded dataset."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    filename: str
    purpose: str
    created_at: UnixTime
    sha256: str
    num_examples: int | None = None
    task: TaskName | None = None
    # The SDK's FileObject fields: an upload is validated before it is stored, so always
    # "processed", with nothing to detail.
    status: Literal["processed"] = "processed"
    status_details: None = None


class FileList(BaseModel):
    """A page of files."""

    object: Literal["list"] = "list"
    data: list[FileObject]


class FileDeleted(BaseModel):
    """DELETE /v1/files/{id} answer."""

    id: str
    object: Literal["file"] = "file"
    deleted: bool = True
