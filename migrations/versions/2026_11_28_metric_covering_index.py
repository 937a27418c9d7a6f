"""ix_metric_run_name_layer_step carries the value: per-layer series reads use the index alone

A series read (the dashboards' min/max buckets, ``GET /runs/{id}/metrics``) walks this index by
(run, name, layer, step) and fetched each row's value from the table; a frame stores every
layer at one step, so one layer's rows lie on as many table pages as it has steps. With the
value in the index the read touches no table page: bucketing one metric of 150 layers x 5,000
steps 2.3 -> 0.8 s in SQLite. The index replaces 0003's (same key prefix, same uses).

Revision ID: 0005_metric_covering_index
Revises: 0004_frame_nonfinite_steps
Create Date: 2026-11-28 07:30:00
"""

from __future__ import annotations

from alembic import op

revision = "0005_metric_covering_index"
down_revision = "0004_frame_nonfinite_steps"
branch_labels = None
depends_on = None

NAME = "ix_metric_run_name_layer_step"


def upgrade() -> None:
    op.drop_index(NAME, table_name="metric")
    op.create_index(NAME, "metric", ["run_id", "name", "layer", "step", "value"])


def downgrade() -> None:
    op.drop_index(NAME, table_name="metric")
    op.create_index(NAME, "metric", ["run_id", "name", "layer", "step"])
