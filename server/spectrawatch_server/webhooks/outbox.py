"""Transactional outbox: alert events become ``delivery`` rows in the transaction that wrote them.

The sender thread (:mod:`.deliver`) picks rows up after commit, so an alert and its deliveries
exist together or not at all, and a crash between them loses nothing.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy.orm import Session

from spectrawatch_server.db.base import utcnow
from spectrawatch_server.db.models import Alert, Delivery, Project, Run, Webhook
from spectrawatch_server.storage import alert_store
from spectrawatch_server.webhooks.signing import new_message_id

ALERT_OPENED = "alert.opened"
ALERT_RESOLVED = "alert.resolved"
WEBHOOK_TEST = "webhook.test"
EVENT_TYPES = (ALERT_OPENED, ALERT_RESOLVED, WEBHOOK_TEST)


def wants(webhook: Webhook, event: str, rule: str | None) -> bool:
    """Event filter: empty = everything; entries are event types or ``alert.opened:<rule>``."""
    if not webhook.events or event == WEBHOOK_TEST:
        return True
    return event in webhook.events or (rule is not None and f"{event}:{rule}" in webhook.events)


def dashboard_link(base_url: str, run: Run) -> str:
    return f"{base_url.rstrip('/')}/runs/{run.id}"


def iso_utc(at: datetime) -> str:
    """``at`` in ISO 8601 UTC with a ``Z``, as every timestamp the API answers with (pydantic's
    JSON form): ``isoformat`` wrote ``+00:00``, the one field of the API that did."""
    return at.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def alert_payload(
    event: str, alert: Alert, run: Run, project: Project, base_url: str, at: datetime
) -> dict[str, Any]:
    """The Standard Webhooks event body: ``{type, timestamp, data}``."""
    return {
        "type": event,
        "timestamp": iso_utc(at),
        "data": {
            "alert_id": alert.id,
            "rule": alert.rule,
            "severity": alert.severity,
            "status": alert.status,
            "layer": alert.layer,
            "step": alert.step,
            "resolved_step": alert.resolved_step,
            "message": alert.message,
            "values": alert.values,
            "project": project.name,
            "run": {"id": run.id, "name": run.name, "status": run.status},
            "dashboard_url": dashboard_link(base_url, run),
        },
    }


def ping_payload(webhook: Webhook, project: Project, at: datetime) -> dict[str, Any]:
    return {
        "type": WEBHOOK_TEST,
        "timestamp": iso_utc(at),
        "data": {"webhook_id": webhook.id, "project": project.name, "message": "test delivery"},
    }


def slack_body(payload: dict[str, Any]) -> dict[str, Any]:
    """A Slack incoming-webhook compatible body for the same event (user text escaped)."""
    data = payload.get("data", {})
    if payload.get("type") == WEBHOOK_TEST:
        return {"text": f"spectrawatch: test delivery for project {_slack(data.get('project'))}"}
    state = "resolved" if payload.get("type") == ALERT_RESOLVED else data.get("severity", "alert")
    run = data.get("run", {})
    text = (
        f"[{_slack(state)}] {_slack(data.get('project'))}/{_slack(run.get('name'))} "
        f"step {data.get('step')}: {_slack(data.get('message'))} "
        f"<{_slack(data.get('dashboard_url'))}|dashboard>"
    )
    return {"text": text}


def _slack(value: Any) -> str:
    """Slack's mrkdwn escaping: ``& < >`` as entities, so names cannot add ``<!channel>``
    mentions or links (formatting characters such as ``*`` only change emphasis)."""
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def enqueue_alert_event(
    session: Session,
    event: str,
    alert: Alert,
    run: Run,
    project: Project,
    base_url: str,
    ttl: timedelta,
) -> list[Delivery]:
    """One pending delivery per enabled webhook of the project that wants ``event``."""
    now = utcnow()
    payload = alert_payload(event, alert, run, project, base_url, now)
    out = []
    for webhook in alert_store.project_webhooks(session, project.id, enabled_only=True):
        if not wants(webhook, event, alert.rule):
            continue
        delivery = Delivery(
            webhook_id=webhook.id,
            alert_id=alert.id,
            message_id=new_message_id(),
            event=event,
            payload=payload,
            status="pending",
            attempts=0,
            next_at=now,
            expires_at=now + ttl,
        )
        out.append(alert_store.insert_delivery(session, delivery))
    return out


def enqueue_test(session: Session, webhook: Webhook, project: Project, ttl: timedelta) -> Delivery:
    now = utcnow()
    delivery = Delivery(
        webhook_id=webhook.id,
        alert_id=None,
        message_id=new_message_id(),
        event=WEBHOOK_TEST,
        payload=ping_payload(webhook, project, now),
        status="pending",
        attempts=0,
        next_at=now,
        expires_at=now + ttl,
    )
    return alert_store.insert_delivery(session, delivery)
