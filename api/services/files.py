"""Uploaded datasets: stream to storage, validate as JSONL, record; tenant-scoped reads and deletes."""
from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from sqlalchemy.orm import Session

from api.core.models import File, new_id
from api.core.storage import ObjectTooLarge, Storage
from api.errors import InvalidRequest, PayloadTooLarge
from api.services import stored_objects
from speft_core.data import parse_jsonl_lines
from speft_core.errors import DatasetFormatError

FILE_PURPOSE = "fine-tune"
_BOM = "\ufeff".encode()


def file_storage_key(file_id: str) -> str:
    """Where a file's bytes are stored."""
    return f"files/{file_id}.jsonl"


def detect_task(first_object: object) -> str | None:
    """The task a dataset row is written for: classification (`label`) or causal_lm; None if neither."""
    if not isinstance(first_object, dict):
        return None
    if "label" in first_object:
        return "classification"
    if {"prompt", "completion", "text"} & first_object.keys():
        return "causal_lm"
    return None


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Split a byte stream into lines (each keeps its newline, the last may lack one); a line
    spanning many chunks is joined once, so a long line costs linear time."""
    pending: list[bytes] = []  # the current line's pieces
    for chunk in chunks:
        *complete, rest = chunk.split(b"\n")
        for piece in complete:
            yield b"".join([*pending, piece, b"\n"])
            pending = []
        if rest:
            pending.append(rest)
    if pending:
        yield b"".join(pending)


def _limit_lines(lines: Iterable[bytes], max_lines: int) -> Iterator[bytes]:
    """Pass lines through; raise DatasetFormatError at line `max_lines + 1`."""
    for number, line in enumerate(lines, start=1):
        if number > max_lines:
            raise DatasetFormatError(
                f"the file has more than {max_lines} lines (SPEFT_MAX_FILE_LINES)", line=number
            )
        yield line


def _first_object(head: list[bytes]) -> object:
    """The first non-blank line parsed as JSON, or None when it is not JSON."""
    text = head[-1].removeprefix(_BOM) if len(head) == 1 else head[-1]
    try:
        return json.loads(text)
    except ValueError:
        return None  # parse_jsonl_lines names the line


def validate_dataset(lines: Iterable[bytes], *, max_lines: int) -> tuple[str, int]:
    """Detect the task from the first object and validate every line: (task, num_examples)."""
    lines = _limit_lines(lines, max_lines)
    head: list[bytes] = []
    for line in lines:  # up to and including the first non-blank line
        head.append(line)
        if line.strip() and line.strip() != _BOM:
            break
    if not head or not head[-1].strip():
        raise DatasetFormatError("the file contains no examples")
    first = _first_object(head)
    task = detect_task(first)
    if task is None and isinstance(first, dict):
        raise DatasetFormatError(
            "cannot tell the task: give 'text' and 'label' (classification), "
            "'prompt' and 'completion' or 'text' (causal_lm)", line=len(head),
        )
    task = task or "classification"  # not an object: the parser reports the line
    examples = parse_jsonl_lines(itertools.chain(head, lines), task)
    return task, len(examples)


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
) -> File:
    """Store an upload, validate it as a dataset, record it and commit; nothing stays stored on
    failure. The commit is made here, not after the route, so that a database failing after the
    object was put (down, or the commit refused) still deletes the object: no orphan."""
    if purpose != FILE_PURPOSE:
        raise InvalidRequest(f"purpose must be {FILE_PURPOSE!r}; got {purpose!r}", param="purpose")
    file_id = new_id("file")
    key = file_storage_key(file_id)
    try:
        stored = storage.put(key, data, max_bytes=max_bytes)
    except ObjectTooLarge as err:
        raise PayloadTooLarge(f"the file is larger than {err.limit} bytes", param="file") from err
    try:
        task, num_examples = validate_dataset(
            _lines(storage.stream(key, sha256=stored.sha256)), max_lines=max_lines
        )
        row = File(id=file_id, tenant_id=tenant_id, filename=filename, purpose=purpose,
                   bytes=stored.size, sha256=stored.sha256, storage_key=key,
                   num_examples=num_examples, task=task)
        session.add(row)
        session.commit()
    except BaseException as err:
        with contextlib.suppress(Exception):
            storage.delete(key)
        if isinstance(err, DatasetFormatError):
            raise InvalidRequest(err.message, param="file", code=err.code) from err
        raise
    return row


def get_file(session: Session, *, tenant_id: str, file_id: str) -> File:
    """The tenant's live file `file_id`; NotFound for missing, deleted or another tenant's files."""
    return stored_objects.get_live(session, File, tenant_id=tenant_id, object_id=file_id,
                                   noun="file", param="file_id")


def list_files(session: Session, *, tenant_id: str) -> list[File]:
    """The tenant's live files, newest first."""
    return stored_objects.list_live(session, File, tenant_id=tenant_id)


def file_content(session: Session, *, storage: Storage, tenant_id: str,
                 file_id: str) -> tuple[File, Iterator[bytes]]:
    """The tenant's file and its bytes as a stream verified against the recorded sha256."""
    row = get_file(session, tenant_id=tenant_id, file_id=file_id)
    return row, stored_objects.verified_stream(storage, row)


def delete_file(session: Session, *, storage: Storage, tenant_id: str, file_id: str) -> File:
    """Soft-delete the tenant's file (jobs keep their link) and remove its bytes."""
    row = get_file(session, tenant_id=tenant_id, file_id=file_id)
    return stored_objects.soft_delete(session, storage, row)
