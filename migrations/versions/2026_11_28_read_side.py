"""Reads of a big run: spectra pages from an index, metric series counted at write time

``ix_spectrum_run_step_layer``: ``GET /runs/{id}/spectra`` pages the run's spectra by (step,
layer, analysis, id). With only ``ix_spectrum_run_id`` every page read the keys of all of the
run's spectra from the table and sorted them (75,000 spectra: 0.04-0.08 s a page in SQLite,
whichever page; 25-78 ms in PostgreSQL, the sort spilling to disk). This index holds the page
order, so a page is an index range from the previous page's last key (keyset pagination) and
stops after ``limit`` entries. It replaces ``ix_spectrum_run_id`` (same leading column: the
run's deletion and the drill-down's step list use it as well).

``metric_series``: how many metric rows each (run, name, layer) series holds, kept by every
metric write; ``GET /runs/{id}/metrics/catalog`` counted them with a ``GROUP BY`` over every
metric row of the run (0.5-0.6 s on 2.3 M rows in SQLite, 0.4 s in PostgreSQL). Filled here
from the rows stored.

Revision ID: 0008_read_side
Revises: 0007_run_uid
Create Date: 2026-11-28 13:15:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_read_side"
down_revision = "0007_run_uid"
branch_labels = None
depends_on = None

NAME = "ix_spectrum_run_step_layer"


def upgrade() -> None:
    op.create_index(NAME, "spectrum", ["run_id", "step", "layer", "analysis", "id"])
    op.drop_index("ix_spectrum_run_id", table_name="spectrum")
    op.create_table(
        "metric_series",
        sa.Column(
            "run_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            sa.ForeignKey("run.id", name=op.f("fk_metric_series_run_id_run"), ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("layer", sa.String(500), nullable=False),
        sa.Column("points", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "name", "layer", name=op.f("pk_metric_series")),
    )
    op.execute(
        "INSERT INTO metric_series (run_id, name, layer, points)"
        " SELECT run_id, name, layer, count(*) FROM metric GROUP BY run_id, name, layer"
    )


def downgrade() -> None:
    op.drop_table("metric_series")
    op.create_index("ix_spectrum_run_id", "spectrum", ["run_id"])
    op.drop_index(NAME, table_name="spectrum")
