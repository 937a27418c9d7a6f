"""``spectrawatch db copy`` on SQLite files: every table copied as it is (ids, JSON, tz-aware
times), and each refusal before anything is written. The copy into PostgreSQL, read back by a
server, is in ``tests/integration/test_db_copy.py``."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import func, select, text, update

from spectrawatch.cli import main
from spectrawatch_server import startup
from spectrawatch_server.db import migrate, transfer
from spectrawatch_server.db.migrate import alembic_config
from spectrawatch_server.db.models import (
    Alert,
    AlertRule,
    Base,
    Delivery,
    DeliveryAttempt,
    Frame,
    Job,
    Metric,
    MetricSeries,
    Project,
    Run,
    Scalar,
    Spectrum,
    Token,
    Webhook,
)
from spectrawatch_server.db.session import make_engine, make_session_factory

T0 = datetime(2026, 11, 28, 12, 30, 15, 123456, tzinfo=timezone.utc)


def seed(url: str, *, frame_status: str = "done", metrics: int = 7) -> None:
    """A migrated database with a row in every table (ids with gaps, as deletions leave)."""
    engine = make_engine(url)
    migrate.upgrade(engine)
    with make_session_factory(engine).begin() as s:
        s.add(Project(id=3, name="exp", created_at=T0))
        s.add(Token(id=5, project_id=3, prefix="sw_abc", secret_hash="f" * 64, role="admin"))
        s.add(
            Run(id=9, project_id=3, name="r", config={"lr": 0.1, "nested": [1, None]}, tags=["a"])
        )
        s.flush()
        s.add(
            Frame(
                id=11,
                run_id=9,
                kind="weights",
                step=100,
                seq=0,
                idempotency_key="9:0",
                blob_key="runs/9/weights/000000000000-0123abcd.safetensors",
                bytes=10,
                info={"dtype": "float32"},
                layers=["fc.weight"],
                nonfinite_steps=None,
                status=frame_status,
                created_at=T0,
                requeued_at=T0 + timedelta(hours=1),
            )
        )
        s.flush()
        s.add(Job(id=13, frame_id=11, status="done" if frame_status == "done" else "pending"))
        for i in range(metrics):
            s.add(
                Metric(
                    run_id=9,
                    frame_id=11,
                    analysis="htsr",
                    layer=f"l{i}",
                    name="htsr.alpha",
                    step=100,
                    value=None if i == 0 else 1.5 + i,
                )
            )
        s.add(MetricSeries(run_id=9, name="htsr.alpha", layer="l1", points=1))
        s.add(Spectrum(run_id=9, frame_id=11, analysis="htsr", layer="l1", step=100, payload={}))
        s.add(Scalar(run_id=9, step=100, name="loss", value=0.25))
        s.add(AlertRule(project_id=3, rule="nonfinite", enabled=False, params={"severity": "info"}))
        s.add(Alert(id=17, run_id=9, rule="nonfinite", step=100, values={"count": 2}))
        s.add(Webhook(id=19, project_id=3, url="https://h.example/x", secret="whsec_s"))
        s.flush()
        s.add(Delivery(id=23, webhook_id=19, alert_id=17, message_id="m1", event="e", payload={}))
        s.flush()
        s.add(DeliveryAttempt(delivery_id=23, status_code=500, latency_ms=1.5))
    engine.dispose()


def rows(url: str, table: str) -> list[Any]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(Base.metadata.tables[table]).order_by(text("1"))))
    finally:
        engine.dispose()


def counts(url: str) -> dict[str, int]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return {
                t.name: int(conn.scalar(select(func.count()).select_from(t)) or 0)
                for t in Base.metadata.sorted_tables
            }
    finally:
        engine.dispose()


@pytest.fixture
def source(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'src' / 'spectrawatch.db'}"
    (tmp_path / "src").mkdir()
    seed(url)
    return url


def test_sqlite_copy_keeps_every_row_id_json_and_time(
    source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "dst"
    assert (
        main(
            [
                "db",
                "copy",
                "--from",
                str(tmp_path / "src"),
                "--to",
                str(target),
                "--batch-rows",
                "3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    target_url = f"sqlite:///{target / 'spectrawatch.db'}"
    for table in Base.metadata.tables:
        assert rows(target_url, table) == rows(source, table), table
    assert counts(target_url)["metric"] == 7
    assert "copied 20 rows of 14 tables" in out
    assert "row counts verified" in out
    assert "blobs: 1 frames name files" in out
    engine = make_engine(target_url)
    with make_session_factory(engine)() as s:
        frame = s.get_one(Frame, 11)
        assert frame.created_at == T0
        assert frame.created_at.tzinfo is not None
        assert frame.requeued_at == T0 + timedelta(hours=1)
        assert s.get_one(Run, 9).config == {"lr": 0.1, "nested": [1, None]}
        assert s.get_one(Token, 5).secret_hash == "f" * 64  # the hash, as stored
        s.add(Run(project_id=3, name="new"))
        s.commit()
        assert s.scalar(select(func.max(Run.id))) == 10  # the next id follows the copied ones
    engine.dispose()


def test_a_target_with_rows_is_refused_unless_replace(
    source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = f"sqlite:///{tmp_path / 'dst.db'}"
    seed(target, metrics=2)
    before = counts(target)
    assert main(["db", "copy", "--from", source, "--to", target]) == 2
    err = capsys.readouterr().err
    assert "is not empty (rows in project, " in err
    assert "--replace" in err
    assert counts(target) == before  # nothing merged
    assert main(["db", "copy", "--from", source, "--to", target, "--replace"]) == 0
    assert counts(target) == counts(source)


def test_frames_waiting_for_analysis_are_refused_unless_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = f"sqlite:///{tmp_path / 'src.db'}"
    seed(source, frame_status="pending")
    target = f"sqlite:///{tmp_path / 'dst.db'}"
    assert main(["db", "copy", "--from", source, "--to", target]) == 2
    err = capsys.readouterr().err
    assert "1 frame(s) of run(s) 9 still wait for analysis" in err
    assert main(["db", "copy", "--from", source, "--to", target, "--allow-pending"]) == 0
    assert "1 frame(s) were copied waiting for analysis" in capsys.readouterr().err
    assert rows(target, "job") == rows(source, "job")  # the embedded queue's job goes along


def test_a_source_on_an_older_schema_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = f"sqlite:///{tmp_path / 'old.db'}"
    command.upgrade(alembic_config(source), "0010_alert_acknowledged")
    target = tmp_path / "dst.db"
    assert main(["db", "copy", "--from", source, "--to", str(target)]) == 2
    err = capsys.readouterr().err
    assert "the source's schema is at revision 0010_alert_acknowledged" in err
    assert "run this version's `spectrawatch server` on the source once" in err
    assert not target.exists()  # refused before the target was touched


@pytest.mark.parametrize(
    ("source", "target", "message"),
    [
        ("missing.db", "dst.db", "no SQLite database at "),
        ("src", "src/spectrawatch.db", "the source and the target are the same database"),
    ],
)
def test_a_missing_source_or_the_same_database_is_refused(
    source: str, target: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "src").mkdir()
    seed(f"sqlite:///{tmp_path / 'src' / 'spectrawatch.db'}")
    assert (
        main(["db", "copy", "--from", str(tmp_path / source), "--to", str(tmp_path / target)]) == 2
    )
    assert message in capsys.readouterr().err


def test_a_running_server_s_data_directory_is_refused(
    source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with startup.lock_data_dir(tmp_path / "src"):  # as a running embedded server holds it
        assert main(["db", "copy", "--from", source, "--to", str(tmp_path / "dst")]) == 2
    assert "is in use by another spectrawatch server" in capsys.readouterr().err
    assert not (tmp_path / "dst" / "spectrawatch.db").exists()


def test_a_target_migrated_by_a_newer_version_is_refused(
    source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = f"sqlite:///{tmp_path / 'dst.db'}"
    engine = make_engine(target)
    migrate.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    engine.dispose()
    assert main(["db", "copy", "--from", source, "--to", target]) == 2
    assert "newer than this spectrawatch" in capsys.readouterr().err


def test_a_count_mismatch_rolls_the_whole_copy_back(
    source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = transfer._batches

    def losing_a_row(connection: Any, table: Any, size: int) -> Iterator[transfer.Rows]:
        for batch in batches(connection, table, size):
            yield batch[1:] if table.name == "metric" else batch

    monkeypatch.setattr(transfer, "_batches", losing_a_row)
    target = f"sqlite:///{tmp_path / 'dst.db'}"
    with pytest.raises(transfer.CopyMismatch, match="table metric: 7 row"):
        transfer.copy_database(source, target)
    assert set(counts(target).values()) == {0}  # migrated, and empty again


def test_blob_files_are_copied_by_their_frames_keys(source: str, tmp_path: Path) -> None:
    key = "runs/9/weights/000000000000-0123abcd.safetensors"
    (tmp_path / "blobs" / "runs/9/weights").mkdir(parents=True)
    (tmp_path / "blobs" / key).write_bytes(b"x" * 10)
    (tmp_path / "blobs" / "stray.txt").write_text("not a frame's")
    done = transfer.copy_blob_files(source, tmp_path / "blobs", tmp_path / "copy")
    assert (done.copied, done.present, done.missing, done.bytes) == (1, 0, 0, 10)
    assert (tmp_path / "copy" / key).read_bytes() == b"x" * 10
    assert not (tmp_path / "copy" / "stray.txt").exists()
    again = transfer.copy_blob_files(source, tmp_path / "blobs", tmp_path / "copy")
    assert (again.copied, again.present) == (0, 1)  # a re-run resumes
    assert stat.S_IMODE((tmp_path / "copy" / key).stat().st_mode) == 0o600
    for folder in ("copy", "copy/runs", "copy/runs/9", "copy/runs/9/weights"):
        assert stat.S_IMODE((tmp_path / folder).stat().st_mode) == 0o700, folder


def test_a_blob_key_outside_the_store_is_skipped_and_named(source: str, tmp_path: Path) -> None:
    """A key with ``..`` is never followed; it was a ValueError that ended the command with a
    traceback after the database copy had committed, leaving the other blobs uncopied."""
    engine = make_engine(source)
    with engine.begin() as connection:
        first = connection.scalar(select(Frame.id).order_by(Frame.id).limit(1))
        connection.execute(
            update(Frame).where(Frame.id == first).values(blob_key="runs/../../../../tmp/x")
        )
    engine.dispose()
    (tmp_path / "blobs").mkdir()
    done = transfer.copy_blob_files(source, tmp_path / "blobs", tmp_path / "copy")
    assert done.invalid == (first,)
    assert (done.copied, done.missing) == (0, 0)
    assert not (tmp_path / "copy").exists()


def test_blobs_from_a_missing_folder_is_refused_and_missing_blobs_exit_1(
    source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mistyped ``--blobs-from`` copied the database, reported every blob missing, advised
    the new server to use the empty target folder, and exited 0."""
    target = f"sqlite:///{tmp_path / 'dst.db'}"
    blobs = ["--blobs-from", str(tmp_path / "typo"), "--blobs-to", str(tmp_path / "copy")]
    assert main(["db", "copy", "--from", source, "--to", target, *blobs]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert not (tmp_path / "dst.db").exists()  # refused before anything was written
    (tmp_path / "typo").mkdir()  # there, but without the frame's blob
    assert main(["db", "copy", "--from", source, "--to", target, *blobs]) == 1
    assert "cannot be re-analysed" in capsys.readouterr().err


def test_the_copy_keeps_the_ids_the_source_handed_out(source: str, tmp_path: Path) -> None:
    """A deleted newest row's id came back on the copy (its counter was the copied max id): a
    retried ``DELETE /webhooks/{id}`` aimed at the old one would hit a new one."""
    engine = make_engine(source)
    with engine.begin() as connection:
        top = int(connection.scalar(select(func.max(Project.id))) or 0)
        connection.execute(
            text("INSERT INTO project (id, name, created_at) VALUES (:i, 'gone', :t)"),
            {"i": top + 40, "t": datetime.now(timezone.utc)},
        )
        connection.execute(text("DELETE FROM project WHERE id = :i"), {"i": top + 40})
    engine.dispose()
    target = f"sqlite:///{tmp_path / 'dst.db'}"
    transfer.copy_database(source, target)
    copy = make_engine(target)
    with copy.begin() as connection:
        connection.execute(
            text("INSERT INTO project (name, created_at) VALUES ('new', :t)"),
            {"t": datetime.now(timezone.utc)},
        )
        new_id = connection.scalar(select(Project.id).where(Project.name == "new"))
    copy.dispose()
    assert new_id == top + 41
