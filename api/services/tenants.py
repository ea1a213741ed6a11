"""Tenants and API keys: keys made by `speft keys` or configured in SPEFT_API_KEYS, stored only as
sha256 plus a display prefix; keys resolved to tenants; open mode decided.

Keys from SPEFT_API_KEYS are synced at start-up with ids `key-env-…`. One missing from the
variable at a start is set aside (`unconfigured_at`, logged by prefix): refused while missing,
usable again once configured again. Only `speft keys revoke` revokes (`revoked_at`): a revoked
key stays refused, also while it is configured.
"""
from __future__ import annotations

import logging
import secrets

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import Session

from api.core.config import TENANT_NAME_RE, Settings
from api.core.db import dialect_insert
from api.core.models import ApiKey, Tenant, api_key_prefix, hash_api_key, new_id, utcnow
from api.errors import Conflict, InvalidRequest, NotFound

log = logging.getLogger(__name__)

NEW_KEY_PREFIX = "sk-"  # every key `speft keys create` makes starts so
NEW_KEY_BYTES = 32  # of randomness (secrets.token_urlsafe)
CONFIGURED_KEY_ID_PREFIX = "key-env"  # ids of keys synced from SPEFT_API_KEYS
# A shorter key is stored without a display prefix: a prefix must never be most of the key.
MIN_PREFIXED_KEY_LENGTH = 16


def get_or_create_tenant(session: Session, *, name: str) -> Tenant:
    """The tenant called `name`, created if missing (safe when two processes race)."""
    existing = session.scalar(select(Tenant).where(Tenant.name == name))
    if existing is not None:
        return existing
    session.execute(dialect_insert(session, Tenant).values(
        id=new_id("tenant"), name=name, created_at=utcnow()
    ).on_conflict_do_nothing(index_elements=["name"]))
    return session.scalars(select(Tenant).where(Tenant.name == name)).one()


def lock_tenant(session: Session, *, tenant_id: str) -> None:
    """Lock the tenant's row until the transaction ends, so per-tenant counts taken after an
    insert are taken one transaction after another (PostgreSQL: FOR NO KEY UPDATE, which does
    not block the foreign-key checks of rows inserted for the tenant; SQLite serialises writers
    anyway)."""
    session.execute(select(Tenant.id).where(Tenant.id == tenant_id)
                    .with_for_update(key_share=True))


def display_prefix(key: str) -> str:
    """The first characters of `key` kept for display; none for a key too short to spare them."""
    return api_key_prefix(key) if len(key) >= MIN_PREFIXED_KEY_LENGTH else ""


def usable_key() -> ColumnElement[bool]:
    """The condition a stored key must meet to authenticate: not revoked, not unconfigured."""
    return and_(ApiKey.revoked_at.is_(None), ApiKey.unconfigured_at.is_(None))


def _configured_key() -> ColumnElement[bool]:
    """Rows synced from SPEFT_API_KEYS (not made by `speft keys create`)."""
    return ApiKey.id.startswith(f"{CONFIGURED_KEY_ID_PREFIX}-")


def _names(rows: list[ApiKey]) -> str:
    """Keys named for a log line: their display prefix, or their id when they have none."""
    return ", ".join(row.prefix or row.id for row in rows)


def sync_configured_keys(session: Session, *, settings: Settings) -> None:
    """Store SPEFT_API_KEYS as hashed keys of their tenants, usable again if they were set aside,
    and set aside (with a warning naming them) configured keys no longer listed (idempotent)."""
    configured = settings.api_key_tenants
    hashes = [hash_api_key(key) for key in configured]
    for key, tenant_name in configured.items():
        if len(key) < MIN_PREFIXED_KEY_LENGTH:
            log.warning("SPEFT_API_KEYS: the key of tenant %s is shorter than %d characters; "
                        "prefer `speft keys create`", tenant_name, MIN_PREFIXED_KEY_LENGTH)
        tenant = get_or_create_tenant(session, name=tenant_name)
        statement = dialect_insert(session, ApiKey).values(
            id=new_id(CONFIGURED_KEY_ID_PREFIX), tenant_id=tenant.id, key_hash=hash_api_key(key),
            prefix=display_prefix(key), created_at=utcnow(),
        )
        # A key moved to another tenant in the configuration follows it; a revocation stays.
        session.execute(statement.on_conflict_do_update(
            index_elements=["key_hash"], set_={"tenant_id": tenant.id, "unconfigured_at": None}
        ))
    revoked = list(session.scalars(select(ApiKey).where(
        ApiKey.key_hash.in_(hashes), ApiKey.revoked_at.is_not(None)).order_by(ApiKey.id)))
    if revoked:
        log.warning("SPEFT_API_KEYS lists %d key(s) revoked with `speft keys revoke` (%s): they "
                    "stay refused", len(revoked), _names(revoked))
    dropped = list(session.scalars(select(ApiKey).where(
        _configured_key(), usable_key(), ApiKey.key_hash.not_in(hashes)).order_by(ApiKey.id)))
    if dropped:
        log.warning("SPEFT_API_KEYS no longer lists %d configured key(s) (%s): refused until "
                    "configured again (`speft keys revoke` refuses one for good)",
                    len(dropped), _names(dropped))
        session.execute(update(ApiKey).where(ApiKey.id.in_([row.id for row in dropped]))
                        .values(unconfigured_at=utcnow()))


def has_active_keys(session: Session) -> bool:
    """True when the database holds at least one usable API key."""
    return session.scalar(select(ApiKey.id).where(usable_key()).limit(1)) is not None


def is_open_mode(session: Session, *, settings: Settings) -> bool:
    """Open mode (one tenant, no authentication): no SPEFT_API_KEYS and no usable stored key."""
    return settings.open_mode and not has_active_keys(session)


def decide_open_mode(session: Session, *, settings: Settings) -> bool:
    """At start-up, on a migrated database: sync SPEFT_API_KEYS, then decide open mode."""
    sync_configured_keys(session, settings=settings)
    return is_open_mode(session, settings=settings)


def tenant_for_api_key(session: Session, *, key: str) -> Tenant | None:
    """The tenant owning the usable API key `key`, or None."""
    return session.scalar(
        select(Tenant).join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_api_key(key), usable_key())
    )


def create_api_key(session: Session, *, tenant_name: str) -> tuple[ApiKey, str]:
    """A new random key for `tenant_name` (created if missing): (its row, the key itself).

    Only the key's sha256 and display prefix are stored; the key is returned this once.
    """
    if not TENANT_NAME_RE.match(tenant_name):
        raise InvalidRequest(f"invalid tenant name {tenant_name!r} (letters, digits, '_', '.', "
                             "'-'; at most 64)", param="tenant")
    tenant = get_or_create_tenant(session, name=tenant_name)
    key = NEW_KEY_PREFIX + secrets.token_urlsafe(NEW_KEY_BYTES)
    row = ApiKey(id=new_id("key"), tenant_id=tenant.id, key_hash=hash_api_key(key),
                 prefix=display_prefix(key), created_at=utcnow())
    session.add(row)
    session.flush()
    return row, key


def revoke_api_key(session: Session, *, id_or_prefix: str) -> ApiKey:
    """Revoke the key with this id, or the one key with this display prefix (idempotent)."""
    if not id_or_prefix:
        raise NotFound("give a key's id or prefix", param="key")
    matches = list(session.scalars(select(ApiKey).where(
        or_(ApiKey.id == id_or_prefix, ApiKey.prefix == id_or_prefix)).order_by(ApiKey.id)))
    exact = [row for row in matches if row.id == id_or_prefix]
    if exact:
        matches = exact
    if not matches:
        raise NotFound(f"no API key has the id or prefix {id_or_prefix!r}", param="key")
    if len(matches) > 1:
        raise Conflict(f"{len(matches)} keys have the prefix {id_or_prefix!r}: give the id "
                       f"({', '.join(row.id for row in matches)})", param="key")
    row = matches[0]
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    return row


def list_api_keys(session: Session, *, tenant_name: str | None = None) -> list[tuple[ApiKey, str]]:
    """Stored keys (never the keys themselves) with their tenant's name, oldest first."""
    statement = (select(ApiKey, Tenant.name).join(Tenant, ApiKey.tenant_id == Tenant.id)
                 .order_by(ApiKey.created_at, ApiKey.id))
    if tenant_name is not None:
        statement = statement.where(Tenant.name == tenant_name)
    return [(row, name) for row, name in session.execute(statement).all()]
