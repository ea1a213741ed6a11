"""Request dependencies as `Annotated` aliases: settings, a session, storage and the tenant."""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.core.config import Settings
from api.core.models import Tenant
from api.core.storage import Storage
from api.core.unit_of_work import commit_and_run, unit_of_work
from api.errors import Unauthorized
from api.services import tenants
from api.services.quotas import TenantRateLimiter

_bearer = HTTPBearer(auto_error=False,
                     description="An API key (`speft keys create`, or SPEFT_API_KEYS)")


def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """A session for this request, the one owner of its commit: committed (then its after-commit
    actions run) when the handler succeeds, rolled back (then its after-rollback actions run)
    otherwise. See `api.core.unit_of_work`."""
    with request.app.state.sessions() as session, unit_of_work(session):
        yield session


def _committing(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """`endpoint`, committing its request session (`commit_and_run`) once it returns, in its own
    thread."""
    @functools.wraps(endpoint)
    def handler(*args: Any, **kwargs: Any) -> Any:
        result = endpoint(*args, **kwargs)
        for value in kwargs.values():
            if isinstance(value, Session):
                commit_and_run(value)
        return result

    handler.commits_session = True  # type: ignore[attr-defined]
    return handler


class SessionRoute(APIRoute):
    """A route whose sync handler commits the request's session as it returns, on the handler's
    thread, so the connection is back in the pool before FastAPI waits for another thread to
    validate the response; the dependency's exit then finds nothing to commit (it still rolls
    back on an error). Without it, requests holding connections would wait for threads held by
    requests waiting for connections: the pool starves. Every router uses it."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        if not inspect.iscoroutinefunction(endpoint) and not getattr(
                endpoint, "commits_session", False):
            endpoint = _committing(endpoint)
        super().__init__(path, endpoint, **kwargs)


def get_storage(request: Request) -> Storage:
    """The app's object storage."""
    return request.app.state.storage


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
# scope="function": the commit happens before the response is sent, so a 2xx means committed.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
StorageDep = Annotated[Storage, Depends(get_storage)]


def authenticate_tenant(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    """The calling tenant: the API key's owner, or the default tenant in open mode; else 401.

    Open mode is decided once at start-up (`app.state.open_mode`); before that, keys are required.
    The key is looked up in a transaction of its own, so its connection goes back to the pool at
    once instead of being held while the request waits for a thread or a model.
    """
    if request.app.state.open_mode:
        return request.app.state.open_tenant
    if credentials is None:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})
    with request.app.state.sessions() as session:  # read only; closing it rolls back
        tenant = tenants.tenant_for_api_key(session, key=credentials.credentials)
    if tenant is None:
        raise Unauthorized("invalid API key", headers={"WWW-Authenticate": "Bearer"})
    return tenant


def get_tenant(request: Request,
               tenant: Annotated[Tenant, Depends(authenticate_tenant)]) -> Tenant:
    """The authenticated tenant, this request counted against its rate limit (429 beyond it)."""
    limiter: TenantRateLimiter | None = request.app.state.rate_limiter
    if limiter is not None:
        limiter.check(tenant.id)
    return tenant


# Every authenticated route takes the tenant through this alias: one place for keys and limits.
TenantDep = Annotated[Tenant, Depends(get_tenant)]
