"""Engine and session factory; SQLite gets WAL, a busy timeout (the lock timeout) and enforced
foreign keys; PostgreSQL connections get a statement and a lock timeout (:func:`make_engine`)."""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker


def make_engine(
    url: str,
    *,
    pool_timeout: float = 30.0,
    statement_timeout: float = 0.0,
    lock_timeout: float = 0.0,
    transaction_pooling: bool = False,
) -> Engine:
    """Create the engine for ``url``; SQLite connections are configured on connect.

    ``pool_timeout``: seconds a request waits for a free pooled connection before
    :class:`sqlalchemy.exc.TimeoutError`. On PostgreSQL every connection starts with
    ``statement_timeout`` and ``lock_timeout`` (seconds, 0 = none: PostgreSQL's default), so a
    statement stuck behind a lock or running away fails (``QueryCanceled`` /
    ``LockNotAvailable``) instead of holding its connection as long as the lock lasts. On
    SQLite ``lock_timeout`` is the busy timeout: how long a statement waits for another
    connection's write lock before ``database is locked`` (0: as long as SQLite allows, about
    24 days); SQLite has no statement timeout.

    ``transaction_pooling`` (PostgreSQL behind PgBouncer in transaction pooling mode): a
    pooler hands each transaction whichever server connection is free and drops (or refuses)
    the startup packet's ``options``, so the timeouts are set at the start of every transaction
    instead (``set_config(..., true)``: ``SET LOCAL``, one statement), and psycopg's automatic
    server-side prepared statements are off (a statement prepared on one server connection
    does not exist on the next).
    """
    kwargs: dict[str, Any] = {"pool_pre_ping": True, "pool_timeout": pool_timeout}
    busy_ms = sqlite_busy_timeout_ms(lock_timeout)
    per_transaction = ""
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": busy_ms // 1000}
    elif transaction_pooling:
        kwargs["connect_args"] = {"prepare_threshold": None}
        per_transaction = _set_local_timeouts(statement_timeout, lock_timeout)
    elif timeouts := _timeout_options(statement_timeout, lock_timeout):
        given = make_url(url).query.get("options")  # ?options=... in the URL: kept, ours after
        given = given if isinstance(given, str) else " ".join(given or ())
        kwargs["connect_args"] = {"options": f"{given} {timeouts}".strip()}
    engine = create_engine(url, **kwargs)
    if per_transaction:
        event.listen(engine, "begin", functools.partial(_begin_with, per_transaction))
    if engine.dialect.name == "sqlite":
        database = engine.url.database
        if database and database != ":memory:":
            _create_private(Path(database))
        event.listen(engine, "connect", functools.partial(_configure_sqlite, busy_ms=busy_ms))
    return engine


SQLITE_MAX_BUSY_MS = 2**31 - 1  # PRAGMA busy_timeout takes a C int of milliseconds


def sqlite_busy_timeout_ms(lock_timeout: float) -> int:
    """SQLite's busy timeout for a lock timeout of ``lock_timeout`` seconds (0: no limit)."""
    if lock_timeout <= 0:
        return SQLITE_MAX_BUSY_MS
    return max(1, min(round(lock_timeout * 1000), SQLITE_MAX_BUSY_MS))


def _timeout_options(statement_timeout: float, lock_timeout: float) -> str:
    """libpq ``options`` setting the session's timeouts in whole milliseconds (0: none)."""
    settings = {"statement_timeout": statement_timeout, "lock_timeout": lock_timeout}
    return " ".join(f"-c {k}={round(v * 1000)}" for k, v in settings.items() if v > 0)


def _set_local_timeouts(statement_timeout: float, lock_timeout: float) -> str:
    """One statement setting the transaction's timeouts in whole milliseconds (0: none, as
    :func:`_timeout_options`); empty when there is none to set."""
    settings = {"statement_timeout": statement_timeout, "lock_timeout": lock_timeout}
    calls = [f"set_config('{k}', '{round(v * 1000)}', true)" for k, v in settings.items() if v > 0]
    return f"SELECT {', '.join(calls)}" if calls else ""


def _begin_with(statement: str, connection: Connection) -> None:
    """The engine's ``begin`` event: run ``statement`` first in every transaction."""
    connection.exec_driver_sql(statement)


def _create_private(path: Path) -> None:
    """Create a new SQLite file 0600 (it holds token hashes); SQLite gives its -wal and -shm
    files the same mode. An existing file, or a missing directory, is left as it is."""
    with contextlib.suppress(FileExistsError, FileNotFoundError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


# Bytes the write-ahead log is cut back to after a checkpoint resets it. Without a limit it
# keeps the size of the largest burst between checkpoints for as long as the server runs (a
# deletion of two 330-frame runs left 36 MB), on top of the database.
WAL_SIZE_LIMIT = 16 << 20
_AUTO_VACUUM_INCREMENTAL = 2  # PRAGMA auto_vacuum's value for INCREMENTAL


def _configure_sqlite(dbapi_connection: Any, _record: Any, *, busy_ms: int) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={busy_ms}")  # first: switching to WAL may wait too
    # A new database (no table yet) keeps its free pages apart so that release_free_pages can
    # give them back; on an existing one this is a no-op until a VACUUM (`spectrawatch compact`).
    # Set only where it is not yet: setting it waits for the write lock, and a connection
    # opened while another process held that lock longer than the busy timeout (a migration
    # rebuilding tables) failed with "database is locked"
    if cursor.execute("PRAGMA auto_vacuum").fetchone()[0] != _AUTO_VACUUM_INCREMENTAL:
        cursor.execute("PRAGMA auto_vacuum=INCREMENTAL")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


_NO_OP_WRITE = text("UPDATE project SET name = name WHERE id IS NULL")  # matches no row


def sqlite_write_lock(session: Session) -> bool:
    """On SQLite, take the database's write lock now, until the commit (a write that changes
    nothing); False, doing nothing, on another database.

    SQLite's only lock is that one, taken by a transaction's first write, and the sqlite3
    driver runs the statements before it outside the transaction: a check read first could
    be stale when the write that relies on it commits (a deletion committed in between).
    Taken before the check, it holds the checked state until the commit, as a row lock does
    on PostgreSQL.
    """
    if session.get_bind().dialect.name != "sqlite":
        return False
    session.execute(_NO_OP_WRITE)
    return True


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


SQLITE_AUTO_VACUUM_INCREMENTAL = 2  # PRAGMA auto_vacuum's value for INCREMENTAL
FREE_PAGES_PER_STEP = 1024  # pages one incremental_vacuum moves (4 MiB at SQLite's 4 KiB)


def release_free_pages(engine: Engine) -> int:
    """Give the SQLite file's free pages (deleted runs' rows) back to the file system, and the
    number of pages given; 0 on PostgreSQL (autovacuum reuses the space) and on a database made
    before ``auto_vacuum=INCREMENTAL`` (``spectrawatch compact`` switches it).

    ``incremental_vacuum`` moves pages from the end of the file into the free ones and cuts
    the file: :data:`FREE_PAGES_PER_STEP` pages at a time, each step its own short write, so
    ingest waiting for the write lock gets it between steps. A step that cannot get the lock
    within the busy timeout ends the release (the pages stay free for the next deletion)."""
    if engine.dialect.name != "sqlite":
        return 0
    released = 0
    with engine.connect() as connection:
        if connection.exec_driver_sql("PRAGMA auto_vacuum").scalar() != (
            SQLITE_AUTO_VACUUM_INCREMENTAL
        ):
            return 0
        free = int(connection.exec_driver_sql("PRAGMA freelist_count").scalar() or 0)
        driver = connection.connection.driver_connection
        assert driver is not None  # an open connection's sqlite3.Connection
        while free > 0:
            try:
                # executescript: sqlite3_exec steps the pragma to its end; the driver's
                # execute() steps a statement without result columns once, one page a step
                driver.executescript(f"PRAGMA incremental_vacuum({FREE_PAGES_PER_STEP});")
                connection.commit()
            except (OperationalError, sqlite3.OperationalError):
                connection.rollback()
                break
            left = int(connection.exec_driver_sql("PRAGMA freelist_count").scalar() or 0)
            if left >= free:  # nothing moved: stop rather than spin
                break
            released += free - left
            free = left
    return released
