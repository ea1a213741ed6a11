"""Trained adapters: tenant-scoped reads, verified downloads and deletes."""
from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.core.models import Adapter, utcnow
from api.core.storage import Storage
from api.errors import NotFound
from api.schemas import AdapterObject


def get_adapter(session: Session, *, tenant_id: str, adapter_id: str) -> Adapter:
    """The tenant's live adapter; NotFound for missing, deleted or another tenant's adapters."""
    row = session.scalar(select(Adapter).where(
        Adapter.id == adapter_id, Adapter.tenant_id == tenant_id, Adapter.deleted_at.is_(None)
    ))
    if row is None:
        raise NotFound(f"no such adapter: {adapter_id}", param="adapter_id")
    return row


def list_adapters(session: Session, *, tenant_id: str) -> list[Adapter]:
    """The tenant's live adapters, newest first."""
    return list(session.scalars(
        select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.deleted_at.is_(None))
        .order_by(Adapter.created_at.desc(), Adapter.id.desc())
    ))


def adapter_content(session: Session, *, storage: Storage, tenant_id: str,
                    adapter_id: str) -> tuple[Adapter, Iterator[bytes]]:
    """The tenant's adapter and its delta file as a stream verified against the recorded sha256."""
    row = get_adapter(session, tenant_id=tenant_id, adapter_id=adapter_id)
    return row, storage.stream(row.storage_key, sha256=row.sha256)


def delete_adapter(session: Session, *, storage: Storage, tenant_id: str,
                   adapter_id: str) -> Adapter:
    """Soft-delete the tenant's adapter (its job keeps the link) and remove its delta file."""
    row = get_adapter(session, tenant_id=tenant_id, adapter_id=adapter_id)
    row.deleted_at = utcnow()
    session.flush()
    storage.delete(row.storage_key)
    return row


def adapter_object(row: Adapter) -> AdapterObject:
    """The public view of an adapter."""
    return AdapterObject(id=row.id, job_id=row.job_id, base_model=row.base_model, nnz=row.nnz,
                         density=row.density, metric=row.metric, bytes=row.bytes,
                         sha256=row.sha256, eval=row.eval or {},
                         created_at=int(row.created_at.timestamp()))
