"""The SQLite engine's write-ahead log does not keep the size of its largest burst."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from spectrawatch_server.db.session import WAL_SIZE_LIMIT, make_engine


def test_wal_is_cut_back_after_a_burst_once_checkpointed(tmp_path: Path) -> None:
    database = tmp_path / "wal.db"
    engine = make_engine(f"sqlite:///{database}")
    wal = database.with_name("wal.db-wal")
    blob = b"\x00" * 100_000
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (b BLOB)"))
    with engine.begin() as conn:  # one transaction: the log holds all of it until it commits
        for _ in range(2 * WAL_SIZE_LIMIT // len(blob)):
            conn.execute(text("INSERT INTO t VALUES (:b)"), {"b": blob})
    assert wal.stat().st_size > WAL_SIZE_LIMIT
    with engine.connect() as conn:  # what the auto-checkpoint after a commit does
        assert conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()[0] == 0
    with engine.begin() as conn:  # the next write restarts the log
        conn.execute(text("INSERT INTO t VALUES (x'01')"))
    assert wal.stat().st_size <= WAL_SIZE_LIMIT
    engine.dispose()
