"""The `speft.deliver_webhook` task: sign one delivery's body and POST it, with Celery's retry.

Signing is the Standard Webhooks scheme, by its reference package: headers `webhook-id` (the
delivery id, stable across retries, so a receiver can drop duplicates), `webhook-timestamp`
(Unix seconds) and `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">` with
the endpoint's `whsec_` secret. A 2xx delivers; anything else (another status, a timeout, a
refused connection, a URL that now resolves to a forbidden address) is one failed attempt,
logged, and Celery retries with exponential back-off (SPEFT_WEBHOOK_BACKOFF_S doubling, at most
10 minutes, SPEFT_WEBHOOK_MAX_RETRIES times) before the delivery is given up as `failed`.
Redirects are not followed.
"""
from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

import httpx
from standardwebhooks.webhooks import Webhook

from api.core.config import get_settings
from api.core.db import get_session_factory
from api.core.models import WebhookDelivery, WebhookEndpoint
from api.core.queue import DELIVER_WEBHOOK_TASK
from api.core.unit_of_work import unit_of_work
from api.services import webhooks
from worker.celery_app import app

log = logging.getLogger(__name__)
BACKOFF_MAX_S = 600


class DeliveryFailed(Exception):
    """One attempt did not deliver; Celery retries the task."""


def signed_headers(endpoint: WebhookEndpoint, delivery_id: str, body: str) -> dict[str, str]:
    """The Standard Webhooks headers for `body`, signed now with the endpoint's secret."""
    now = datetime.now(tz=UTC)
    signature = Webhook(endpoint.secret).sign(msg_id=delivery_id, timestamp=now, data=body)
    return {"webhook-id": delivery_id, "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signature, "content-type": "application/json",
            "user-agent": "speft-webhooks/1"}


def post(endpoint: WebhookEndpoint, delivery_id: str, body: str) -> tuple[int | None, str | None]:
    """One POST: (status code, None), or (None, why there was no answer)."""
    settings = get_settings()
    try:
        webhooks.check_url(endpoint.url, allow_loopback=settings.webhook_allow_loopback)
        answer = httpx.post(endpoint.url, content=body.encode(), timeout=settings.webhook_timeout_s,
                            headers=signed_headers(endpoint, delivery_id, body),
                            follow_redirects=False)
    except webhooks.UnsafeURL as err:
        return None, f"refused: {err}"
    except httpx.HTTPError as err:
        return None, f"{type(err).__name__}: {err}"
    return answer.status_code, None


@app.task(name=DELIVER_WEBHOOK_TASK, bind=True, autoretry_for=(DeliveryFailed,),
          retry_backoff=get_settings().webhook_backoff_s, retry_backoff_max=BACKOFF_MAX_S,
          retry_jitter=False, max_retries=get_settings().webhook_max_retries)
def deliver_webhook(self, delivery_id: str) -> str:
    """POST one delivery; its status afterwards (pending means a retry follows)."""
    with get_session_factory()() as session, unit_of_work(session):
        delivery = session.get(WebhookDelivery, delivery_id)
        if delivery is None or delivery.status != webhooks.PENDING:
            return delivery.status if delivery else "missing"
        endpoint = session.get(WebhookEndpoint, delivery.endpoint_id)
        if endpoint is None or endpoint.deleted_at is not None:
            delivery.status = webhooks.FAILED
            return delivery.status
        started = time.perf_counter()
        status_code, error = post(endpoint, delivery_id, webhooks.body_of(delivery))
        final = self.request.retries >= self.max_retries
        webhooks.record_attempt(session, delivery=delivery, status_code=status_code,
                                error=error, duration_ms=1000 * (time.perf_counter() - started),
                                final=final)
        outcome = delivery.status
    log.info("speft.webhook %s attempt %d: %s", delivery_id, self.request.retries + 1,
             status_code or error)
    if outcome == webhooks.PENDING:
        raise DeliveryFailed(f"{delivery_id}: {status_code or error}")
    return outcome
