"""The `speft.deliver_webhook` task: sign one delivery's body and POST it, with Celery's retry.

Signing is the Standard Webhooks scheme, by its reference package: headers `webhook-id` (the
delivery id, stable across retries, so a receiver can drop duplicates), `webhook-timestamp`
(Unix seconds) and `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">` with
the endpoint's `whsec_` secret. A 2xx delivers; anything else (another status, a timeout, a
refused connection, a URL that now resolves to a forbidden address) is one failed attempt, and
Celery retries with exponential back-off (SPEFT_WEBHOOK_BACKOFF_S doubling, at most 10 minutes,
SPEFT_WEBHOOK_MAX_RETRIES times) before the delivery is given up as `failed`.

The URL is checked again before every POST and the POST connects to the addresses that passed
(worker/webhook_http.py); the whole attempt, connection to headers, ends within
SPEFT_WEBHOOK_TIMEOUT_S, and the answer's body is never read. Redirects are not followed. No
database transaction is open while the POST waits. An attempt's recorded error is one of
`api.services.webhooks.ATTEMPT_ERRORS`, without network detail; the detail is in this worker's
log. The task runs on the webhook queue, read by the control worker's threads, never behind a
training job.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import httpcore
from standardwebhooks.webhooks import Webhook

from api.core.config import get_settings
from api.core.db import get_session_factory
from api.core.models import WebhookDelivery, WebhookEndpoint
from api.core.queue import DELIVER_WEBHOOK_TASK
from api.core.unit_of_work import unit_of_work
from api.services import webhooks
from api.services.webhook_urls import UnsafeURL, check_url
from worker.celery_app import app
from worker.webhook_http import post_webhook

log = logging.getLogger(__name__)
BACKOFF_MAX_S = 600


class DeliveryFailed(Exception):
    """One attempt did not deliver; Celery retries the task."""


@dataclass(frozen=True)
class OutgoingPost:
    """What one attempt sends: the endpoint's URL and secret, the delivery's fixed body."""

    delivery_id: str
    url: str
    secret: str
    body: str


def signed_headers(secret: str, delivery_id: str, body: str) -> dict[str, str]:
    """The Standard Webhooks headers for `body`, signed now with the endpoint's secret."""
    now = datetime.now(tz=UTC)
    signature = Webhook(secret).sign(msg_id=delivery_id, timestamp=now, data=body)
    return {"webhook-id": delivery_id, "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signature, "content-type": "application/json",
            "user-agent": "speft-webhooks/1"}


def attempt_error(err: Exception) -> str:
    """The error an attempt records for `err`: one of webhooks.ATTEMPT_ERRORS."""
    if isinstance(err, UnsafeURL):
        return webhooks.REFUSED
    if isinstance(err, httpcore.TimeoutException):
        return webhooks.TIMED_OUT
    if isinstance(err, httpcore.ProtocolError):
        return webhooks.BAD_ANSWER
    return webhooks.CONNECTION_FAILED


def post(request: OutgoingPost) -> tuple[int | None, str | None]:
    """One POST: (status code, None), or (None, why there was no answer)."""
    settings = get_settings()
    try:
        target = check_url(request.url, allow_loopback=settings.webhook_allow_loopback)
        status = post_webhook(target, body=request.body.encode(),
                              headers=signed_headers(request.secret, request.delivery_id,
                                                     request.body),
                              timeout_s=settings.webhook_timeout_s)
    except (UnsafeURL, httpcore.TimeoutException, httpcore.NetworkError,
            httpcore.ProtocolError, httpcore.UnsupportedProtocol) as err:
        log.warning("speft.webhook %s no answer from %s: %s: %s", request.delivery_id,
                    request.url, type(err).__name__, err)
        return None, attempt_error(err)
    return status, None


def _request_for(delivery_id: str) -> OutgoingPost | str:
    """What to send for a pending delivery; otherwise its status (`failed` once its endpoint
    is gone, committed)."""
    with get_session_factory()() as session, unit_of_work(session):
        delivery = session.get(WebhookDelivery, delivery_id)
        if delivery is None or delivery.status != webhooks.PENDING:
            return delivery.status if delivery else "missing"
        endpoint = session.get(WebhookEndpoint, delivery.endpoint_id)
        if endpoint is None or endpoint.deleted_at is not None:
            delivery.status = webhooks.FAILED
            return delivery.status
        return OutgoingPost(delivery_id, endpoint.url, endpoint.secret, webhooks.body_of(delivery))


@app.task(name=DELIVER_WEBHOOK_TASK, bind=True, autoretry_for=(DeliveryFailed,),
          retry_backoff=get_settings().webhook_backoff_s, retry_backoff_max=BACKOFF_MAX_S,
          retry_jitter=False, max_retries=get_settings().webhook_max_retries)
def deliver_webhook(self, delivery_id: str) -> str:
    """POST one delivery; its status afterwards (pending means a retry follows)."""
    request = _request_for(delivery_id)
    if isinstance(request, str):
        return request
    started = time.perf_counter()
    status_code, error = post(request)  # no transaction is open while it waits
    duration_ms = 1000 * (time.perf_counter() - started)
    with get_session_factory()() as session, unit_of_work(session):
        delivery = session.get(WebhookDelivery, delivery_id)
        if delivery is None:
            return "missing"
        webhooks.record_attempt(session, delivery=delivery, status_code=status_code,
                                error=error, duration_ms=duration_ms,
                                final=self.request.retries >= self.max_retries)
        outcome = delivery.status
    log.info("speft.webhook %s attempt %d: %s", delivery_id, self.request.retries + 1,
             status_code or error)
    if outcome == webhooks.PENDING:
        raise DeliveryFailed(f"{delivery_id}: {status_code or error}")
    return outcome
