"""Tenants and API keys: configured keys synced into the database, keys resolved to tenants."""
from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.core.config import Settings
from api.core.db import dialect_insert
from api.core.models import ApiKey, Tenant, api_key_prefix, hash_api_key, new_id, utcnow


def get_or_create_tenant(session: Session, *, name: str) -> Tenant:
    """The tenant called `name`, created if missing (safe when two processes race)."""
    existing = session.scalar(select(Tenant).where(Tenant.name == name))
    if existing is not None:
        return existing
    session.execute(dialect_insert(session, Tenant).values(
        id=new_id("tenant"), name=name, created_at=utcnow()
    ).on_conflict_do_nothing(index_elements=["name"]))
    return session.scalars(select(Tenant).where(Tenant.name == name)).one()


def sync_configured_keys(session: Session, *, settings: Settings) -> None:
    """Store SPEFT_API_KEYS as hashed keys of their tenants (idempotent); ensure the open-mode tenant."""
    if settings.open_mode:
        get_or_create_tenant(session, name=settings.default_tenant)
        return
    for key, tenant_name in settings.api_key_tenants.items():
        tenant = get_or_create_tenant(session, name=tenant_name)
        key_hash = hash_api_key(key)
        statement = dialect_insert(session, ApiKey).values(
            id=new_id("key"), tenant_id=tenant.id, key_hash=key_hash,
            prefix=api_key_prefix(key), created_at=utcnow(),
        )
        # A key moved to another tenant in the configuration follows it.
        session.execute(statement.on_conflict_do_update(
            index_elements=["key_hash"], set_={"tenant_id": tenant.id}
        ))


def tenant_for_api_key(session: Session, *, key: str) -> Tenant | None:
    """The tenant owning the unrevoked API key `key`, or None."""
    return session.scalar(
        select(Tenant).join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_api_key(key), ApiKey.revoked_at.is_(None))
    )
