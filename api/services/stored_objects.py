"""Tenant-scoped objects whose bytes live in storage (files, adapters): one way to read and delete.

Rows have `id`, `tenant_id`, `created_at`, `deleted_at`, `storage_key` and `sha256`. Scoping by
tenant happens here only: another tenant's object and a deleted one are both NotFound.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.core.models import utcnow
from api.core.storage import Storage
from api.errors import NotFound

Row = TypeVar("Row")


def _live(model: type[Row], *, tenant_id: str) -> Any:
    """SELECT of the tenant's rows of `model` that are not deleted."""
    table: Any = model
    return select(table).where(table.tenant_id == tenant_id, table.deleted_at.is_(None))


def get_live(session: Session, model: type[Row], *, tenant_id: str, object_id: str,
             noun: str, param: str) -> Row:
    """The tenant's live row `object_id`; NotFound (naming `param`) otherwise."""
    table: Any = model
    row = session.scalar(_live(model, tenant_id=tenant_id).where(table.id == object_id))
    if row is None:
        raise NotFound(f"no such {noun}: {object_id}", param=param)
    return row


def live_by_id(session: Session, model: type[Row], *, tenant_id: str,
               object_ids: Iterable[str]) -> dict[str, Row]:
    """Those of `object_ids` that are the tenant's live rows, by id, in one query."""
    table: Any = model
    rows = session.scalars(_live(model, tenant_id=tenant_id).where(table.id.in_(set(object_ids))))
    return {row.id: row for row in rows}


def list_live(session: Session, model: type[Row], *, tenant_id: str) -> list[Row]:
    """The tenant's live rows, newest first."""
    table: Any = model
    return list(session.scalars(
        _live(model, tenant_id=tenant_id).order_by(table.created_at.desc(), table.id.desc())
    ))


def verified_stream(storage: Storage, row: Any) -> Iterator[bytes]:
    """The row's stored bytes, checked against its recorded sha256 while streaming."""
    return storage.stream(row.storage_key, sha256=row.sha256)


def soft_delete(session: Session, storage: Storage, row: Row) -> Row:
    """Mark the row deleted (links to it stay valid) and remove its stored bytes."""
    target: Any = row
    target.deleted_at = utcnow()
    session.flush()
    storage.delete(target.storage_key)
    return row
