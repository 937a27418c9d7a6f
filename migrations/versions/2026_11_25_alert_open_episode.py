"""one open alert episode per (run, rule, layer)

A partial unique index: two workers evaluating frames of the same run at once cannot both
open an episode; the loser's results transaction fails and its job is retried, and the retry
sees the open episode.

A database that already holds such twins (the race, before this index) has them merged first,
else the index cannot be built and the server never starts: they are one episode opened twice,
so the first opened (lowest id) stays, from the earliest first step of the twins to their latest
``last_step``, and the others' webhook deliveries point at it before they are deleted. Resolving
them instead would report a condition cleared that never was.

Revision ID: 0002_alert_open_episode
Revises: 0001
Create Date: 2026-11-25 18:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_alert_open_episode"
down_revision = "0001"
branch_labels = None
depends_on = None

_OPEN = sa.text("status = 'open'")


_ALERT = sa.table(
    "alert",
    sa.column("id", sa.BigInteger),
    sa.column("run_id", sa.BigInteger),
    sa.column("rule", sa.String),
    sa.column("layer", sa.String),
    sa.column("status", sa.String),
    sa.column("step", sa.BigInteger),
    sa.column("values", sa.JSON),
)
_DELIVERY = sa.table("delivery", sa.column("alert_id", sa.BigInteger))


def upgrade() -> None:
    _merge_open_twins(op.get_bind())
    op.create_index(
        "ux_alert_open_episode",
        "alert",
        ["run_id", "rule", "layer"],
        unique=True,
        sqlite_where=_OPEN,
        postgresql_where=_OPEN,
    )


def _merge_open_twins(conn: sa.Connection) -> None:
    """Make each (run, rule, layer) hold at most one open episode (see the module docstring)."""
    key = (_ALERT.c.run_id, _ALERT.c.rule, _ALERT.c.layer)
    is_open = _ALERT.c.status == "open"
    twins = conn.execute(
        sa.select(*key).where(is_open).group_by(*key).having(sa.func.count() > 1)
    ).all()
    for run_id, rule, layer in twins:
        rows = conn.execute(
            sa.select(_ALERT.c.id, _ALERT.c.step, _ALERT.c["values"])
            .where(is_open, *(c == v for c, v in zip(key, (run_id, rule, layer), strict=True)))
            .order_by(_ALERT.c.id)
        ).all()
        kept, others = rows[0], [r.id for r in rows[1:]]
        values = dict(kept[2] or {})
        for name, pick in (("first_step", min), ("last_step", max)):  # the NaN/Inf rule's span
            seen = [int(r[2][name]) for r in rows if name in (r[2] or {})]
            if seen:
                values[name] = pick(seen)
        merged = {"step": min(r.step for r in rows), "values": values}
        conn.execute(sa.update(_ALERT).where(_ALERT.c.id == kept.id).values(merged))
        conn.execute(
            sa.update(_DELIVERY).where(_DELIVERY.c.alert_id.in_(others)).values(alert_id=kept.id)
        )
        conn.execute(sa.delete(_ALERT).where(_ALERT.c.id.in_(others)))


def downgrade() -> None:
    op.drop_index("ux_alert_open_episode", table_name="alert")
