"""frame.error: why a frame's analysis failed

The reason was kept only in the embedded queue's job row (and the logs); the procrastinate
queue had none. Both queues now store it on the frame, where the API shows it.

Revision ID: 0006_frame_error
Revises: 0005_metric_covering_index
Create Date: 2026-11-28 08:15:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_frame_error"
down_revision = "0005_metric_covering_index"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("frame") as batch:
        batch.add_column(sa.Column("error", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("frame") as batch:
        batch.drop_column("error")
