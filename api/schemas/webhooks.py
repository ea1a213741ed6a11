"""`/v1/webhooks` schemas: endpoints (the secret shown once), deliveries and their attempts."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from api.schemas.common import PublicModel, StrictModel, UnixTime


class WebhookCreate(StrictModel):
    """POST /v1/webhooks body."""

    url: str = Field(min_length=1, max_length=2048,
                     description="http(s) URL resolving to public addresses")
    events: list[str] | None = Field(
        default=None, max_length=8,
        description="fine_tuning.job.succeeded, .failed, .cancelled (the default: all three) "
                    "and fine_tuning.job.checkpoint.created (opt-in)")


class WebhookObject(PublicModel):
    """A webhook endpoint (its secret is shown only when it is created)."""

    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    events: list[str]
    created_at: UnixTime


class WebhookCreated(WebhookObject):
    """POST /v1/webhooks answer: the endpoint and its signing secret, shown this once."""

    secret: str = Field(description="whsec_ + base64 key (Standard Webhooks)")


class WebhookList(BaseModel):
    """The tenant's endpoints, newest first."""

    object: Literal["list"] = "list"
    data: list[WebhookObject]


class WebhookDeleted(BaseModel):
    """DELETE answer."""

    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    deleted: bool = True


class WebhookAttemptObject(PublicModel):
    """One POST of a delivery."""

    number: int
    created_at: UnixTime
    status_code: int | None = None
    error: str | None = None
    duration_ms: float


class WebhookDeliveryObject(PublicModel):
    """One event sent (or being sent) to an endpoint; `id` is its `webhook-id`."""

    id: str
    object: Literal["webhook_delivery"] = "webhook_delivery"
    event_type: str
    job_id: str | None = None
    status: Literal["pending", "delivered", "failed"]
    created_at: UnixTime
    finished_at: UnixTime | None = None
    attempts: list[WebhookAttemptObject] = Field(validation_alias="tries")


class WebhookDeliveryList(BaseModel):
    """An endpoint's deliveries, newest first (the latest 100)."""

    object: Literal["list"] = "list"
    data: list[WebhookDeliveryObject]
