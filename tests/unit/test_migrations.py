"""The Alembic migrations build exactly the schema the ORM models describe."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from sqlalchemy import inspect

from spectrawatch_server.db import migrate
from spectrawatch_server.db.migrate import alembic_config
from spectrawatch_server.db.models import Base
from spectrawatch_server.db.session import make_engine


def test_migrations_match_models_and_downgrade_cleanly(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'schema.db'}"
    engine = make_engine(url)
    migrate.upgrade(engine)
    assert set(inspect(engine).get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}
    command.check(alembic_config(url))  # raises if the models and migrations disagree
    command.downgrade(alembic_config(url), "base")
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    migrate.upgrade(engine)  # and up again
    assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_run_uid_migration_gives_every_existing_run_its_own_uid(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    command.upgrade(alembic_config(url), "0006_frame_error")
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO project (id, name, created_at) VALUES (1, 'p', '2026')")
        for i in range(1, 1502):  # more than one batch of the backfill
            conn.exec_driver_sql(
                "INSERT INTO run (id, project_id, name, status, config, tags, summary, "
                "client_stats, created_at, updated_at) "
                f"VALUES ({i}, 1, 'r{i}', 'running', '{{}}', '[]', '{{}}', '{{}}', '2026', '2026')"
            )
    migrate.upgrade(engine)
    with engine.connect() as conn:
        uids = [row[0] for row in conn.exec_driver_sql("SELECT uid FROM run")]
        nullable = {c["name"]: c["nullable"] for c in inspect(conn).get_columns("run")}["uid"]
    assert len(uids) == len(set(uids)) == 1501
    assert all(len(u) == 32 and int(u, 16) >= 0 for u in uids)
    assert not nullable
    engine.dispose()
