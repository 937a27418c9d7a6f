"""Embedded queue: jobs in the ``job`` table, consumed by one in-process worker thread.

Restart-safe: on start, jobs left 'running' by a previous process are returned to 'pending'
(the embedded mode is one process by definition); leases also expire, so a hung job is
retried. A job whose analysis raised waits ``backoff_seconds ** attempts`` seconds before its
next attempt (2, 4, 8, ... s by default: procrastinate's schedule), so a transient error (a blob
store briefly away) does not use up every attempt at once; jobs that fail ``max_attempts`` times
end as 'failed' with their error.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from spectrawatch_server.db.base import utcnow
from spectrawatch_server.db.models import Job
from spectrawatch_server.queue.base import JobHandler, database_unavailable
from spectrawatch_server.storage import job_store

log = logging.getLogger(__name__)


class EmbeddedQueue:
    """DB-table queue with leases; ``start()`` runs ``handler`` on a daemon thread.

    ``sessions``: the API's (job counts for /health, the start-up release);
    ``worker_sessions`` (default: the same): the worker thread's claims and releases, on an
    engine with the worker's timeouts.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        handler: JobHandler,
        *,
        worker_sessions: sessionmaker[Session] | None = None,
        lease_seconds: float = 120.0,
        max_attempts: int = 5,
        poll_seconds: float = 0.5,
        backoff_seconds: float = 0.0,
    ) -> None:
        self.sessions = sessions
        self.worker_sessions = worker_sessions or sessions
        self.handler = handler
        self.lease = timedelta(seconds=lease_seconds)
        self.max_attempts = max_attempts
        self.poll_seconds = poll_seconds
        self.backoff_seconds = backoff_seconds
        self.worker_id = f"embedded-{uuid.uuid4().hex[:12]}"
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.processed = 0
        self._release_later: list[int] = []

    def enqueue(self, session: Session, frame_id: int) -> None:
        session.add(Job(frame_id=frame_id, status="pending"))

    def forget_run(self, session: Session, run_id: int) -> int:
        """Nothing to do: a run's jobs are deleted with its frames (foreign-key cascade)."""
        return 0

    def requeue(self, session: Session, frame_ids: Sequence[int]) -> None:
        """New jobs for the frames, in the order given (a claim takes a run's jobs by id); their
        finished jobs go (one job row per frame)."""
        job_store.requeue_jobs(session, frame_ids)

    def backlog(self, session: Session, run_id: int) -> int:
        return job_store.run_backlog(session, run_id)

    def notify(self) -> None:
        self._wake.set()

    def counts(self) -> dict[str, int]:
        with self.sessions() as session:
            return job_store.job_counts(session)

    def start(self) -> None:
        with self.sessions.begin() as session:
            released = job_store.release_jobs_of_other_workers(session, self.worker_id)
            # every job out of attempts, pending ones too (released above, or a lower
            # max_attempts); from now on only a lapsed lease can make one (run_once)
            job_store.fail_expired_jobs(session, self.max_attempts)
        if released:
            log.info("requeued %d job(s) left running by a previous process", released)
        self._thread = threading.Thread(target=self._loop, name="spectrawatch-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def run_once(self) -> bool:
        """Claim and run one job; False when there was nothing to do."""
        with self.worker_sessions.begin() as session:
            for job_id in self._release_later:  # jobs interrupted by a database outage
                job_store.release_job(session, job_id, "database unavailable", refund_attempt=True)
            self._release_later.clear()
            job_store.fail_expired_jobs(session, self.max_attempts, pending=False)
            job = job_store.claim_job(session, self.worker_id, self.lease, self.max_attempts)
        if job is None:
            return False
        try:
            self.handler(job.frame_id)
        except Exception as exc:  # a failing job must never kill the worker thread
            if database_unavailable(exc):
                # The database went away mid-job: not the job's fault. Release it (refunding
                # the attempt) as soon as the database answers again, not after the lease.
                self._release_later.append(job.job_id)
                raise
            log.exception("analysis of frame %d failed (attempt %d)", job.frame_id, job.attempts)
            with self.worker_sessions.begin() as session:
                if job.attempts >= self.max_attempts:
                    job_store.finish_frame(session, job.frame_id, "failed", repr(exc))
                else:
                    wait = timedelta(seconds=self.backoff_seconds**job.attempts)
                    job_store.release_job(
                        session, job.job_id, repr(exc), not_before=utcnow() + wait
                    )
        self.processed += 1
        return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.run_once()
            except Exception as exc:
                if database_unavailable(exc):
                    log.warning("database unavailable; worker retrying", exc_info=True)
                else:
                    log.exception("worker loop error")
                busy = False
            if not busy:
                self._wake.wait(self.poll_seconds)
                self._wake.clear()
