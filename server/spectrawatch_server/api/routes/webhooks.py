"""Webhooks per project (create returns the secret once), delivery log, redeliver, test-send."""

from __future__ import annotations

import re
import threading
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from spectrawatch_server.api.deps import Principal, PrincipalDep, SessionDep, StateDep, require_role
from spectrawatch_server.api.errors import ApiError
from spectrawatch_server.api.links import keyset_page
from spectrawatch_server.api.openapi import PROJECT_NOT_FOUND, error
from spectrawatch_server.api.routes.alerts import BeforeId, find_project
from spectrawatch_server.api.state import AppState
from spectrawatch_server.config import ServerSettings
from spectrawatch_server.db.base import utcnow
from spectrawatch_server.db.models import Delivery, Project, Webhook
from spectrawatch_server.storage import alert_store
from spectrawatch_server.webhooks import outbox
from spectrawatch_server.webhooks.deliver import Deliverer, policy_for
from spectrawatch_server.webhooks.signing import check_secret, generate_secret
from spectrawatch_server.webhooks.ssrf import Allowlist, UnsafeTarget, check_url

router = APIRouter(tags=["webhooks"])

WebhookFormat = Literal["standard", "slack"]
DeliveryStatus = Literal["pending", "delivered", "failed"]
NO_CONTROL = r"^[^\x00-\x1f\x7f]+$"  # no NUL (PostgreSQL cannot store it), tab or newline
_EVENT = re.compile(r"^(alert\.opened|alert\.resolved)(:[a-z][a-z0-9_]{0,63})?$|^webhook\.test$")


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    project: str = Field(min_length=1, max_length=200, pattern=NO_CONTROL)
    url: str = Field(min_length=1, max_length=2000, pattern=NO_CONTROL)
    events: list[str] = Field(default_factory=list, max_length=100)
    secret: str | None = Field(default=None, max_length=200)
    format: WebhookFormat = "standard"
    enabled: bool = True


class WebhookUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str | None = Field(default=None, min_length=1, max_length=2000, pattern=NO_CONTROL)
    events: list[str] | None = Field(default=None, max_length=100)
    format: WebhookFormat | None = None
    enabled: bool | None = None


class WebhookPublic(BaseModel):
    id: int
    project: str
    url: str
    events: list[str]
    format: str
    enabled: bool
    disabled_reason: str | None
    created_at: datetime


class WebhookCreated(WebhookPublic):
    secret: str = Field(description="the signing secret; shown only in this response")


class AttemptPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    attempted_at: datetime
    status_code: int | None
    latency_ms: float | None
    error: str | None


class DeliveryPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    webhook_id: int
    alert_id: int | None
    message_id: str
    event: str
    status: DeliveryStatus
    attempts: int
    next_at: datetime
    expires_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    payload: dict[str, Any]
    log: list[AttemptPublic] = Field(default_factory=list)


def _public(session: Session, hook: Webhook) -> dict[str, Any]:
    project = session.get_one(Project, hook.project_id)
    return {
        "id": hook.id,
        "project": project.name,
        "url": hook.url,
        "events": hook.events,
        "format": hook.format,
        "enabled": hook.enabled,
        "disabled_reason": hook.disabled_reason,
        "created_at": hook.created_at,
    }


WEBHOOK_EXISTS = error(
    "`webhook_exists`: the project has a webhook for this URL already (its id in the message, "
    "its path in `Location`)"
)


def _check_url(settings: ServerSettings, url: str) -> str:
    """The URL checked against request forgery, in the one spelling it is stored and compared
    in (:func:`canonical_url`)."""
    try:
        target = check_url(url, Allowlist.parse(settings.webhook_allowed_hosts))
    except UnsafeTarget as exc:
        raise ApiError(422, "unsafe_webhook_url", f"url: {exc.message}") from exc
    return canonical_url(target.url)


def canonical_url(url: str) -> str:
    """``url`` as requests reach it: scheme and host in lower case, no fragment (never sent),
    no empty query or path (``HTTP://Host/hook#x`` and ``http://host/hook?`` are one endpoint, a
    second webhook for which would get every event twice)."""
    parts = urlsplit(url)
    return urlunsplit(
        (parts.scheme.lower(), parts.netloc.lower(), parts.path or "/", parts.query, "")
    )


def _check_events(events: list[str]) -> list[str]:
    for event in events:
        if not _EVENT.match(event):
            raise ApiError(
                422,
                "invalid_event",
                f"events: unknown event {event!r}; use {', '.join(outbox.EVENT_TYPES)} "
                "or 'alert.opened:<rule>'",
            )
    return sorted(set(events))


def _refuse_duplicate(
    session: Session, project: Project, url: str, other_than: int | None = None
) -> None:
    """409 ``webhook_exists`` naming the project's endpoint for ``url`` when it has one: a
    second would receive every event twice (a retried or re-run provisioning script made one).
    Takes the project's endpoint lock first, held until the commit."""
    alert_store.lock_project_webhooks(session, project.id)
    existing = alert_store.webhook_with_url(session, project.id, url, other_than)
    if existing is not None:
        raise ApiError(
            409,
            "webhook_exists",
            f"project {project.name!r} already has webhook {existing.id} for this URL; "
            f"change that one (PATCH /api/v1/webhooks/{existing.id}) or delete it first",
            {"Location": f"/api/v1/webhooks/{existing.id}"},
        )


def _find_webhook(session: Session, principal: Principal, webhook_id: int) -> Webhook:
    hook = session.get(Webhook, webhook_id)
    if hook is None or not principal.can_access(hook.project_id):
        raise ApiError(404, "webhook_not_found", f"webhook {webhook_id} does not exist")
    return hook


def _find_delivery(session: Session, principal: Principal, delivery_id: int) -> Delivery:
    delivery = session.get(Delivery, delivery_id)
    if delivery is not None:
        hook = session.get(Webhook, delivery.webhook_id)
        if hook is not None and principal.can_access(hook.project_id):
            return delivery
    raise ApiError(404, "delivery_not_found", f"delivery {delivery_id} does not exist")


def _delivery_public(session: Session, delivery: Delivery, with_log: bool) -> DeliveryPublic:
    out = DeliveryPublic.model_validate(delivery)
    if with_log:
        out.log = [
            AttemptPublic.model_validate(a)
            for a in alert_store.delivery_attempts(session, delivery.id)
        ]
    return out


@router.post(
    "/webhooks",
    status_code=201,
    response_model=WebhookCreated,
    dependencies=[require_role("admin")],
    responses={**PROJECT_NOT_FOUND, 409: WEBHOOK_EXISTS},
)
def create_webhook(
    body: WebhookCreate, state: StateDep, principal: PrincipalDep, session: SessionDep
) -> WebhookCreated:
    """Register an endpoint; the response carries its secret (generated unless given) once.
    409 ``webhook_exists`` (naming it, with its ``Location``) when the project already has an
    endpoint for the URL."""
    project = find_project(session, principal, body.project)
    url = _check_url(state.settings, body.url)
    events = _check_events(body.events)
    if body.secret is not None:
        try:
            secret = check_secret(body.secret)
        except ValueError as exc:
            raise ApiError(422, "invalid_secret", f"secret: {exc}") from exc
    else:
        secret = generate_secret()
    _refuse_duplicate(session, project, url)
    hook = Webhook(
        project_id=project.id,
        url=url,
        secret=secret,
        events=events,
        enabled=body.enabled,
        format=body.format,
    )
    session.add(hook)
    session.commit()
    return WebhookCreated(**_public(session, hook), secret=secret)


# reads too: a webhook URL is often a credential (Slack, ?token=), its deliveries echo it
@router.get("/webhooks", response_model=list[WebhookPublic], dependencies=[require_role("admin")])
def list_webhooks(
    principal: PrincipalDep, session: SessionDep, project: str | None = None
) -> list[WebhookPublic]:
    project_id = principal.project_id
    if project is not None:
        project_id = find_project(session, principal, project).id
    return [
        WebhookPublic(**_public(session, h)) for h in alert_store.list_webhooks(session, project_id)
    ]


@router.get(
    "/webhooks/{webhook_id}", response_model=WebhookPublic, dependencies=[require_role("admin")]
)
def read_webhook(webhook_id: int, principal: PrincipalDep, session: SessionDep) -> WebhookPublic:
    return WebhookPublic(**_public(session, _find_webhook(session, principal, webhook_id)))


@router.patch(
    "/webhooks/{webhook_id}",
    response_model=WebhookPublic,
    dependencies=[require_role("admin")],
    responses={409: WEBHOOK_EXISTS},
)
def update_webhook(
    webhook_id: int,
    body: WebhookUpdate,
    state: StateDep,
    principal: PrincipalDep,
    session: SessionDep,
) -> WebhookPublic:
    """Change URL, event filter, format or enabled flag (re-enabling clears the 410 reason);
    409 ``webhook_exists`` for a URL another endpoint of the project has."""
    hook = _find_webhook(session, principal, webhook_id)
    if body.url is not None:
        url = _check_url(state.settings, body.url)
        _refuse_duplicate(session, session.get_one(Project, hook.project_id), url, hook.id)
        hook.url = url
    if body.events is not None:
        hook.events = _check_events(body.events)
    if body.format is not None:
        hook.format = body.format
    if body.enabled is not None:
        hook.enabled = body.enabled
        hook.disabled_reason = None if body.enabled else "disabled by operator"
    session.commit()
    return WebhookPublic(**_public(session, hook))


@router.delete("/webhooks/{webhook_id}", status_code=204, dependencies=[require_role("admin")])
def delete_webhook(webhook_id: int, principal: PrincipalDep, session: SessionDep) -> Response:
    session.delete(_find_webhook(session, principal, webhook_id))
    session.commit()
    return Response(status_code=204)


@router.get(
    "/webhooks/{webhook_id}/deliveries",
    response_model=list[DeliveryPublic],
    dependencies=[require_role("admin")],
)
def list_deliveries(
    webhook_id: int,
    principal: PrincipalDep,
    session: SessionDep,
    state: StateDep,
    request: Request,
    response: Response,
    status: DeliveryStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
    before_id: BeforeId = None,
) -> list[DeliveryPublic]:
    """The delivery log of an endpoint, newest first, each with its attempts; paged as
    ``GET /alerts`` (``Link: rel="next"`` by ``before_id`` while more match)."""
    hook = _find_webhook(session, principal, webhook_id)
    rows = alert_store.webhook_deliveries(session, hook.id, status, limit + 1, offset, before_id)
    page = keyset_page(request, response, state.settings.public_url, rows, limit)
    return [_delivery_public(session, d, with_log=True) for d in page]


@router.get(
    "/deliveries/{delivery_id}", response_model=DeliveryPublic, dependencies=[require_role("admin")]
)
def read_delivery(delivery_id: int, principal: PrincipalDep, session: SessionDep) -> DeliveryPublic:
    return _delivery_public(session, _find_delivery(session, principal, delivery_id), with_log=True)


@router.post(
    "/deliveries/{delivery_id}/redeliver",
    response_model=DeliveryPublic,
    dependencies=[require_role("admin")],
    responses={409: error("`webhook_disabled`: re-enable the webhook first")},
)
def redeliver(
    delivery_id: int, state: StateDep, principal: PrincipalDep, session: SessionDep
) -> DeliveryPublic:
    """Send a delivery again with the same ``webhook-id`` (receivers deduplicate on it).

    The retry schedule restarts; the attempt log keeps the earlier attempts.
    """
    delivery = _find_delivery(session, principal, delivery_id)
    hook = session.get_one(Webhook, delivery.webhook_id)
    if not hook.enabled:
        raise ApiError(
            409,
            "webhook_disabled",
            f"webhook {hook.id} is disabled ({hook.disabled_reason}); "
            "re-enable it first (PATCH enabled=true)",
        )
    now = utcnow()
    delivery.status = "pending"
    delivery.attempts = 0
    delivery.next_at = now
    delivery.expires_at = now + timedelta(hours=state.settings.webhook_event_ttl_hours)
    session.commit()
    return _delivery_public(session, delivery, with_log=True)


TEST_SENDS_IN_FLIGHT = 4  # per API process: each holds a request thread up to the timeout
_test_sends = threading.BoundedSemaphore(TEST_SENDS_IN_FLIGHT)


@router.post(
    "/webhooks/{webhook_id}/test",
    response_model=DeliveryPublic,
    dependencies=[require_role("admin")],
    responses={429: error("`too_many_test_sends`: retry after `Retry-After` seconds")},
)
def send_test(
    webhook_id: int, state: StateDep, principal: PrincipalDep, session: SessionDep
) -> DeliveryPublic:
    """Send a signed ``webhook.test`` event now and answer with the attempt's outcome.

    A failed test is not retried (the caller sees the result right away). At most
    :data:`TEST_SENDS_IN_FLIGHT` run at once (429 beyond), so slow receivers cannot take the
    API's request threads.
    """
    hook = _find_webhook(session, principal, webhook_id)
    if not _test_sends.acquire(blocking=False):
        raise ApiError(
            429,
            "too_many_test_sends",
            f"{TEST_SENDS_IN_FLIGHT} test deliveries are in flight; retry in a few seconds",
            {"Retry-After": "5"},
        )
    try:
        return _send_test(hook, state, session)
    finally:
        _test_sends.release()


def _send_test(hook: Webhook, state: AppState, session: Session) -> DeliveryPublic:
    project = session.get_one(Project, hook.project_id)
    delivery = outbox.enqueue_test(session, hook, project, timedelta(minutes=5))
    delivery.next_at = utcnow() + timedelta(days=1)  # not for the background sender
    session.commit()
    deliverer = Deliverer(state.sessions, policy_for(state.settings))
    try:
        deliverer.attempt(delivery.id)
    finally:
        deliverer.close()
    with state.sessions.begin() as fresh:
        row = fresh.get(Delivery, delivery.id)
        if row is None:  # the webhook was deleted while the test was in flight
            raise ApiError(404, "webhook_not_found", f"webhook {hook.id} was deleted")
        if row.status == "pending":  # one shot: the sender thread must not retry it
            row.status = "failed"
        return _delivery_public(fresh, row, with_log=True)
