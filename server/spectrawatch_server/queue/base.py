"""The job-queue interface shared by the embedded queue and the scale-out engine."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Protocol

from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from spectrawatch_server.db.errors import connection_lost, sqlite_busy, sqlstate

JobHandler = Callable[[int], None]
"""Processes the analysis job of one frame id; raises on failure (the queue retries)."""


def database_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database could not be used (stopped, restarting, unreachable, a
    dropped connection, no pooled connection free), rather than that the job itself failed.

    Both queues give such an attempt back: retried for as long as the outage lasts, the job
    never runs out of attempts because of it. Explicit causes (``raise ... from``) are followed,
    so a wrapper (procrastinate's ``ConnectorException``) is classified by what it wraps.

    An error PostgreSQL answered with a SQLSTATE other than a lost or refused connection
    (:func:`~spectrawatch_server.db.errors.connection_lost`) is the job's own, although psycopg
    and SQLAlchemy raise it as ``OperationalError`` too: a statement or lock timeout, a
    deadlock, a serialisation failure. It would repeat on every retry (one job's query too slow
    for the statement timeout), so it uses an attempt like any analysis error instead of being
    retried for ever. So is SQLite's ``database is locked`` (the busy timeout ran out: a lock
    wait, like PostgreSQL's lock timeout).
    """
    code = sqlstate(exc)
    if (code is not None and not connection_lost(code)) or sqlite_busy(exc):
        return False
    psycopg = sys.modules.get("psycopg")  # optional (scale extra); not imported: none raised
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (sa_exc.OperationalError, sa_exc.TimeoutError)):
            return True  # connection refused or lost, server shutting down; pool timeout
        if isinstance(current, sa_exc.DBAPIError) and current.connection_invalidated:
            return True
        if psycopg is not None and isinstance(current, psycopg.OperationalError):
            return True  # psycopg_pool.PoolTimeout is one too
        current = current.__cause__
    return False


class JobQueue(Protocol):
    def enqueue(self, session: Session, frame_id: int) -> None:
        """Add the analysis job of ``frame_id`` inside the caller's open transaction."""
        ...

    def forget_run(self, session: Session, run_id: int) -> int:
        """Drop the waiting jobs of a run being deleted, in the caller's transaction; how many."""
        ...

    def requeue(self, session: Session, frame_ids: Sequence[int]) -> None:
        """Add the analysis jobs of frames analysed before, in the caller's transaction, to run
        in the order given (a re-analysis: seq order)."""
        ...

    def backlog(self, session: Session, run_id: int) -> int:
        """The run's analysis jobs waiting or running."""
        ...

    def notify(self) -> None:
        """Hint that new jobs were committed (wakes an idle embedded worker)."""
        ...

    def start(self) -> None: ...

    def stop(self, timeout: float = 10.0) -> None: ...

    def counts(self) -> dict[str, int]:
        """Jobs by status, for health and the API."""
        ...
