"""Uploaded datasets: stream to storage, validate as JSONL, record; tenant-scoped reads and deletes."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from sqlalchemy.orm import Session

from api.core.models import File, new_id
from api.core.storage import ObjectTooLarge, Storage
from api.core.unit_of_work import after_rollback
from api.errors import InvalidRequest, PayloadTooLarge
from api.services import job_reads, stored_objects
from api.services.pages import SortOrder
from speft_core.data import label_set, parse_dataset
from speft_core.errors import DatasetFormatError

FILE_PURPOSE = "fine-tune"


def file_storage_key(file_id: str) -> str:
    """Where a file's bytes are stored."""
    return f"files/{file_id}.jsonl"


def _lines(chunks: Iterable[bytes], *, max_line_bytes: int | None = None) -> Iterator[bytes]:
    """Split a byte stream into lines (each keeps its newline, the last may lack one); a line
    spanning many chunks is joined once, so a long line costs linear time. A line longer than
    `max_line_bytes` (newline excluded) raises DatasetFormatError naming it, before it is joined."""
    pending: list[bytes] = []  # the current line's pieces
    size, number = 0, 1  # bytes pending, and the current line's number
    for chunk in chunks:
        *complete, rest = chunk.split(b"\n")
        for piece in complete:
            _check_line_size(size + len(piece), number, max_line_bytes)
            yield b"".join([*pending, piece, b"\n"])
            pending, size, number = [], 0, number + 1
        if rest:
            pending.append(rest)
            size += len(rest)
            _check_line_size(size, number, max_line_bytes)
    if pending:
        yield b"".join(pending)


def _check_line_size(size: int, line: int, max_line_bytes: int | None) -> None:
    if max_line_bytes is not None and size > max_line_bytes:
        raise DatasetFormatError(
            f"the line is longer than {max_line_bytes} bytes (SPEFT_MAX_LINE_BYTES)", line=line
        )


def _limit_lines(lines: Iterable[bytes], max_lines: int) -> Iterator[bytes]:
    """Pass lines through; raise DatasetFormatError at line `max_lines + 1`."""
    for number, line in enumerate(lines, start=1):
        if number > max_lines:
            raise DatasetFormatError(
                f"the file has more than {max_lines} lines (SPEFT_MAX_FILE_LINES)", line=number
            )
        yield line


@dataclass(frozen=True)
class DatasetSummary:
    """What an upload's validation found: the task, the examples, a classifier's labels."""

    task: str
    num_examples: int
    labels: list[str] | None  # label_set(examples) for classification, else None


def validate_dataset(lines: Iterable[bytes], *, max_lines: int) -> DatasetSummary:
    """Detect the task from the first object and validate every line."""
    task, examples = parse_dataset(_limit_lines(lines, max_lines))
    labels = label_set(examples) if task == "classification" else None
    return DatasetSummary(task, len(examples), labels)


def create_file(
    session: Session,
    *,
    storage: Storage,
    tenant_id: str,
    filename: str,
    purpose: str,
    data: BinaryIO,
    max_bytes: int,
    max_lines: int,
    max_line_bytes: int,
) -> File:
    """Store an upload, validate it as a dataset and record it (flushed; the caller commits).
    Nothing stays stored on failure: a refused upload deletes the object here, and an
    after-rollback action deletes it when the commit fails (database down, commit refused)."""
    if purpose != FILE_PURPOSE:
        raise InvalidRequest(f"purpose must be {FILE_PURPOSE!r}; got {purpose!r}", param="purpose")
    file_id = new_id("file")
    key = file_storage_key(file_id)
    try:
        stored = storage.put(key, data, max_bytes=max_bytes)
    except ObjectTooLarge as err:
        raise PayloadTooLarge(f"the file is larger than {err.limit} bytes", param="file") from err
    after_rollback(session, lambda: storage.delete(key))
    try:
        summary = validate_dataset(
            _lines(storage.stream(key, sha256=stored.sha256), max_line_bytes=max_line_bytes),
            max_lines=max_lines,
        )
    except DatasetFormatError as err:
        raise InvalidRequest(err.message, param="file", code=err.code) from err
    row = File(id=file_id, tenant_id=tenant_id, filename=filename, purpose=purpose,
               bytes=stored.size, sha256=stored.sha256, storage_key=key,
               num_examples=summary.num_examples, task=summary.task, labels=summary.labels)
    session.add(row)
    session.flush()
    return row


def get_file(session: Session, *, tenant_id: str, file_id: str) -> File:
    """The tenant's live file `file_id`; NotFound for missing, deleted or another tenant's files."""
    return stored_objects.get_live(session, File, tenant_id=tenant_id, object_id=file_id,
                                   noun="file", param="file_id")


def list_files(session: Session, *, tenant_id: str, limit: int, after: str | None = None,
               order: SortOrder = "desc", purpose: str | None = None) -> tuple[list[File], bool]:
    """A page of the tenant's live files (of `purpose`, if given) after file `after`, by creation
    time in `order`; (files, has_more)."""
    where = [File.purpose == purpose] if purpose is not None else []
    return stored_objects.page_live(session, File, tenant_id=tenant_id, noun="file", limit=limit,
                                    after=after, order=order, where=where)


def file_content(session: Session, *, storage: Storage, tenant_id: str,
                 file_id: str) -> tuple[File, Iterator[bytes]]:
    """The tenant's file and its bytes as a stream verified against the recorded sha256."""
    row = get_file(session, tenant_id=tenant_id, file_id=file_id)
    return row, stored_objects.verified_stream(storage, row)


def delete_file(session: Session, *, storage: Storage, tenant_id: str, file_id: str) -> File:
    """Soft-delete the tenant's file (jobs keep their link); its bytes go after the commit.
    Conflict while an unfinished job uses it."""
    job_reads.refuse_if_file_in_use(session, tenant_id=tenant_id, file_id=file_id)
    row = get_file(session, tenant_id=tenant_id, file_id=file_id)
    return stored_objects.soft_delete(session, storage, row)
