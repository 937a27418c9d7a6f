"""run.uid: a random identity a client checks its cached run id against

A client keeps the integer id ``POST /runs`` gave it. A server restarted on a fresh database
(or restored from an older backup) may hand that id to another run, even of another project,
and the client's frames went into it. The client now sends the run's ``uid`` with every write;
a run whose ``uid`` differs answers 404 ``run_not_found`` and the client creates its run again.
Existing runs get a random ``uid`` here.

Revision ID: 0007_run_uid
Revises: 0006_frame_error
Create Date: 2026-11-28 10:05:00
"""

from __future__ import annotations

import secrets

import sqlalchemy as sa
from alembic import op

revision = "0007_run_uid"
down_revision = "0006_frame_error"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("run") as batch:
        batch.add_column(sa.Column("uid", sa.String(32), nullable=True))
    run = sa.table("run", sa.column("id", sa.BigInteger), sa.column("uid", sa.String))
    bind = op.get_bind()
    ids = bind.execute(sa.select(run.c.id)).scalars().all()
    for start in range(0, len(ids), 1000):
        bind.execute(
            run.update().where(run.c.id == sa.bindparam("rid")).values(uid=sa.bindparam("new")),
            [{"rid": i, "new": secrets.token_hex(16)} for i in ids[start : start + 1000]],
        )
    with op.batch_alter_table("run") as batch:
        batch.alter_column("uid", existing_type=sa.String(32), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("run") as batch:
        batch.drop_column("uid")
