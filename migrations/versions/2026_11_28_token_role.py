"""token.role: read, write or admin

A token could do everything in its project, deleting the project included. A token now has a
role: ``read`` (GET only), ``write`` (what a training client does: create and resume runs, post
frames, metrics and scalars, finish runs) or ``admin`` (also deleting runs and projects, bulk
deletion, blob pruning, alert-rule and webhook changes). Existing tokens keep doing what they
did: they become ``admin``. ``spectrawatch token create`` makes ``write`` tokens by default.

``token.project_id`` may be NULL: a server-wide token (``token create --all-projects``) sees
every project, as anonymous local use does. A downgrade deletes those tokens.

Revision ID: 0009_token_role
Revises: 0008_read_side
Create Date: 2026-11-28 17:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_token_role"
down_revision = "0008_read_side"
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("token") as batch:
        batch.add_column(sa.Column("role", sa.String(16), nullable=True))
    op.execute("UPDATE token SET role = 'admin'")
    with op.batch_alter_table("token") as batch:
        batch.alter_column("role", existing_type=sa.String(16), nullable=False)
        batch.alter_column("project_id", existing_type=BIG_ID, nullable=True)
        batch.create_check_constraint("role", "role IN ('read', 'write', 'admin')")


def downgrade() -> None:
    op.execute("DELETE FROM token WHERE project_id IS NULL")  # server-wide: no project to keep
    with op.batch_alter_table("token") as batch:
        batch.alter_column("project_id", existing_type=BIG_ID, nullable=False)
        batch.drop_constraint(batch.f("ck_token_role"), type_="check")
        batch.drop_column("role")
