"""The embedded queue's job rows: claim with a lease, finish, release, count.

Callers own the transaction, as in :mod:`~spectrawatch_server.storage.repository`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, insert, or_, select, update
from sqlalchemy.orm import Session

from spectrawatch_server.db.base import utcnow
from spectrawatch_server.db.models import Frame, Job
from spectrawatch_server.storage.repository import greatest


@dataclass(frozen=True)
class ClaimedJob:
    job_id: int
    frame_id: int
    attempts: int


def claim_job(
    session: Session, worker_id: str, lease: timedelta, max_attempts: int
) -> ClaimedJob | None:
    """Lease the oldest runnable job: pending, or running with an expired lease.

    The conditional UPDATE makes the claim safe against other workers on any backend. The
    candidates are read as two ranges of ``ix_job_status_id`` (status, id), the first pending
    jobs and the first running ones, each in id order: one query with ``OR`` between the
    statuses walked the primary key past every finished job (they are kept) and filtered, so a
    claim cost grew with the job table (17 ms on SQLite after 100,000 jobs). A job whose run
    has an older job still to run (backing off after a failure, or running) waits for it
    (:func:`waits_for_earlier`), as the procrastinate queue's run lock makes its jobs wait.
    """
    now = utcnow()
    # a pending job's lease_until is its not-before time (a retry's backoff), if it has one
    waited = or_(Job.lease_until.is_(None), Job.lease_until <= now)
    pending = (Job.status == "pending") & waited
    expired = (Job.status == "running") & (Job.lease_until < now)
    runnable = or_(pending, expired)
    waiting: set[int] = set()  # runs whose older job is still to run: none of theirs now
    while True:
        candidates = _candidates(session, (pending, expired), max_attempts, waiting)
        if not candidates:
            return None
        newly_waiting = False
        for job_id, run_id in candidates:
            if run_id in waiting:
                continue
            if waits_for_earlier(session, job_id):
                waiting.add(run_id)
                newly_waiting = True
                continue
            claimed = session.execute(
                update(Job)
                .where(Job.id == job_id, runnable)
                .values(
                    status="running",
                    worker_id=worker_id,
                    lease_until=now + lease,
                    attempts=Job.attempts + 1,
                )
            )
            if claimed.rowcount == 1:  # type: ignore[attr-defined]
                job = session.get_one(Job, job_id)
                session.refresh(job)
                return ClaimedJob(job.id, job.frame_id, job.attempts)
        if not newly_waiting:  # every candidate was claimed by another worker meanwhile
            return None


def _candidates(
    session: Session, ranges: tuple[Any, ...], max_attempts: int, skip_runs: set[int]
) -> list[tuple[int, int]]:
    """``(job id, run id)`` of the first 8 runnable jobs in id order, leaving out the jobs of
    ``skip_runs`` (runs waiting for an older job: 8 of one such run in a row stalled every
    other run until its backoff ended)."""
    found: list[tuple[int, int]] = []
    for where in ranges:
        stmt = (
            select(Job.id, Frame.run_id)
            .join(Frame, Frame.id == Job.frame_id)
            .where(where, Job.attempts < max_attempts)
        )
        if skip_runs:
            stmt = stmt.where(Frame.run_id.not_in(skip_runs))
        found += [(int(j), int(r)) for j, r in session.execute(stmt.order_by(Job.id).limit(8))]
    return sorted(found)[:8]


def waits_for_earlier(session: Session, job_id: int) -> bool:
    """Whether an older job of ``job_id``'s run is still to run: backing off after a failure
    (pending, not yet due) or running. Analyses read their run's earlier results (SED windows,
    EigenTrack's change score, the alert episodes), so a run's frames are analysed in order: a
    retry's backoff let every later frame of the run go first. Two short index ranges: pending
    jobs older than a claimable one are only those backing off, and running ones are few."""
    run_of = select(Frame.run_id).where(Frame.id == Job.frame_id).scalar_subquery()
    this_run = (
        select(Frame.run_id)
        .join(Job, Job.frame_id == Frame.id)
        .where(Job.id == job_id)
        .scalar_subquery()
    )
    earlier = (
        select(Job.id)
        .where(Job.status.in_(("pending", "running")), Job.id < job_id, run_of == this_run)
        .limit(1)
    )
    return session.scalar(earlier) is not None


def fail_expired_jobs(session: Session, max_attempts: int, *, pending: bool = True) -> int:
    """Mark jobs that used up their attempts (and are not running) as failed, and their frames
    too, as :func:`finish_frame` does (the reason stays in the job's ``error``).

    ``pending=False``: running jobs whose lease ran out only (one index range of the few
    running jobs): while a queue runs, only a lease running out after the last attempt leaves a
    job out of attempts; pending ones are made at start-up (jobs of a crashed process released,
    a lower ``max_attempts``), and reading every pending job on each claim made a claim's cost
    grow with the backlog."""
    now = utcnow()
    lapsed = (Job.status == "running") & (Job.lease_until < now)
    expired = (
        Job.attempts >= max_attempts,
        or_(Job.status == "pending", lapsed) if pending else lapsed,
    )
    frame_ids = session.scalars(select(Job.frame_id).where(*expired)).all()
    if not frame_ids:
        return 0
    result = session.execute(
        update(Job)
        .where(Job.frame_id.in_(frame_ids), *expired)
        .values(
            status="failed",
            error=func.coalesce(Job.error, "gave up after max attempts"),
            finished_at=now,
            lease_until=None,
        )
    )
    reason = select(Job.error).where(Job.frame_id == Frame.id).scalar_subquery()
    session.execute(
        update(Frame).where(Frame.id.in_(frame_ids)).values(status="failed", error=reason)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def release_jobs_of_other_workers(session: Session, worker_id: str) -> int:
    """Return 'running' jobs not owned by ``worker_id`` to 'pending' (single-process restart)."""
    result = session.execute(
        update(Job)
        .where(Job.status == "running", or_(Job.worker_id.is_(None), Job.worker_id != worker_id))
        .values(status="pending", worker_id=None, lease_until=None)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


FRAME_ERROR_MAX = 2000  # characters of a failed analysis' reason kept on its frame


def finish_frame(session: Session, frame_id: int, status: str, error: str | None) -> None:
    """Mark a frame's analysis (and its embedded-queue job, if any) done or failed, with the
    reason (None when done)."""
    session.execute(
        update(Job)
        .where(Job.frame_id == frame_id)
        .values(status=status, error=error, finished_at=utcnow(), lease_until=None)
    )
    reason = None if error is None else error[:FRAME_ERROR_MAX]
    session.execute(update(Frame).where(Frame.id == frame_id).values(status=status, error=reason))


def release_job(
    session: Session,
    job_id: int,
    error: str,
    refund_attempt: bool = False,
    not_before: datetime | None = None,
) -> None:
    """Put a job back for a retry, at once or from ``not_before`` on (kept in ``lease_until``);
    ``refund_attempt`` when the failure was not the job's."""
    values: dict[str, Any] = {"status": "pending", "error": error, "lease_until": not_before}
    if refund_attempt:
        values["attempts"] = greatest(session, Job.attempts - 1, 0)
    session.execute(update(Job).where(Job.id == job_id, Job.status == "running").values(**values))


RECENT_JOBS = 1000
"""How many of the latest jobs ``failed_recent`` looks at (health: a bounded count)."""


def job_counts(session: Session) -> dict[str, int]:
    """``pending`` and ``running`` jobs, and ``failed_recent``: failed among the latest
    :data:`RECENT_JOBS`. Finished jobs are never counted in full (their number grows with every
    frame ever ingested): each count reads a range of ``ix_job_status_id`` or the newest ids."""
    rows = session.execute(
        select(Job.status, func.count())
        .where(Job.status.in_(("pending", "running")))
        .group_by(Job.status)
    ).all()
    counts = {"pending": 0, "running": 0} | {status: int(n) for status, n in rows}
    recent = select(Job.status).order_by(Job.id.desc()).limit(RECENT_JOBS).subquery()
    failed = session.scalar(select(func.count()).where(recent.c.status == "failed"))
    return counts | {"failed_recent": int(failed or 0)}


REQUEUE_CHUNK = 500  # frame ids of one statement


def requeue_jobs(session: Session, frame_ids: Sequence[int]) -> None:
    """Replace the job rows of ``frame_ids`` by pending ones whose ids follow the order given
    (claims take a run's jobs in id order; a job row is unique per frame)."""
    for start in range(0, len(frame_ids), REQUEUE_CHUNK):
        chunk = list(frame_ids[start : start + REQUEUE_CHUNK])
        session.execute(
            delete(Job).where(Job.frame_id.in_(chunk)),
            execution_options={"synchronize_session": False},
        )
        # one executemany: rows inserted one after another, ids ascending in the given order
        session.execute(
            insert(Job), [{"frame_id": f, "status": "pending", "attempts": 0} for f in chunk]
        )


def run_backlog(session: Session, run_id: int) -> int:
    """The run's jobs pending or running (``ix_job_status_id``'s two short ranges)."""
    waiting = (
        select(func.count())
        .select_from(Job)
        .join(Frame, Frame.id == Job.frame_id)
        .where(Job.status.in_(("pending", "running")), Frame.run_id == run_id)
    )
    return int(session.scalar(waiting) or 0)


def job_for_frame(session: Session, frame_id: int) -> Job | None:
    return session.scalar(select(Job).where(Job.frame_id == frame_id))
