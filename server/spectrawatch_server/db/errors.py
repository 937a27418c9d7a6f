"""Which database errors are whose: a statement timed out or a lock wait ran out (one
statement's failure), versus a connection lost (the database's). Told by PostgreSQL's SQLSTATE
(``psycopg.Error.sqlstate``), not by class: psycopg raises all of them as ``OperationalError``,
and so does SQLAlchemy; SQLite's busy timeout running out (``database is locked``) by its
result code."""

from __future__ import annotations

QUERY_CANCELED = "57014"  # statement_timeout ran out (or pg_cancel_backend)
LOCK_NOT_AVAILABLE = "55P03"  # lock_timeout ran out (or NOWAIT)
STATEMENT_TIMEOUTS = frozenset({QUERY_CANCELED, LOCK_NOT_AVAILABLE})


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of the first PostgreSQL error in ``exc``, its ``orig`` (SQLAlchemy's
    wrapped DBAPI error) or its chain of explicit causes; None when none carries one (a
    connection refused or cut has none)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = getattr(current, "sqlstate", None)
        if isinstance(code, str):
            return code
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__
    return None


SQLITE_BUSY = 5  # another connection holds the lock; the busy timeout ran out
SQLITE_LOCKED = 6  # a table lock within this process's shared cache
_SQLITE_BUSY_MESSAGES = ("database is locked", "database table is locked")


def sqlite_busy(exc: BaseException) -> bool:
    """Whether ``exc`` (or the DBAPI error it wraps, or its chain of explicit causes) is SQLite's
    ``SQLITE_BUSY`` / ``SQLITE_LOCKED``: a lock wait ran past the busy timeout. Told by the
    primary result code (``sqlite3.Error.sqlite_errorcode``, Python 3.11+), else the message."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = getattr(current, "sqlite_errorcode", None)
        if isinstance(code, int):
            return (code & 0xFF) in (SQLITE_BUSY, SQLITE_LOCKED)
        if type(current).__module__ == "sqlite3" and str(current).startswith(_SQLITE_BUSY_MESSAGES):
            return True
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__
    return False


def timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` is a statement or lock timeout (PostgreSQL), or SQLite's busy timeout:
    this statement waited or ran too long, the connection and the database are fine."""
    return sqlstate(exc) in STATEMENT_TIMEOUTS or sqlite_busy(exc)


def connection_lost(code: str) -> bool:
    """Whether SQLSTATE ``code`` says the connection or the server is gone or refusing
    (class 08 connection exceptions; 57P01-57P04: shut down, crashed, starting up, database
    dropped; class 53: too many connections, out of memory or disk), rather than that one
    statement failed (a timeout, a deadlock, a serialisation failure, bad SQL)."""
    return code.startswith(("08", "53", "57P"))
