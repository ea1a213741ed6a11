"""Request dependencies as `Annotated` aliases: settings, a session, storage and the tenant."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.core.config import Settings
from api.core.models import Tenant
from api.core.storage import Storage
from api.errors import Unauthorized
from api.services import tenants

_bearer = HTTPBearer(auto_error=False, description="An API key from SPEFT_API_KEYS")


def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """A session for this request: committed when the handler succeeds, rolled back otherwise."""
    with request.app.state.sessions() as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def get_storage(request: Request) -> Storage:
    """The app's object storage."""
    return request.app.state.storage


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
# scope="function": the commit happens before the response is sent, so a 2xx means committed.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
StorageDep = Annotated[Storage, Depends(get_storage)]


def get_tenant(
    request: Request,
    settings: SettingsDep,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    """The calling tenant: the API key's owner, or the default tenant in open mode; else 401."""
    if settings.open_mode:
        cached = getattr(request.app.state, "open_tenant", None)  # set at start-up
        return cached or tenants.get_or_create_tenant(session, name=settings.default_tenant)
    if credentials is None:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})
    tenant = tenants.tenant_for_api_key(session, key=credentials.credentials)
    if tenant is None:
        raise Unauthorized("invalid API key", headers={"WWW-Authenticate": "Bearer"})
    return tenant


TenantDep = Annotated[Tenant, Depends(get_tenant)]
