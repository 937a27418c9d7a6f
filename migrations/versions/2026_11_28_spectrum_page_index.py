"""ix_spectrum_run_step_layer: spectra pages in their order, from an index

``GET /runs/{id}/spectra`` pages the run's spectra by (step, layer, analysis, id). With only
``ix_spectrum_run_id`` every page read the keys of all of the run's spectra from the table and
sorted them (75,000 spectra: 0.04-0.08 s a page, whichever page). This index holds the page
order, so a page is an index range from the previous page's last key (keyset pagination) and
stops after ``limit`` entries. It replaces ``ix_spectrum_run_id`` (same leading column: the
run's deletion and the drill-down's step list use it as well).

Revision ID: 0008_spectrum_page_index
Revises: 0007_run_uid
Create Date: 2026-11-28 13:15:00
"""

from __future__ import annotations

from alembic import op

revision = "0008_spectrum_page_index"
down_revision = "0007_run_uid"
branch_labels = None
depends_on = None

NAME = "ix_spectrum_run_step_layer"


def upgrade() -> None:
    op.create_index(NAME, "spectrum", ["run_id", "step", "layer", "analysis", "id"])
    op.drop_index("ix_spectrum_run_id", table_name="spectrum")


def downgrade() -> None:
    op.create_index("ix_spectrum_run_id", "spectrum", ["run_id"])
    op.drop_index(NAME, table_name="spectrum")
