"""Engine and session factory; SQLite gets WAL, a busy timeout and enforced foreign keys."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str) -> Engine:
    """Create the engine for ``url``; SQLite connections are configured on connect."""
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    engine = create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        database = engine.url.database
        if database and database != ":memory:":
            _create_private(Path(database))
        event.listen(engine, "connect", _configure_sqlite)
    return engine


def _create_private(path: Path) -> None:
    """Create a new SQLite file 0600 (it holds token hashes); SQLite gives its -wal and -shm
    files the same mode. An existing file, or a missing directory, is left as it is."""
    with contextlib.suppress(FileExistsError, FileNotFoundError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


# Bytes the write-ahead log is cut back to after a checkpoint resets it. Without a limit it
# keeps the size of the largest burst between checkpoints for as long as the server runs (a
# deletion of two 330-frame runs left 36 MB), on top of the database.
WAL_SIZE_LIMIT = 16 << 20


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
