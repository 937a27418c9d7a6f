"""The Alembic migrations build exactly the schema the ORM models describe."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from spectrawatch_server.db import migrate
from spectrawatch_server.db.migrate import alembic_config
from spectrawatch_server.db.models import Base
from spectrawatch_server.db.session import make_engine, make_session_factory
from spectrawatch_server.storage import alert_store, metric_reads
from spectrawatch_server.storage import repository as repo
from tests.servers import POSTGRES_URL, fresh_database

T = {"t": "2026-11-28 00:00:00+00:00"}

# every revision before head, oldest first (a new migration joins by itself)
OLD_REVISIONS = [
    rev.revision
    for rev in reversed(
        list(ScriptDirectory.from_config(alembic_config("sqlite://")).walk_revisions())
    )
][:-1]


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


def _database_urls() -> list[Any]:
    """SQLite, and PostgreSQL where ``SPECTRAWATCH_TEST_POSTGRES_URL`` names a server."""
    pg = pytest.mark.skipif(POSTGRES_URL is None, reason="SPECTRAWATCH_TEST_POSTGRES_URL unset")
    return ["sqlite", pytest.param("postgresql", marks=pg)]


@pytest.fixture(params=_database_urls())
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'old.db'}"
        return
    assert POSTGRES_URL is not None
    with fresh_database(POSTGRES_URL, "sw_migr") as url:
        yield url


def _spectrum_indexes(engine: Any) -> dict[str, list[str]]:
    return {
        str(ix["name"]): [str(c) for c in ix["column_names"]]
        for ix in inspect(engine).get_indexes("spectrum")
    }


@pytest.fixture
def empty_engine(empty_database: str) -> Iterator[Any]:
    """An engine on ``empty_database``, disposed after the test (no connection left open)."""
    engine = make_engine(empty_database)
    yield engine
    engine.dispose()


def test_open_episode_migration_merges_the_twins_the_race_left(
    empty_database: str, empty_engine: Any
) -> None:
    """0002 on a database holding the race it closes (two workers opened one (run, rule, layer)
    episode twice, or three times): its unique index failed to build (IntegrityError on SQLite,
    UniqueViolation on PostgreSQL) and the server never started. Now the twins are merged into
    the first opened, spanning them all, with their webhook deliveries; resolved episodes and
    other layers' are kept as they were."""
    url, engine = empty_database, empty_engine
    command.upgrade(alembic_config(url), "0001")
    alert = (
        "INSERT INTO alert (id, run_id, rule, layer, severity, status, step, message,"
        " \"values\", created_at) VALUES (:i, 1, 'nan_inf', :l, 'critical', :s, :step, '',"
        " :v, :t)"
    )
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO project (id, name, created_at) VALUES (1, 'p', :t)"), T)
        conn.execute(
            text(
                "INSERT INTO run (id, project_id, name, status, config, tags, summary,"
                " client_stats, created_at, updated_at) VALUES"
                " (1, 1, 'r', 'running', '{}', '[]', '{}', '{}', :t, :t)"
            ),
            T,
        )
        for i, layer, status, step, span in (
            (1, "fc1", "resolved", 5, (5, 6)),
            (2, "fc1", "open", 30, (30, 40)),
            (3, "fc1", "open", 20, (20, 25)),
            (4, "fc1", "open", 50, (50, 50)),
            (5, "fc2", "open", 30, (30, 30)),
        ):
            values = f'{{"first_step": {span[0]}, "last_step": {span[1]}}}'
            conn.execute(
                text(alert), {"i": i, "l": layer, "s": status, "step": step, "v": values, **T}
            )
        conn.execute(
            text(
                "INSERT INTO webhook (id, project_id, url, events, secret, enabled, format,"
                " created_at) VALUES (1, 1, 'https://example.org/h', '[]', 's', true, 'json', :t)"
            ),
            T,
        )
        for i, alert_id in enumerate((2, 3, 4, 5), start=1):
            conn.execute(
                text(
                    "INSERT INTO delivery (webhook_id, alert_id, message_id, event, payload,"
                    " status, attempts, next_at, created_at)"
                    " VALUES (1, :a, :m, 'alert.opened', '{}', 'delivered', 1, :t, :t)"
                ),
                {"a": alert_id, "m": f"m{i}", **T},
            )
    migrate.upgrade(engine)
    with engine.connect() as conn:
        alerts = conn.execute(
            text('SELECT id, layer, status, step, "values" FROM alert ORDER BY id')
        ).all()
        deliveries = conn.execute(text("SELECT alert_id FROM delivery ORDER BY id")).all()
    spans = [
        (i, layer, status, step, json.loads(v) if isinstance(v, str) else v)
        for i, layer, status, step, v in alerts
    ]
    assert spans == [
        (1, "fc1", "resolved", 5, {"first_step": 5, "last_step": 6}),
        (2, "fc1", "open", 20, {"first_step": 20, "last_step": 50}),
        (5, "fc2", "open", 30, {"first_step": 30, "last_step": 30}),
    ]
    assert [d[0] for d in deliveries] == [2, 2, 2, 5]


def test_read_side_migration_keeps_rows_counts_series_and_downgrades(
    empty_database: str, empty_engine: Any
) -> None:
    """0008 on a database holding spectra and metrics: ``ix_spectrum_run_id`` replaced by the
    page order's index, ``metric_series`` filled from the metric rows; one step down restores
    the index and drops the table; the rows stay."""
    url, engine = empty_database, empty_engine
    command.upgrade(alembic_config(url), "0007_run_uid")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO project (id, name, created_at) VALUES (1, 'p', :t)"), T)
        conn.execute(
            text(
                "INSERT INTO run (id, project_id, name, uid, status, config, tags, summary,"
                " client_stats, created_at, updated_at) VALUES"
                " (1, 1, 'r', 'u', 'running', '{}', '[]', '{}', '{}', :t, :t)"
            ),
            T,
        )
        for step in range(3):
            conn.execute(
                text(
                    "INSERT INTO frame (id, run_id, kind, step, seq, idempotency_key, blob_key,"
                    " encoding, bytes, info, layers, nonfinite, status, created_at) VALUES"
                    " (:i, 1, 'weights', :i, :i, :k, '', 'identity', 0, '{}', '[]', '{}',"
                    " 'done', :t)"
                ),
                {"i": step + 1, "k": f"k{step}", **T},
            )
            for layer in ("b", "a"):
                conn.execute(
                    text(
                        "INSERT INTO spectrum (run_id, frame_id, analysis, layer, step, payload)"
                        " VALUES (1, :f, 'htsr', :l, :s, '{}')"
                    ),
                    {"f": step + 1, "l": layer, "s": 2 - step},
                )
                for name in ("m", "n")[: step + 1]:
                    conn.execute(
                        text(
                            "INSERT INTO metric (run_id, frame_id, analysis, layer, name, step,"
                            " value) VALUES (1, :f, 'htsr', :l, :n, :s, NULL)"
                        ),
                        {"f": step + 1, "l": layer, "n": name, "s": 10 - step},
                    )
    assert "ix_spectrum_run_id" in _spectrum_indexes(engine)
    migrate.upgrade(engine)
    indexes = _spectrum_indexes(engine)
    assert indexes["ix_spectrum_run_step_layer"] == ["run_id", "step", "layer", "analysis", "id"]
    assert "ix_spectrum_run_id" not in indexes
    sessions = make_session_factory(engine)
    with sessions() as s:  # the series counted from the rows stored before
        assert list(metric_reads.metric_catalog(s, 1)) == [
            ("m", "a", 3, 8, 10),
            ("m", "b", 3, 8, 10),
            ("n", "a", 2, 8, 9),
            ("n", "b", 2, 8, 9),
        ]
        first = metric_reads.spectra_for(s, 1, None, None, None, limit=3)
        assert [(r.step, r.layer) for r in first] == [(0, "a"), (0, "b"), (1, "a")]
        last = first[-1]
        rest = metric_reads.spectra_for(
            s, 1, None, None, None, after=(last.step, last.layer, last.analysis, last.id)
        )
        assert [(r.step, r.layer) for r in rest] == [(1, "b"), (2, "a"), (2, "b")]
    command.downgrade(alembic_config(url), "0007_run_uid")
    assert "metric_series" not in inspect(engine).get_table_names()
    indexes = _spectrum_indexes(engine)
    assert "ix_spectrum_run_step_layer" not in indexes
    assert indexes["ix_spectrum_run_id"] == ["run_id"]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM spectrum")).scalar() == 6
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == (
            "0007_run_uid"
        )


def test_token_role_migration_makes_existing_tokens_admin_and_new_ones_write(
    empty_database: str, empty_engine: Any
) -> None:
    """0009 on a database holding a token: the token keeps doing what it did (``admin``,
    found by its secret as before); a token created afterwards is ``write``; the column refuses
    an unknown role; a server-wide token (no project) can be stored; one step down drops the
    column, keeps the project tokens and deletes the server-wide one."""
    url, engine = empty_database, empty_engine
    command.upgrade(alembic_config(url), "0008_read_side")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO project (name, created_at) VALUES ('p', :t)"), T)
        conn.execute(
            text(
                "INSERT INTO token (project_id, name, prefix, secret_hash, created_at)"
                " SELECT id, 'old', 'sw_old', :h, :t FROM project"
            ),
            {"h": repo.hash_secret("sw_old-secret"), **T},
        )
    migrate.upgrade(engine)
    sessions = make_session_factory(engine)
    with sessions() as s:
        old = repo.find_token(s, "sw_old-secret")
        assert old is not None
        assert (old.name, old.role) == ("old", "admin")
        project = repo.get_project(s, "p")
        assert project is not None
        _new, secret = repo.create_token(s, project, "new")
        s.commit()
        found = repo.find_token(s, secret)
        assert found is not None
        assert found.role == "write"
        repo.create_token(s, None, "server-wide", role="read")
        s.commit()
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(text("UPDATE token SET role = 'owner' WHERE name = 'old'"))
    command.downgrade(alembic_config(url), "0008_read_side")
    assert "role" not in {c["name"] for c in inspect(engine).get_columns("token")}
    with engine.connect() as conn:  # the server-wide token had no project to keep
        names = conn.execute(text("SELECT name FROM token ORDER BY name")).scalars().all()
        assert names == ["new", "old"]


def test_alert_acknowledged_migration_keeps_alerts_unacknowledged_and_downgrades(
    empty_database: str, empty_engine: Any
) -> None:
    """0010 on a database holding an open alert: it is unacknowledged (both columns NULL)
    and can be acknowledged; one step down drops the columns and keeps the alert."""
    url, engine = empty_database, empty_engine
    command.upgrade(alembic_config(url), "0009_token_role")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO project (id, name, created_at) VALUES (1, 'p', :t)"), T)
        conn.execute(
            text(
                "INSERT INTO run (id, project_id, name, uid, status, config, tags, summary,"
                " client_stats, created_at, updated_at) VALUES"
                " (1, 1, 'r', 'u', 'finished', '{}', '[]', '{}', '{}', :t, :t)"
            ),
            T,
        )
        conn.execute(
            text(
                "INSERT INTO alert (id, run_id, rule, layer, severity, status, step, message,"
                " \"values\", created_at) VALUES (1, 1, 'nonfinite', '', 'critical', 'open', 5,"
                " '', '{}', :t)"
            ),
            T,
        )
    migrate.upgrade(engine)
    with make_session_factory(engine)() as s:
        (alert,) = alert_store.list_alerts(s, run_id=1, acknowledged=False)
        assert (alert.acknowledged_at, alert.acknowledged_by) == (None, None)
        alert_store.acknowledge_alert(s, alert, "alice")
        s.commit()
        assert [a.id for a in alert_store.list_alerts(s, acknowledged=True)] == [1]
    command.downgrade(alembic_config(url), "0009_token_role")
    columns = {c["name"] for c in inspect(engine).get_columns("alert")}
    assert not {"acknowledged_at", "acknowledged_by"} & columns
    with engine.connect() as conn:
        assert conn.execute(text("SELECT status FROM alert")).scalars().all() == ["open"]


# parents before children, so each row's foreign keys name rows already there
_TABLE_ORDER = (
    "project",
    "token",
    "run",
    "frame",
    "job",
    "scalar",
    "metric",
    "spectrum",
    "alert_rule",
    "alert",
    "webhook",
    "delivery",
    "delivery_attempt",
)
_STATUS = {"run": "finished", "frame": "done", "job": "done", "alert": "open"}


def _column_value(column: Any, i: int) -> Any:
    """A value of ``column``'s type for row ``i`` (foreign keys name row ``i`` of the parent)."""
    kind = column.type
    if column.name == "id" or column.foreign_keys:
        return i
    if isinstance(kind, sa.Integer):
        return i
    if isinstance(kind, sa.Float | sa.Numeric):
        return 0.5 * i
    if isinstance(kind, sa.Boolean):
        return False
    if isinstance(kind, sa.DateTime):
        return datetime(2026, 11, 25, 12, 0, i, tzinfo=timezone.utc)
    if isinstance(kind, sa.JSON):
        return {}
    if isinstance(kind, sa.LargeBinary):
        return b"x"
    if column.name == "status":
        return _STATUS.get(column.table.name, "done")
    if column.name == "kind":
        return "weights"
    if column.name == "role":
        return "admin"
    return f"{column.table.name}-{column.name}-{i}"


def _fill_every_table(engine: Any) -> dict[str, int]:
    """Two rows in every table of the schema as it is now (reflected), required columns set."""
    tables = sa.MetaData()
    tables.reflect(engine)
    counts = {}
    with engine.begin() as conn:
        for name in _TABLE_ORDER:
            if name in tables.tables:
                table = tables.tables[name]
                for i in (1, 2):
                    row = {c.name: _column_value(c, i) for c in table.columns if not c.nullable}
                    conn.execute(sa.insert(table).values(**row))
                counts[name] = 2
    return counts


def _count(engine: Any, names: Iterable[str]) -> dict[str, int]:
    with engine.connect() as conn:
        return {n: conn.execute(sa.text(f"SELECT count(*) FROM {n}")).scalar_one() for n in names}


@pytest.mark.parametrize("revision", OLD_REVISIONS)
def test_upgrade_from_every_revision_keeps_every_row(tmp_path: Path, revision: str) -> None:
    """A table rebuilt by a batch migration on SQLite (0007's ``run``) was dropped with foreign
    keys enforced, and ON DELETE CASCADE emptied every table under it: a server upgraded from
    0001-0006 kept its projects, runs and webhooks but lost every frame, job, scalar, metric,
    spectrum and alert."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    command.upgrade(alembic_config(url), revision)
    counts = _fill_every_table(engine)
    assert {"frame", "metric", "scalar", "spectrum", "alert", "job"} <= set(counts)
    migrate.upgrade(engine)
    assert _count(engine, counts) == counts
    with engine.connect() as conn:  # the pooled connection enforces foreign keys again
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
        assert conn.exec_driver_sql("PRAGMA foreign_key_check").all() == []
        head = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar_one()
    assert head == ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    engine.dispose()


# tables whose SQLite ids 0012 makes AUTOINCREMENT (never handed out again once deleted)
_NEVER_REUSED = (
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


def _layout(engine: Any) -> dict[str, Any]:
    """Per table: its indexes (with their SQL: a partial index keeps its WHERE), foreign keys
    and unique constraints, as SQLite and the inspector report them."""
    found = inspect(engine)
    with engine.connect() as conn:
        index_sql = dict(
            conn.exec_driver_sql(
                "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
            ).all()
        )
    return {
        table: (
            sorted(index_sql[str(ix["name"])] for ix in found.get_indexes(table)),
            sorted(str(fk) for fk in found.get_foreign_keys(table)),
            sorted(str(uq["column_names"]) for uq in found.get_unique_constraints(table)),
        )
        for table in found.get_table_names()
    }


def _autoincrement_tables(engine: Any) -> set[str]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT name, sql FROM sqlite_master WHERE type = 'table'")
        return {name for name, sql in rows if "AUTOINCREMENT" in sql}


def test_sqlite_autoincrement_migration_keeps_rows_and_never_reuses_ids(tmp_path: Path) -> None:
    """0012 on a populated SQLite database: the tables whose ids the API shows are rebuilt with
    AUTOINCREMENT, rows, indexes (the open-episode index keeps its WHERE) and foreign keys kept,
    ``sqlite_sequence`` seeded from the largest ids: the newest webhook, deleted, does not give
    its id to the next one (it did: SQLite hands out the largest id + 1). One step down
    rebuilds them as they were, the rows kept; up again."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    command.upgrade(alembic_config(url), "0011_frame_requeued_at")
    counts = _fill_every_table(engine)
    before = _layout(engine)
    migrate.upgrade(engine)
    assert _autoincrement_tables(engine) == set(_NEVER_REUSED)
    assert _count(engine, counts) == counts
    assert _layout(engine) == before
    with engine.begin() as conn:
        seeded = dict(conn.exec_driver_sql("SELECT name, seq FROM sqlite_sequence").all())
        assert seeded == dict.fromkeys(_NEVER_REUSED, 2)
        assert conn.exec_driver_sql("PRAGMA foreign_key_check").all() == []
        conn.exec_driver_sql("DELETE FROM webhook WHERE id = 2")  # its delivery goes with it
        assert conn.exec_driver_sql("SELECT count(*) FROM delivery").scalar_one() == 1
        conn.execute(
            text(
                "INSERT INTO webhook (project_id, url, secret, events, enabled, format,"
                " created_at) VALUES (1, 'https://example.org/new', 's', '[]', 1, 'standard', :t)"
            ),
            T,
        )
        assert conn.exec_driver_sql("SELECT max(id) FROM webhook").scalar_one() == 3
    command.downgrade(alembic_config(url), "0011_frame_requeued_at")
    assert _autoincrement_tables(engine) == set()
    assert _layout(engine) == before
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA foreign_key_check").all() == []
        assert conn.exec_driver_sql("SELECT count(*) FROM webhook").scalar_one() == 2
    migrate.upgrade(engine)
    assert _autoincrement_tables(engine) == set(_NEVER_REUSED)
    engine.dispose()


def test_an_interrupted_sqlite_upgrade_leaves_nothing_and_the_next_start_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's driver began its transaction at the first INSERT, not before DDL: a batch
    migration's first ``CREATE TABLE _alembic_tmp_project`` committed alone, and an upgrade
    stopped after it (killed, disk full) left that table, so every later start failed with
    "table _alembic_tmp_project already exists". The upgrade is one transaction now."""
    from alembic.operations import Operations

    url = f"sqlite:///{tmp_path / 'sw.db'}"
    command.upgrade(alembic_config(url), "0011_frame_requeued_at")
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO project (id, name, created_at) VALUES (1, 'p', :t)"),
            {"t": datetime.now(timezone.utc)},
        )
    batch = Operations.batch_alter_table

    def disk_full(self: Any, table: str, *args: Any, **kwargs: Any) -> Any:
        if table == "token":  # the second table 0012 rebuilds
            raise OSError(28, "No space left on device")
        return batch(self, table, *args, **kwargs)

    monkeypatch.setattr(Operations, "batch_alter_table", disk_full)
    with pytest.raises(OSError, match="No space"):
        migrate.upgrade(engine)
    monkeypatch.undo()
    with engine.connect() as connection:
        names = set(inspect(connection).get_table_names())
        assert not [n for n in names if n.startswith("_alembic_tmp")]
        assert connection.scalar(text("SELECT version_num FROM alembic_version")) == (
            "0011_frame_requeued_at"
        )
    migrate.upgrade(engine)  # the next start
    with engine.connect() as connection:
        assert connection.scalar(text("SELECT name FROM project WHERE id = 1")) == "p"
        head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
        assert connection.scalar(text("SELECT version_num FROM alembic_version")) == head
    engine.dispose()


def test_a_start_beside_a_sqlite_upgrade_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second process starting while another rebuilt 0012's tables gave up after the 3-s
    busy timeout ("database is locked"): it waits for the upgrade now and finds the schema at
    head, as PostgreSQL's advisory lock makes it."""
    import threading
    import time

    from alembic.operations import Operations

    url = f"sqlite:///{tmp_path / 'sw.db'}"
    command.upgrade(alembic_config(url), "0011_frame_requeued_at")
    batch = Operations.batch_alter_table
    started = threading.Event()

    def slow(self: Any, table: str, *args: Any, **kwargs: Any) -> Any:
        if table == "project":
            started.set()
            time.sleep(4.0)  # longer than the busy timeout
        return batch(self, table, *args, **kwargs)

    monkeypatch.setattr(Operations, "batch_alter_table", slow)
    errors: list[BaseException] = []

    def start() -> None:
        try:
            migrate.upgrade(make_engine(url, lock_timeout=3.0))
        except BaseException as exc:  # reported below
            errors.append(exc)

    first = threading.Thread(target=start)
    first.start()
    assert started.wait(10)
    start()  # the second process's start, while the first holds the write lock
    first.join(30)
    assert errors == []
    engine = make_engine(url)
    with engine.connect() as connection:
        head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
        assert connection.scalar(text("SELECT version_num FROM alembic_version")) == head
    engine.dispose()
