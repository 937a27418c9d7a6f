"""SQL of alert rules, alerts, webhooks and the delivery outbox (callers own the transaction)."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from spectrawatch_server.db.base import utcnow
from spectrawatch_server.db.models import (
    Alert,
    AlertRule,
    Delivery,
    DeliveryAttempt,
    Metric,
    Project,
    Run,
    Scalar,
    Webhook,
)
from spectrawatch_server.db.session import sqlite_write_lock

# --- rules -------------------------------------------------------------------------------


def lock_rules(session: Session, project_id: int, *, edit: bool) -> None:
    """Hold a project's rules steady until the commit (the project's row on PostgreSQL, the
    database's write lock on SQLite).

    The lock is on the project's row (a default rule never edited has no ``alert_rule`` row to
    lock): an edit takes ``FOR NO KEY UPDATE`` (``edit=True``), an evaluation ``FOR SHARE``,
    before reading the rules. An evaluation then either reads the rules before an edit, which
    waits for it and so sees (and resolves) the alerts it opened, or after the edit's commit:
    it never opens an alert under a rule an edit has just disabled. Evaluations do not wait for
    each other, and neither lock blocks the foreign-key checks (``KEY SHARE``) of new runs. Take
    it before touching any alert row (one lock order: no deadlock with an edit).

    On SQLite both take the database's write lock (:func:`sqlite_write_lock`): else an edit
    could commit between an evaluation's read of the rules and its first write.
    """
    if sqlite_write_lock(session):
        return
    stmt = select(Project.id).where(Project.id == project_id)
    session.execute(
        stmt.with_for_update(key_share=True) if edit else stmt.with_for_update(read=True)
    )


def stored_rules(session: Session, project_id: int) -> dict[str, tuple[bool, dict[str, Any]]]:
    """A project's rule rows: ``{rule: (enabled, params)}``."""
    rows = session.scalars(select(AlertRule).where(AlertRule.project_id == project_id)).all()
    return {r.rule: (r.enabled, dict(r.params)) for r in rows}


def stored_rules_by_project(session: Session) -> dict[int, dict[str, tuple[bool, dict[str, Any]]]]:
    """Every project's rule rows (a small table): ``{project_id: {rule: (enabled, params)}}``."""
    out: dict[int, dict[str, tuple[bool, dict[str, Any]]]] = {}
    for r in session.scalars(select(AlertRule).order_by(AlertRule.project_id, AlertRule.rule)):
        out.setdefault(r.project_id, {})[r.rule] = (r.enabled, dict(r.params))
    return out


def upsert_rule(
    session: Session, project_id: int, rule: str, enabled: bool, params: dict[str, Any]
) -> AlertRule:
    row = session.scalar(
        select(AlertRule).where(AlertRule.project_id == project_id, AlertRule.rule == rule)
    )
    if row is None:
        row = AlertRule(project_id=project_id, rule=rule, enabled=enabled, params=params)
        session.add(row)
    else:
        row.enabled = enabled
        row.params = params
        row.updated_at = utcnow()
    session.flush()
    return row


def delete_rule(session: Session, project_id: int, rule: str) -> bool:
    result = session.execute(
        delete(AlertRule).where(AlertRule.project_id == project_id, AlertRule.rule == rule)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


# --- alerts ------------------------------------------------------------------------------


def frame_series(session: Session, frame_id: int) -> list[tuple[str, str]]:
    """Distinct ``(layer, name)`` of the metrics stored for a frame (one row per step of each
    series: a 16-step SED frame has many times more rows than series)."""
    rows = session.execute(
        select(Metric.layer, Metric.name).where(Metric.frame_id == frame_id).distinct()
    ).all()
    return [(r[0], r[1]) for r in rows]


def was_within(
    session: Session,
    run_id: int,
    name: str,
    layer: str,
    low: float | None,
    high: float,
    since: int = 0,
) -> bool:
    """Whether a run's ``(name, layer)`` series had a value in ``[low, high]`` at a step
    ``>= since`` (a rule's ``after_step``; the ``ix_metric_run_name_layer_step`` index bounds
    the scan to that series)."""
    stmt = select(Metric.id).where(
        Metric.run_id == run_id,
        Metric.name == name,
        Metric.layer == layer,
        Metric.value <= high,
    )
    if since:
        stmt = stmt.where(Metric.step >= since)
    if low is not None:
        stmt = stmt.where(Metric.value >= low)
    return session.scalar(stmt.limit(1)) is not None


def scalar_tail(session: Session, run_id: int, name: str, limit: int) -> list[tuple[int, float]]:
    """The ``limit`` points of a run's scalar with the highest steps, oldest first, a NaN/Inf
    value (stored as null) as NaN: by step, not by arrival, so a late or re-sent old step
    counts only if it is among them (one seek of ``ix_scalar_run_name_step``)."""
    rows = session.execute(
        select(Scalar.step, Scalar.value)
        .where(Scalar.run_id == run_id, Scalar.name == name)
        .order_by(Scalar.step.desc())
        .limit(limit)
    ).all()
    return [(int(s), math.nan if v is None else float(v)) for s, v in reversed(rows)]


def scalar_was_within(
    session: Session, run_id: int, name: str, low: float | None, high: float, since: int = 0
) -> bool:
    """Whether a run's scalar had a value in ``[low, high]`` at a step ``>= since``
    (:func:`was_within`)."""
    stmt = select(Scalar.id).where(
        Scalar.run_id == run_id, Scalar.name == name, Scalar.value <= high
    )
    if since:
        stmt = stmt.where(Scalar.step >= since)
    if low is not None:
        stmt = stmt.where(Scalar.value >= low)
    return session.scalar(stmt.limit(1)) is not None


def open_alerts(session: Session, run_id: int) -> dict[tuple[str, str], Alert]:
    """Open episodes of a run keyed by (rule, layer)."""
    rows = session.scalars(
        select(Alert).where(Alert.run_id == run_id, Alert.status == "open").order_by(Alert.id)
    ).all()
    return {(a.rule, a.layer): a for a in rows}


def last_resolved_step(session: Session, run_id: int, rule: str, layer: str) -> int | None:
    """The latest step at which an episode of (run, rule, layer) was resolved, if any."""
    return session.scalar(
        select(func.max(Alert.resolved_step)).where(
            Alert.run_id == run_id,
            Alert.rule == rule,
            Alert.layer == layer,
            Alert.status == "resolved",
        )
    )


def insert_alert(session: Session, alert: Alert) -> Alert:
    session.add(alert)
    session.flush()
    return alert


def resolve_alert(session: Session, alert: Alert, step: int | None) -> None:
    alert.status = "resolved"
    alert.resolved_step = step
    alert.resolved_at = utcnow()
    session.flush()


def acknowledge_alert(session: Session, alert: Alert, by: str | None) -> None:
    """Mark an episode as seen by ``by`` (a token's name), or not seen again (``by`` None)."""
    alert.acknowledged_at = None if by is None else utcnow()
    alert.acknowledged_by = by
    session.flush()


def list_alerts(
    session: Session,
    *,
    run_id: int | None = None,
    project_id: int | None = None,
    status: str | None = None,
    rule: str | None = None,
    acknowledged: bool | None = None,
    limit: int = 100,
    offset: int = 0,
    before_id: int | None = None,
) -> Sequence[Alert]:
    """Alerts newest first (by id), those with an id below ``before_id`` when given."""
    stmt = select(Alert).order_by(Alert.id.desc()).limit(limit).offset(offset)
    if before_id is not None:
        stmt = stmt.where(Alert.id < before_id)
    if acknowledged is not None:
        at = Alert.acknowledged_at
        stmt = stmt.where(at.is_not(None) if acknowledged else at.is_(None))
    if run_id is not None:
        stmt = stmt.where(Alert.run_id == run_id)
    if project_id is not None:
        stmt = stmt.where(Alert.run_id.in_(select(Run.id).where(Run.project_id == project_id)))
    if status is not None:
        stmt = stmt.where(Alert.status == status)
    if rule is not None:
        stmt = stmt.where(Alert.rule == rule)
    return session.scalars(stmt).all()


def silent_runs(session: Session, before: datetime) -> Sequence[Run]:
    """Running runs whose last activity (their creation if they never sent anything: a job
    that hung before its first step) is older than ``before``."""
    quiet = or_(
        Run.last_seen_at < before, and_(Run.last_seen_at.is_(None), Run.created_at < before)
    )
    return session.scalars(select(Run).where(Run.status == "running", quiet).order_by(Run.id)).all()


def open_alerts_of_project_rule(session: Session, project_id: int, rule: str) -> Sequence[Alert]:
    """Open episodes of ``rule`` across the runs of a project, oldest first."""
    runs = select(Run.id).where(Run.project_id == project_id)
    return session.scalars(
        select(Alert)
        .where(Alert.rule == rule, Alert.status == "open", Alert.run_id.in_(runs))
        .order_by(Alert.id)
    ).all()


def open_alerts_of_rules(session: Session, rules: Collection[str]) -> Sequence[Alert]:
    return session.scalars(select(Alert).where(Alert.rule.in_(rules), Alert.status == "open")).all()


def stored_rule_names_of_kind(session: Session, kind: str) -> set[str]:
    """Names of the rules of ``kind`` any project stores (custom rules; a small table)."""
    rows = session.execute(select(AlertRule.rule, AlertRule.params)).all()
    return {rule for rule, params in rows if (params or {}).get("kind") == kind}


# --- webhooks ----------------------------------------------------------------------------


def project_webhooks(session: Session, project_id: int, enabled_only: bool) -> Sequence[Webhook]:
    stmt = select(Webhook).where(Webhook.project_id == project_id).order_by(Webhook.id)
    if enabled_only:
        stmt = stmt.where(Webhook.enabled.is_(True))
    return session.scalars(stmt).all()


def list_webhooks(session: Session, project_id: int | None) -> Sequence[Webhook]:
    stmt = select(Webhook).order_by(Webhook.id)
    if project_id is not None:
        stmt = stmt.where(Webhook.project_id == project_id)
    return session.scalars(stmt).all()


def lock_project_webhooks(session: Session, project_id: int) -> None:
    """Hold a project's set of endpoint URLs steady until the commit: its row ``FOR NO KEY
    UPDATE`` on PostgreSQL (which new rows' foreign-key checks do not wait for), the
    database's write lock on SQLite. Two requests registering one URL at once then take turns,
    and the second sees the first's endpoint (:func:`webhook_with_url`)."""
    if sqlite_write_lock(session):
        return
    session.execute(
        select(Project.id).where(Project.id == project_id).with_for_update(key_share=True)
    )


def webhook_with_url(
    session: Session, project_id: int, url: str, other_than: int | None = None
) -> Webhook | None:
    """The project's endpoint for ``url`` (the first by id), other than ``other_than``."""
    stmt = select(Webhook).where(Webhook.project_id == project_id, Webhook.url == url)
    if other_than is not None:
        stmt = stmt.where(Webhook.id != other_than)
    return session.scalars(stmt.order_by(Webhook.id).limit(1)).first()


def lock_webhooks(
    session: Session, *, webhook_id: int | None = None, project_id: int | None = None
) -> None:
    """Lock endpoints' rows (``FOR NO KEY UPDATE``, in id order) until the commit, on
    PostgreSQL: one endpoint, or every one of a project.

    Whatever changes an endpoint and its deliveries takes the endpoint first, as its deletion
    does (``DELETE webhook`` locks the row, then cascades to its deliveries): a sender
    disabling an endpoint on a 410 (which fails its pending deliveries) and a project's
    deletion. A delivery locked before its endpoint deadlocked with them. New deliveries'
    foreign-key checks (``KEY SHARE``) are not blocked. On SQLite the database's write lock is
    taken instead (:func:`sqlite_write_lock`).
    """
    if sqlite_write_lock(session):
        return
    stmt = select(Webhook.id).order_by(Webhook.id).with_for_update(key_share=True)
    if webhook_id is not None:
        stmt = stmt.where(Webhook.id == webhook_id)
    if project_id is not None:
        stmt = stmt.where(Webhook.project_id == project_id)
    session.execute(stmt)


def disable_webhook(session: Session, webhook_id: int, reason: str) -> None:
    """Disable an endpoint and fail its pending deliveries (a 410 Gone, or an operator)."""
    session.execute(
        update(Webhook)
        .where(Webhook.id == webhook_id)
        .values(enabled=False, disabled_reason=reason)
    )
    session.execute(
        update(Delivery)
        .where(Delivery.webhook_id == webhook_id, Delivery.status == "pending")
        .values(status="failed", last_error=f"endpoint disabled: {reason}")
    )


# --- deliveries (outbox) -----------------------------------------------------------------


def insert_delivery(session: Session, delivery: Delivery) -> Delivery:
    session.add(delivery)
    session.flush()
    return delivery


def claim_due_deliveries(
    session: Session, now: datetime, lease: timedelta, limit: int
) -> list[int]:
    """Lease up to ``limit`` due pending deliveries by pushing their ``next_at`` past the lease.

    The conditional UPDATE makes a claim exclusive across processes; a sender that dies
    mid-attempt leaves the row due again when the lease runs out.
    """
    stmt = (
        select(Delivery.id)
        .where(Delivery.status == "pending", Delivery.next_at <= now)
        .order_by(Delivery.next_at, Delivery.id)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        # rows another transaction holds (a sender recording an attempt, an endpoint being
        # disabled or deleted) are skipped, not waited for: a claim waiting on one while
        # holding rows it had claimed could deadlock with a transaction that wants those
        stmt = stmt.with_for_update(skip_locked=True)
    candidates = session.scalars(stmt).all()
    claimed = []
    for delivery_id in candidates:
        result = session.execute(
            update(Delivery)
            .where(
                Delivery.id == delivery_id, Delivery.status == "pending", Delivery.next_at <= now
            )
            .values(next_at=now + lease)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            claimed.append(delivery_id)
    return claimed


def renew_claim(session: Session, delivery_id: int, held_until: datetime, until: datetime) -> bool:
    """Push a claimed delivery's lease to ``until`` if this sender still holds it (its
    ``next_at`` is still ``held_until``, the lease it set); False when another sender has
    claimed it since (the first one's lease ran out) or it is no longer pending."""
    result = session.execute(
        update(Delivery)
        .where(
            Delivery.id == delivery_id,
            Delivery.status == "pending",
            Delivery.next_at == held_until,
        )
        .values(next_at=until)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def record_attempt(
    session: Session,
    delivery_id: int,
    status_code: int | None,
    latency_ms: float | None,
    error: str | None,
) -> DeliveryAttempt:
    attempt = DeliveryAttempt(
        delivery_id=delivery_id, status_code=status_code, latency_ms=latency_ms, error=error
    )
    session.add(attempt)
    session.flush()
    return attempt


def webhook_deliveries(
    session: Session,
    webhook_id: int,
    status: str | None,
    limit: int,
    offset: int,
    before_id: int | None = None,
) -> Sequence[Delivery]:
    """An endpoint's deliveries newest first (by id), below ``before_id`` when given."""
    stmt = (
        select(Delivery)
        .where(Delivery.webhook_id == webhook_id)
        .order_by(Delivery.id.desc())
        .limit(limit)
        .offset(offset)
    )
    if before_id is not None:
        stmt = stmt.where(Delivery.id < before_id)
    if status is not None:
        stmt = stmt.where(Delivery.status == status)
    return session.scalars(stmt).all()


def delivery_attempts(session: Session, delivery_id: int) -> Sequence[DeliveryAttempt]:
    return session.scalars(
        select(DeliveryAttempt)
        .where(DeliveryAttempt.delivery_id == delivery_id)
        .order_by(DeliveryAttempt.id)
    ).all()


def alert_deliveries(session: Session, alert_id: int) -> Sequence[Delivery]:
    return session.scalars(
        select(Delivery).where(Delivery.alert_id == alert_id).order_by(Delivery.id)
    ).all()
