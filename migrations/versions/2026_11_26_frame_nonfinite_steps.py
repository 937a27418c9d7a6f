"""frame.nonfinite_steps: the first and last step of each layer's NaN/Inf rows

A multi-step sketch frame says which of its steps carried non-finite values, so the NaN alert
opens at the first bad step and a frame arriving late with the tail of a resolved incident does
not open a second episode.

Revision ID: 0004_frame_nonfinite_steps
Revises: 0003_metric_layer_index
Create Date: 2026-11-26 13:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_frame_nonfinite_steps"
down_revision = "0003_metric_layer_index"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("frame") as batch:
        batch.add_column(sa.Column("nonfinite_steps", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("frame") as batch:
        batch.drop_column("nonfinite_steps")
