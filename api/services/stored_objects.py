"""Tenant-scoped objects whose bytes live in storage (files, adapters): one way to read and delete.

Rows have `id`, `tenant_id`, `created_at`, `deleted_at`, `purged_at`, `storage_key` and `sha256`.
Scoping by tenant happens here only: another tenant's object and a deleted one are both NotFound.

A delete marks the row and removes its bytes only once that mark is committed (an after-commit
action), then stamps `purged_at`: a failed commit leaves the row live and its object readable; a
failed object delete after the commit leaves an orphan object that the reconciler's sweep
(`purge_deleted`) removes.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from api.core.models import utcnow
from api.core.storage import Storage
from api.core.unit_of_work import after_commit, commit_and_run
from api.errors import InvalidRequest, NotFound
from api.services.pages import SortOrder, keyset_page

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


def page_live(session: Session, model: type[Row], *, tenant_id: str, noun: str, limit: int,
              after: str | None = None, order: SortOrder = "desc",
              where: Iterable[Any] = ()) -> tuple[list[Row], bool]:
    """A page of the tenant's live rows (also matching `where`) strictly after row `after`, by
    creation time in `order`; (rows, has_more). The cursor may be a row deleted since it was
    listed; one that was never the tenant's is InvalidRequest naming `after`."""
    table: Any = model
    cursor = None
    if after is not None:
        cursor = session.scalar(select(table).where(table.tenant_id == tenant_id,
                                                    table.id == after))
        if cursor is None:
            raise InvalidRequest(f"unknown cursor: no such {noun} {after}",
                                 param="after")
    query = _live(model, tenant_id=tenant_id).where(*where)
    return keyset_page(session, query, model, cursor=cursor, limit=limit, order=order)


def verified_stream(storage: Storage, row: Any) -> Iterator[bytes]:
    """The row's stored bytes, checked against its recorded sha256 while streaming."""
    return storage.stream(row.storage_key, sha256=row.sha256)


def soft_delete(session: Session, storage: Storage, row: Row) -> Row:
    """Mark the row deleted (links to it stay valid) and flush; its stored bytes are removed
    after the commit (and the row marked purged), or later by the sweep if that fails."""
    target: Any = row
    target.deleted_at = utcnow()
    session.flush()
    model, object_id, key = type(row), target.id, target.storage_key

    def purge_after_commit() -> None:
        purge(session, storage, model, object_id=object_id, storage_key=key)
        commit_and_run(session)

    after_commit(session, purge_after_commit)
    return row


def delete_stored(storage: Storage, model: type[Row], storage_key: str) -> None:
    """Delete a row's stored object and its companions (`model.companion_keys`, e.g. a
    checkpoint's training state); missing objects are fine."""
    companions = getattr(model, "companion_keys", lambda key: [])(storage_key)
    for key in (storage_key, *companions):
        storage.delete(key)


def purge(session: Session, storage: Storage, model: type[Row], *, object_id: str,
          storage_key: str) -> None:
    """Delete a deleted row's stored bytes (a missing object is fine) and mark it purged; the
    caller commits."""
    table: Any = model
    delete_stored(storage, model, storage_key)
    session.execute(update(table).where(table.id == object_id).values(purged_at=utcnow()))


def purge_deleted(session: Session, storage: Storage, model: type[Row], *,
                  deleted_before: datetime, limit: int) -> list[str]:
    """Purge up to `limit` rows deleted before `deleted_before` whose bytes were never removed
    (their after-commit delete failed): the orphan sweep. Returns their ids; the caller commits."""
    table: Any = model
    orphans = session.execute(
        select(table.id, table.storage_key)
        .where(table.deleted_at < deleted_before, table.purged_at.is_(None))
        .order_by(table.deleted_at).limit(limit)
    ).all()
    for object_id, key in orphans:
        purge(session, storage, model, object_id=object_id, storage_key=key)
    return [object_id for object_id, _ in orphans]
