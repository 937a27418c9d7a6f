"""one open alert episode per (run, rule, layer)

A partial unique index: two workers evaluating frames of the same run at once cannot both
open an episode; the loser's results transaction fails and its job is retried, and the retry
sees the open episode.

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


def upgrade() -> None:
    op.create_index(
        "ux_alert_open_episode",
        "alert",
        ["run_id", "rule", "layer"],
        unique=True,
        sqlite_where=_OPEN,
        postgresql_where=_OPEN,
    )


def downgrade() -> None:
    op.drop_index("ux_alert_open_episode", table_name="alert")
