"""Tables (DESIGN §5). Singular snake_case names; times are tz-aware UTC ``*_at`` columns."""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from spectrawatch_server.db.base import Base, UTCDateTime, utcnow


def new_run_uid() -> str:
    """A run's ``uid``: 32 random hex digits."""
    return secrets.token_hex(16)


# SQLite only auto-increments INTEGER PRIMARY KEY; BigInteger elsewhere.
BigId = BigInteger().with_variant(Integer(), "sqlite")
# table option: SQLite's AUTOINCREMENT, so a deleted row's id never goes to a new row (without
# it SQLite hands out the largest id + 1: the newest row's id once deleted). Migration 0012
NEVER_REUSE_IDS: dict[str, Any] = {"sqlite_autoincrement": True}


class Project(Base):
    __tablename__ = "project"
    __table_args__ = NEVER_REUSE_IDS

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Token(Base):
    """API token scoped to one project (or every project: ``project_id`` None) with a role
    (``read``/``write``/``admin``); only the SHA-256 of the secret is stored."""

    __tablename__ = "token"
    __table_args__ = (
        CheckConstraint("role IN ('read', 'write', 'admin')", name="role"),
        NEVER_REUSE_IDS,
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    project_id: Mapped[int | None] = mapped_column(
        ForeignKey("project.id", ondelete="CASCADE"), index=True, nullable=True
    )
    name: Mapped[str] = mapped_column(String(200), default="")
    prefix: Mapped[str] = mapped_column(String(16))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16), default="write")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class Run(Base):
    __tablename__ = "run"
    __table_args__ = (UniqueConstraint("project_id", "name"), NEVER_REUSE_IDS)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    project_id: Mapped[int] = mapped_column(
        ForeignKey("project.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(200))
    # random identity: a client's writes name it, so a reused id cannot take them (0007)
    uid: Mapped[str] = mapped_column(String(32), default=new_run_uid)
    status: Mapped[str] = mapped_column(String(16), default="running")
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    client_stats: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    last_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class Frame(Base):
    """One ingested snapshot; its tensors live in the blob store at ``blob_key``."""

    __tablename__ = "frame"
    __table_args__ = (Index("ix_frame_run_kind_seq", "run_id", "kind", "seq"), NEVER_REUSE_IDS)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    step: Mapped[int] = mapped_column(BigInteger)
    seq: Mapped[int] = mapped_column(BigInteger)
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    blob_key: Mapped[str] = mapped_column(String(500))
    encoding: Mapped[str] = mapped_column(String(16), default="identity")
    bytes: Mapped[int] = mapped_column(BigInteger)
    info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    layers: Mapped[list[str]] = mapped_column(JSON, default=list)
    nonfinite: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    # layer -> [first, last] step of its NaN/Inf rows (None: a frame stored before 0004)
    nonfinite_steps: Mapped[dict[str, list[int]] | None] = mapped_column(JSON, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)  # why its analysis failed
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # when a re-analysis last queued it again (migration 0011); None: analysed as ingested only. Its
    # alerts were evaluated by its first analysis: a re-analysis does not evaluate them again
    requeued_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    @property
    def has_blob(self) -> bool:
        """False for an imported metric batch and for a frame whose blob was pruned."""
        return bool(self.blob_key)


class Job(Base):
    """Analysis job of the embedded queue: one per frame, leased by a worker."""

    __tablename__ = "job"
    __table_args__ = (Index("ix_job_status_id", "status", "id"), NEVER_REUSE_IDS)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    frame_id: Mapped[int] = mapped_column(ForeignKey("frame.id", ondelete="CASCADE"), unique=True)
    status: Mapped[str] = mapped_column(
        String(16), default="pending"
    )  # pending|running|done|failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(100), nullable=True)
    # running: the lease's end; pending: not before (a retry's backoff), None: at once
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class Scalar(Base):
    __tablename__ = "scalar"
    __table_args__ = (
        UniqueConstraint("run_id", "name", "step"),
        Index("ix_scalar_run_name_step", "run_id", "name", "step"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(BigInteger)
    name: Mapped[str] = mapped_column(String(200))
    value: Mapped[float | None] = mapped_column(Float, nullable=True)  # None stores NaN/Inf


class Metric(Base):
    """One analysis output value; unique per (frame, analysis, layer, name, step)."""

    __tablename__ = "metric"
    __table_args__ = (
        UniqueConstraint("frame_id", "analysis", "layer", "name", "step"),
        Index("ix_metric_run_name_step", "run_id", "name", "step"),
        # value last: a per-layer series read needs no table row (0003, covering since 0005)
        Index("ix_metric_run_name_layer_step", "run_id", "name", "layer", "step", "value"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"))
    frame_id: Mapped[int] = mapped_column(ForeignKey("frame.id", ondelete="CASCADE"))
    analysis: Mapped[str] = mapped_column(String(64))
    layer: Mapped[str] = mapped_column(String(500))
    name: Mapped[str] = mapped_column(String(200))
    step: Mapped[int] = mapped_column(BigInteger)
    value: Mapped[float | None] = mapped_column(Float, nullable=True)  # None stores NaN/Inf


class MetricSeries(Base):
    """How many metric rows each (run, name, layer) series holds, kept by every metric write
    (``storage.repository``): the catalog reads it instead of counting every row (0008)."""

    __tablename__ = "metric_series"

    run_id: Mapped[int] = mapped_column(
        ForeignKey("run.id", ondelete="CASCADE"), primary_key=True, autoincrement=False
    )
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    layer: Mapped[str] = mapped_column(String(500), primary_key=True)
    points: Mapped[int] = mapped_column(BigInteger)  # 0: every row deleted since


class Spectrum(Base):
    """Per-layer spectrum summary of a frame (histogram, fit), for drill-down plots."""

    __tablename__ = "spectrum"
    __table_args__ = (
        UniqueConstraint("frame_id", "analysis", "layer"),
        # the page order of GET /runs/{id}/spectra: a page is an index range (0008)
        Index("ix_spectrum_run_step_layer", "run_id", "step", "layer", "analysis", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"))
    frame_id: Mapped[int] = mapped_column(ForeignKey("frame.id", ondelete="CASCADE"))
    analysis: Mapped[str] = mapped_column(String(64))
    layer: Mapped[str] = mapped_column(String(500))
    step: Mapped[int] = mapped_column(BigInteger)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)


class AlertRule(Base):
    __tablename__ = "alert_rule"
    __table_args__ = (UniqueConstraint("project_id", "rule"), NEVER_REUSE_IDS)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"))
    rule: Mapped[str] = mapped_column(String(64))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class Alert(Base):
    """One episode of a rule firing for (run, layer); resolved when the condition clears."""

    __tablename__ = "alert"
    __table_args__ = (
        Index("ix_alert_run_rule_layer", "run_id", "rule", "layer"),
        # one open episode per (run, rule, layer); migration 0002
        Index(
            "ux_alert_open_episode",
            "run_id",
            "rule",
            "layer",
            unique=True,
            sqlite_where=text("status = 'open'"),
            postgresql_where=text("status = 'open'"),
        ),
        NEVER_REUSE_IDS,
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"))
    rule: Mapped[str] = mapped_column(String(64))
    layer: Mapped[str] = mapped_column(String(500), default="")
    severity: Mapped[str] = mapped_column(String(16), default="warning")
    status: Mapped[str] = mapped_column(String(16), default="open")  # open|resolved
    step: Mapped[int] = mapped_column(BigInteger)
    resolved_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    message: Mapped[str] = mapped_column(Text, default="")
    values: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # someone has seen the episode (migration 0010): not counted as needing attention, its
    # pending alert.opened deliveries dropped; None when unacknowledged
    acknowledged_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    acknowledged_by: Mapped[str | None] = mapped_column(String(200), nullable=True)


class Webhook(Base):
    __tablename__ = "webhook"
    __table_args__ = NEVER_REUSE_IDS

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    project_id: Mapped[int] = mapped_column(
        ForeignKey("project.id", ondelete="CASCADE"), index=True
    )
    url: Mapped[str] = mapped_column(String(2000))
    secret: Mapped[str] = mapped_column(String(200))
    events: Mapped[list[str]] = mapped_column(JSON, default=list)  # empty = all
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    format: Mapped[str] = mapped_column(String(16), default="standard")  # standard|slack
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    disabled_reason: Mapped[str | None] = mapped_column(Text, nullable=True)


class Delivery(Base):
    """Outbox row: one (event, webhook) message and its delivery attempts."""

    __tablename__ = "delivery"
    __table_args__ = (Index("ix_delivery_status_next_at", "status", "next_at"), NEVER_REUSE_IDS)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    webhook_id: Mapped[int] = mapped_column(
        ForeignKey("webhook.id", ondelete="CASCADE"), index=True
    )
    alert_id: Mapped[int | None] = mapped_column(
        ForeignKey("alert.id", ondelete="SET NULL"), nullable=True
    )
    message_id: Mapped[str] = mapped_column(String(64), unique=True)
    event: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending|delivered|failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class DeliveryAttempt(Base):
    """Delivery log: one row per HTTP attempt."""

    __tablename__ = "delivery_attempt"
    __table_args__ = NEVER_REUSE_IDS

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    delivery_id: Mapped[int] = mapped_column(
        ForeignKey("delivery.id", ondelete="CASCADE"), index=True
    )
    attempted_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
