"""The job-queue interface shared by the embedded queue and the scale-out engine."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Protocol

from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

JobHandler = Callable[[int], None]
"""Processes the analysis job of one frame id; raises on failure (the queue retries)."""


def database_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database could not be used (stopped, restarting, unreachable, a
    dropped connection, no pooled connection free), rather than that the job itself failed.

    Both queues give such an attempt back: retried for as long as the outage lasts, the job
    never runs out of attempts because of it. Explicit causes (``raise ... from``) are followed,
    so a wrapper (procrastinate's ``ConnectorException``) is classified by what it wraps.
    """
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

    def notify(self) -> None:
        """Hint that new jobs were committed (wakes an idle embedded worker)."""
        ...

    def start(self) -> None: ...

    def stop(self, timeout: float = 10.0) -> None: ...

    def counts(self) -> dict[str, int]:
        """Jobs by status, for health and the API."""
        ...
