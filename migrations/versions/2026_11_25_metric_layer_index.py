"""index metric series by (run, name, layer, step) for per-layer queries

Revision ID: 0003_metric_layer_index
Revises: 0002_alert_open_episode
Create Date: 2026-11-25 19:35:00
"""

from __future__ import annotations

from alembic import op

revision = "0003_metric_layer_index"
down_revision = "0002_alert_open_episode"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_metric_run_name_layer_step", "metric", ["run_id", "name", "layer", "step"])


def downgrade() -> None:
    op.drop_index("ix_metric_run_name_layer_step", table_name="metric")
