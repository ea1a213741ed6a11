"""Webhooks: a tenant's endpoints, the events recorded for them, and their deliveries.

An event (`fine_tuning.job.succeeded`, `.failed`, `.cancelled`; `fine_tuning.job.checkpoint.
created` for endpoints that ask for it) becomes one `WebhookDelivery` row per subscribed live
endpoint, in the transaction that made it happen; its body is fixed then. Rows are sent to the
`speft.deliver_webhook` task after the commit by the worker that ended the job, and by the
reconciler's sweep for those nobody sent (an API-side cancel, a lost message): `take_unsent`.
The task (worker/webhooks.py) signs and POSTs, recording every attempt; Celery retries with
back-off. A slow or dead receiver holds a delivery, never a job.

URLs must be http(s) and resolve to public addresses only (`api.services.webhook_urls`),
checked when an endpoint is made and again before every POST, which connects to the addresses
that passed; `SPEFT_WEBHOOK_ALLOW_LOOPBACK=true` admits loopback addresses. A tenant has at most
MAX_ENDPOINTS_PER_TENANT live endpoints, counted after the insert under the tenant's row lock.
"""
from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from api.core.models import Job, JobStatus, WebhookAttempt, WebhookDelivery, WebhookEndpoint, utcnow
from api.errors import InvalidRequest, NotFound
from api.services.tenants import lock_tenant
from api.services.webhook_urls import UnsafeURL, check_url

JOB_EVENTS = {JobStatus.SUCCEEDED: "fine_tuning.job.succeeded",
              JobStatus.FAILED: "fine_tuning.job.failed",
              JobStatus.CANCELLED: "fine_tuning.job.cancelled"}
CHECKPOINT_EVENT = "fine_tuning.job.checkpoint.created"
EVENT_TYPES = (*JOB_EVENTS.values(), CHECKPOINT_EVENT)
DEFAULT_EVENTS = tuple(JOB_EVENTS.values())
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
# Why an attempt got no answer, as the tenant reads it: no address, port or system error, which
# would map the network behind the worker (the worker's log has the detail).
REFUSED, TIMED_OUT, CONNECTION_FAILED, BAD_ANSWER = (
    "refused: address not allowed", "timed out", "connection failed", "invalid HTTP answer")
ATTEMPT_ERRORS = (REFUSED, TIMED_OUT, CONNECTION_FAILED, BAD_ANSWER)
MAX_ENDPOINTS_PER_TENANT = 20


def new_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def create_endpoint(session: Session, *, tenant_id: str, url: str, events: Sequence[str] | None,
                    allow_loopback: bool) -> WebhookEndpoint:
    """Register an endpoint (flushed); 400 naming `url` or `events` when they are refused (the
    caller rolls the insert back)."""
    try:
        check_url(url, allow_loopback=allow_loopback)
    except UnsafeURL as err:
        raise InvalidRequest(str(err), param="url") from err
    chosen = list(dict.fromkeys(events)) if events is not None else list(DEFAULT_EVENTS)
    unknown = [e for e in chosen if e not in EVENT_TYPES]
    if unknown or not chosen:
        raise InvalidRequest(f"events must be a non-empty list of {', '.join(EVENT_TYPES)}"
                             + (f"; got {unknown[0]!r}" if unknown else ""), param="events")
    row = WebhookEndpoint(tenant_id=tenant_id, url=url, secret=new_secret(), events=chosen)
    session.add(row)
    session.flush()
    # Counted after the insert, the tenant locked: concurrent creates count one after another.
    lock_tenant(session, tenant_id=tenant_id)
    if len(list_endpoints(session, tenant_id=tenant_id)) > MAX_ENDPOINTS_PER_TENANT:
        raise InvalidRequest(f"at most {MAX_ENDPOINTS_PER_TENANT} webhook endpoints a tenant",
                             param="url")
    return row


def list_endpoints(session: Session, *, tenant_id: str) -> list[WebhookEndpoint]:
    """The tenant's live endpoints, newest first."""
    return list(session.scalars(select(WebhookEndpoint).where(
        WebhookEndpoint.tenant_id == tenant_id, WebhookEndpoint.deleted_at.is_(None))
        .order_by(WebhookEndpoint.created_at.desc(), WebhookEndpoint.id.desc())))


def get_endpoint(session: Session, *, tenant_id: str, endpoint_id: str) -> WebhookEndpoint:
    """The tenant's live endpoint; NotFound otherwise."""
    row = session.get(WebhookEndpoint, endpoint_id)
    if row is None or row.tenant_id != tenant_id or row.deleted_at is not None:
        raise NotFound(f"no such webhook endpoint: {endpoint_id}", param="endpoint_id")
    return row


def delete_endpoint(session: Session, *, tenant_id: str, endpoint_id: str) -> WebhookEndpoint:
    """Delete an endpoint: it gets no new events; pending deliveries to it stop."""
    row = get_endpoint(session, tenant_id=tenant_id, endpoint_id=endpoint_id)
    row.deleted_at = utcnow()
    session.flush()
    return row


def list_deliveries(session: Session, *, tenant_id: str, endpoint_id: str,
                    limit: int = 100) -> list[WebhookDelivery]:
    """An endpoint's deliveries with their attempts, newest first."""
    get_endpoint(session, tenant_id=tenant_id, endpoint_id=endpoint_id)
    return list(session.scalars(select(WebhookDelivery)
                                .where(WebhookDelivery.endpoint_id == endpoint_id)
                                .order_by(WebhookDelivery.created_at.desc()).limit(limit)))


def record_event(session: Session, *, tenant_id: str, event_type: str, data: dict[str, Any],
                 job_id: str | None = None) -> list[str]:
    """One pending delivery per live endpoint of the tenant subscribed to `event_type`
    (flushed); their ids."""
    endpoints = [e for e in list_endpoints(session, tenant_id=tenant_id)
                 if event_type in (e.events or [])]
    rows = [WebhookDelivery(endpoint_id=e.id, job_id=job_id, event_type=event_type,
                            payload={"type": event_type, "data": data}, status=PENDING,
                            attempts=0) for e in endpoints]
    session.add_all(rows)
    session.flush()
    return [row.id for row in rows]


def record_job_event(session: Session, *, job_id: str, status: JobStatus) -> list[str]:
    """The deliveries of a job's terminal status (succeeded, failed, cancelled), the job in
    its API shape as `data`."""
    from api.schemas.jobs import JobObject  # the API's own rendering of a job

    event_type = JOB_EVENTS.get(status)
    job = session.get(Job, job_id)
    if event_type is None or job is None:
        return []
    session.refresh(job)
    data = JobObject.model_validate(job).model_dump(mode="json")
    return record_event(session, tenant_id=job.tenant_id, event_type=event_type, data=data,
                        job_id=job_id)


def take_unsent(session: Session, *, job_id: str | None = None,
                sent_before: datetime | None = None, limit: int = 100) -> list[str]:
    """Pending deliveries never sent (or, with `sent_before`, last sent before it: their
    message was lost), marked sent now; the caller sends them after committing."""
    query = select(WebhookDelivery.id).where(WebhookDelivery.status == PENDING)
    if job_id is not None:
        query = query.where(WebhookDelivery.job_id == job_id)
    unsent = WebhookDelivery.sent_at.is_(None)
    query = query.where(unsent if sent_before is None
                        else unsent | (WebhookDelivery.sent_at < sent_before))
    ids = list(session.scalars(query.order_by(WebhookDelivery.created_at).limit(limit)))
    if ids:
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id.in_(ids))
                        .values(sent_at=utcnow()).execution_options(synchronize_session=False))
    return ids


def body_of(delivery: WebhookDelivery) -> str:
    """The exact bytes POSTed (compact JSON of the payload fixed at the event)."""
    return json.dumps(delivery.payload, separators=(",", ":"), sort_keys=True)


def record_attempt(session: Session, *, delivery: WebhookDelivery, status_code: int | None,
                   error: str | None, duration_ms: float, final: bool) -> None:
    """Log one POST (`error`: one of ATTEMPT_ERRORS when there was no answer); a 2xx delivers,
    a failure on the last try gives up (flushed)."""
    delivery.attempts += 1
    delivery.sent_at = utcnow()  # in flight: the sweep resends only a delivery long silent
    session.add(WebhookAttempt(delivery_id=delivery.id, number=delivery.attempts,
                               status_code=status_code, error=error, duration_ms=duration_ms))
    if status_code is not None and 200 <= status_code < 300:
        delivery.status, delivery.finished_at = DELIVERED, utcnow()
    elif final:
        delivery.status, delivery.finished_at = FAILED, utcnow()
    session.flush()


RESEND_AFTER = timedelta(minutes=15)  # a pending delivery silent this long lost its message
