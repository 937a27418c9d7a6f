"""The job-queue interface shared by the embedded queue and the scale-out engine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from sqlalchemy.orm import Session

JobHandler = Callable[[int], None]
"""Processes the analysis job of one frame id; raises on failure (the queue retries)."""


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
