"""`/v1/webhooks`: register, list, read and delete endpoints; list their deliveries."""
from __future__ import annotations

from fastapi import APIRouter, Request, status

from api.deps import SessionDep, SessionRoute, TenantDep
from api.errors import COMMON_ERRORS, error_responses
from api.schemas.webhooks import (
    WebhookCreate,
    WebhookCreated,
    WebhookDeleted,
    WebhookDeliveryList,
    WebhookDeliveryObject,
    WebhookList,
    WebhookObject,
)
from api.services import webhooks

router = APIRouter(prefix="/webhooks", tags=["webhooks"],
                   responses=error_responses(*COMMON_ERRORS), route_class=SessionRoute)


@router.post("", response_model=WebhookCreated, status_code=status.HTTP_201_CREATED)
def create_webhook(body: WebhookCreate, request: Request, session: SessionDep,
                   tenant: TenantDep) -> WebhookCreated:
    """Register an endpoint; the answer carries its signing secret, shown this once."""
    row = webhooks.create_endpoint(
        session, tenant_id=tenant.id, url=body.url, events=body.events,
        allow_loopback=request.app.state.settings.webhook_allow_loopback)
    return WebhookCreated.model_validate(row)


@router.get("", response_model=WebhookList)
def list_webhooks(session: SessionDep, tenant: TenantDep) -> WebhookList:
    """The tenant's endpoints, newest first (no secrets)."""
    rows = webhooks.list_endpoints(session, tenant_id=tenant.id)
    return WebhookList(data=[WebhookObject.model_validate(row) for row in rows])


@router.get("/{endpoint_id}", response_model=WebhookObject, responses=error_responses(404))
def get_webhook(endpoint_id: str, session: SessionDep, tenant: TenantDep) -> WebhookObject:
    """One endpoint (no secret)."""
    return WebhookObject.model_validate(
        webhooks.get_endpoint(session, tenant_id=tenant.id, endpoint_id=endpoint_id))


@router.delete("/{endpoint_id}", response_model=WebhookDeleted, responses=error_responses(404))
def delete_webhook(endpoint_id: str, session: SessionDep, tenant: TenantDep) -> WebhookDeleted:
    """Delete an endpoint: no new events; its pending deliveries stop."""
    row = webhooks.delete_endpoint(session, tenant_id=tenant.id, endpoint_id=endpoint_id)
    return WebhookDeleted(id=row.id)


@router.get("/{endpoint_id}/deliveries", response_model=WebhookDeliveryList,
            responses=error_responses(404))
def list_deliveries(endpoint_id: str, session: SessionDep,
                    tenant: TenantDep) -> WebhookDeliveryList:
    """The endpoint's latest deliveries with every attempt, newest first."""
    rows = webhooks.list_deliveries(session, tenant_id=tenant.id, endpoint_id=endpoint_id)
    return WebhookDeliveryList(data=[WebhookDeliveryObject.model_validate(r) for r in rows])
