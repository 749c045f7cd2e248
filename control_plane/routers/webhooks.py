"""``/v1/webhooks``: the caller's signing secret (read, rotate), deliveries with their attempts,
and endpoints (see, enable again). Thin: every query and commit is in
:mod:`sfumato.control_plane.webhooks`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from sfumato.control_plane import webhooks
from sfumato.control_plane.auth import CurrentPrincipal
from sfumato.control_plane.deps import ServicesDep, SessionDep
from sfumato.control_plane.models import WebhookDelivery, WebhookEndpoint, WebhookSecret, utcnow
from sfumato.control_plane.problems import NOT_FOUND, PROBLEM_RESPONSES
from sfumato.control_plane.schemas import (
    WebhookAttemptOut,
    WebhookDeliveryOut,
    WebhookDeliveryPage,
    WebhookDeliveryStatus,
    WebhookEndpointOut,
    WebhookSecretOut,
)

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], responses=PROBLEM_RESPONSES)
DeliveryId = Annotated[str, Path(min_length=1, max_length=40)]
EndpointId = Annotated[str, Path(min_length=1, max_length=32)]


def _secret_out(record: WebhookSecret) -> WebhookSecretOut:
    overlap = record.previous_expires_at
    return WebhookSecretOut(
        secret=record.secret,
        previous_secret_expires_at=overlap
        if record.previous_secret and overlap and overlap > utcnow()
        else None,
        created_at=record.created_at,
        rotated_at=record.rotated_at,
    )


def _delivery_out(delivery: WebhookDelivery) -> WebhookDeliveryOut:
    return WebhookDeliveryOut(
        id=delivery.id,
        job_id=delivery.job_id,
        event_type=delivery.event_type,
        url=delivery.endpoint.url,
        endpoint_id=delivery.endpoint_id,
        status=delivery.status,  # type: ignore[arg-type]
        attempts=delivery.attempts,
        next_attempt_at=delivery.next_attempt_at if delivery.status == "pending" else None,
        last_error=delivery.last_error,
        created_at=delivery.created_at,
        finished_at=delivery.finished_at,
        attempt_log=[
            WebhookAttemptOut(
                number=a.number,
                started_at=a.started_at,
                duration_ms=a.duration_ms,
                outcome=a.outcome,
                status_code=a.status_code,
                error=a.error,
                response_excerpt=a.response_excerpt,
            )
            for a in delivery.attempt_log
        ],
    )


def _endpoint_out(endpoint: WebhookEndpoint) -> WebhookEndpointOut:
    return WebhookEndpointOut(
        id=endpoint.id,
        url=endpoint.url,
        disabled=endpoint.disabled_at is not None,
        disabled_at=endpoint.disabled_at,
        disabled_reason=endpoint.disabled_reason,
        consecutive_failures=endpoint.consecutive_failures,
        last_success_at=endpoint.last_success_at,
        created_at=endpoint.created_at,
    )


@router.get(
    "/secret",
    response_model=WebhookSecretOut,
    summary="Your webhook signing secret",
    responses=NOT_FOUND,
)
async def get_secret(principal: CurrentPrincipal, session: SessionDep) -> WebhookSecretOut:
    """The `whsec_` secret that signs your deliveries. 404 until you have one: rotating makes the
    first, and so does the first job you submit with a webhook."""
    return _secret_out(await webhooks.read_secret(session=session, principal=principal))


@router.post("/secret/rotate", response_model=WebhookSecretOut, summary="Rotate your webhook secret")
async def rotate_secret(
    principal: CurrentPrincipal, session: SessionDep, services: ServicesDep
) -> WebhookSecretOut:
    """A new secret signs every delivery from now on; the previous one signs too (a second
    `v1,` signature in `webhook-signature`) until `previous_secret_expires_at`, so receivers can
    switch over without losing a delivery."""
    record = await webhooks.rotate_secret(session=session, settings=services.settings, principal=principal)
    return _secret_out(record)


@router.get(
    "/deliveries", response_model=WebhookDeliveryPage, summary="Your webhook deliveries, newest first"
)
async def list_deliveries(
    principal: CurrentPrincipal,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[
        str | None, Query(max_length=200, description="`next_cursor` of the previous page")
    ] = None,
    job_id: Annotated[str | None, Query(max_length=64, description="only this job's")] = None,
    status: Annotated[WebhookDeliveryStatus | None, Query(description="only in this status")] = None,
) -> WebhookDeliveryPage:
    """Every event sent (or being sent) to your webhooks, with each attempt and its outcome."""
    page = await webhooks.list_deliveries(
        session=session, principal=principal, limit=limit, cursor=cursor, job_id=job_id, status=status
    )
    return WebhookDeliveryPage(items=[_delivery_out(d) for d in page.items], next_cursor=page.next_cursor)


@router.get(
    "/deliveries/{delivery_id}",
    response_model=WebhookDeliveryOut,
    summary="One webhook delivery",
    responses=NOT_FOUND,
)
async def get_delivery(
    delivery_id: DeliveryId, principal: CurrentPrincipal, session: SessionDep
) -> WebhookDeliveryOut:
    return _delivery_out(
        await webhooks.read_delivery(session=session, principal=principal, delivery_id=delivery_id)
    )


@router.get("/endpoints", response_model=list[WebhookEndpointOut], summary="Your webhook endpoints")
async def list_endpoints(principal: CurrentPrincipal, session: SessionDep) -> list[WebhookEndpointOut]:
    """Each URL your jobs named, with its health: disabled after repeated 410 Gone or failures."""
    return [_endpoint_out(e) for e in await webhooks.list_endpoints(session=session, principal=principal)]


@router.post(
    "/endpoints/{endpoint_id}/enable",
    response_model=WebhookEndpointOut,
    summary="Enable a disabled webhook endpoint again",
    responses=NOT_FOUND,
)
async def enable_endpoint(
    endpoint_id: EndpointId, principal: CurrentPrincipal, session: SessionDep
) -> WebhookEndpointOut:
    """New events are delivered to it again (deliveries skipped while it was disabled stay so)."""
    return _endpoint_out(
        await webhooks.enable_endpoint(session=session, principal=principal, endpoint_id=endpoint_id)
    )
