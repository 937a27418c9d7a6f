"""SQLite: AUTOINCREMENT ids, so a deleted row's id is never handed to a new one

SQLite gives an ``INTEGER PRIMARY KEY`` without ``AUTOINCREMENT`` the largest id in the table
plus one: the id of the newest row, once deleted, went to the next new row. A run's alert
deleted with the run gave its id to the next run's alert (a ``PATCH /alerts/{id}`` meant for
the old one acknowledged the new one), a deleted webhook's id to the next webhook (a retried
``DELETE /webhooks/{id}`` deleted it). Each table whose ids the API shows or that loses rows is
rebuilt with ``AUTOINCREMENT``; copying the rows seeds ``sqlite_sequence`` with its largest id.
The result tables (metric, scalar, spectrum: the largest, written most, ids never shown) keep
theirs. PostgreSQL: nothing to do, a sequence never hands out an id twice.

Revision ID: 0012_sqlite_autoincrement
Revises: 0011_frame_requeued_at
Create Date: 2026-11-30 10:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0012_sqlite_autoincrement"
down_revision = "0011_frame_requeued_at"
branch_labels = None
depends_on = None

# parents first (the order does not matter with foreign keys off, as migrations run on SQLite)
TABLES = (
    "project",
    "token",
    "run",
    "frame",
    "job",
    "alert_rule",
    "alert",
    "webhook",
    "delivery",
    "delivery_attempt",
)


def _rebuild(autoincrement: bool) -> None:
    """Recreate each of :data:`TABLES` with or without ``AUTOINCREMENT``, rows and indexes kept."""
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in TABLES:
        with op.batch_alter_table(
            table, recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}
        ):
            pass


def upgrade() -> None:
    _rebuild(autoincrement=True)


def downgrade() -> None:
    _rebuild(autoincrement=False)
