"""alert.acknowledged_at / acknowledged_by: acknowledging an alert episode

An alert stayed ``open`` until its signal cleared, and alerts of finished runs (nothing
evaluates them again) stayed open for good, red in the runs list. Someone who has seen an
episode can now acknowledge it (``PATCH /alerts/{id}``, ``spectrawatch alerts ack``): the runs
list counts only unacknowledged open alerts, and the episode's pending ``alert.opened``
deliveries are dropped. Both columns are NULL for an unacknowledged alert.

Revision ID: 0010_alert_acknowledged
Revises: 0009_token_role
Create Date: 2026-11-29 17:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_alert_acknowledged"
down_revision = "0009_token_role"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("alert") as batch:
        batch.add_column(sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("acknowledged_by", sa.String(200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("alert") as batch:
        batch.drop_column("acknowledged_by")
        batch.drop_column("acknowledged_at")
