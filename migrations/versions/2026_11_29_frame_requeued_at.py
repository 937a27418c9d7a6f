"""frame.requeued_at: when a re-analysis queued the frame again

``POST /runs/{id}/reanalyze`` queues a run's stored frames again; the worker evaluates alert
rules only on a frame's first analysis (a re-analysis would open its episodes again and send
their webhooks), and this column is how it tells the two apart. Nullable, no backfill: every
existing frame was analysed as ingested.

Revision ID: 0011_frame_requeued_at
Revises: 0010_alert_acknowledged
Create Date: 2026-11-29 16:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011_frame_requeued_at"
down_revision = "0010_alert_acknowledged"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("frame") as batch:
        batch.add_column(sa.Column("requeued_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("frame") as batch:
        batch.drop_column("requeued_at")
