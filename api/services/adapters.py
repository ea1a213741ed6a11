"""Trained adapters: tenant-scoped reads, verified downloads and deletes."""
from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy.orm import Session

from api.core.models import Adapter
from api.core.storage import Storage
from api.services import stored_objects


def get_adapter(session: Session, *, tenant_id: str, adapter_id: str) -> Adapter:
    """The tenant's live adapter; NotFound for missing, deleted or another tenant's adapters."""
    return stored_objects.get_live(session, Adapter, tenant_id=tenant_id, object_id=adapter_id,
                                   noun="adapter", param="adapter_id")


def list_adapters(session: Session, *, tenant_id: str) -> list[Adapter]:
    """The tenant's live adapters, newest first."""
    return stored_objects.list_live(session, Adapter, tenant_id=tenant_id)


def adapter_content(session: Session, *, storage: Storage, tenant_id: str,
                    adapter_id: str) -> tuple[Adapter, Iterator[bytes]]:
    """The tenant's adapter and its delta file as a stream verified against the recorded sha256."""
    row = get_adapter(session, tenant_id=tenant_id, adapter_id=adapter_id)
    return row, stored_objects.verified_stream(storage, row)


def delete_adapter(session: Session, *, storage: Storage, tenant_id: str,
                   adapter_id: str) -> Adapter:
    """Soft-delete the tenant's adapter (its job keeps the link); its delta file goes after the
    commit."""
    row = get_adapter(session, tenant_id=tenant_id, adapter_id=adapter_id)
    return stored_objects.soft_delete(session, storage, row)

