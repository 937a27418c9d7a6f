"""All SQL of the server lives here: small functions over a caller-owned ``Session``.

Callers own the transaction (``with session.begin():``); functions here never commit, so
several of them compose into one atomic unit (frame row + job row, results + job done).
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Table,
    bindparam,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from spectrawatch_server.db.base import utcnow
from spectrawatch_server.db.models import (
    Alert,
    AlertRule,
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
from spectrawatch_server.db.session import sqlite_write_lock
from spectrawatch_server.storage import alert_store

TOKEN_PREFIX = "sw_"
DELETED = "deleted"  # status of a deleted run's tombstone row (see delete_run)


# --- projects and tokens ---------------------------------------------------------------


DELETED_PROJECT_PREFIX = "deleted/"  # a deleted project's tombstone name (see delete_project)


def get_project(session: Session, name: str) -> Project | None:
    """The live project called ``name`` (a deleted one's tombstone is never found by name)."""
    if name.startswith(DELETED_PROJECT_PREFIX):
        return None
    return session.scalar(select(Project).where(Project.name == name))


def get_or_create_project(session: Session, name: str) -> tuple[Project, bool]:
    """The project called ``name``, created if missing; second value says whether it was."""
    project = get_project(session, name)
    if project is not None:
        return project, False
    project = Project(name=name)
    session.add(project)
    session.flush()
    return project, True


def list_projects(session: Session, project_id: int | None = None) -> Sequence[Project]:
    stmt = select(Project).where(~Project.name.startswith(DELETED_PROJECT_PREFIX))
    stmt = stmt.order_by(Project.name)
    if project_id is not None:
        stmt = stmt.where(Project.id == project_id)
    return session.scalars(stmt).all()


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(
    session: Session, project: Project | None, name: str = "", role: str = "write"
) -> tuple[Token, str]:
    """Create a token for ``project`` (None: every project, a server-wide token) with ``role``
    (``read``/``write``/``admin``); returns the row and the secret (shown once, never
    stored)."""
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = Token(
        project_id=None if project is None else project.id,
        name=name,
        prefix=secret[:10],
        secret_hash=hash_secret(secret),
        role=role,
    )
    session.add(token)
    session.flush()
    return token, secret


def revoke_token(session: Session, token_id: int) -> bool:
    """Revoke a token; False when no live token has that id."""
    result = session.execute(
        update(Token)
        .where(Token.id == token_id, Token.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    return int(result.rowcount) == 1  # type: ignore[attr-defined]


def list_tokens(session: Session) -> Sequence[tuple[Token, str | None]]:
    """Every token with its project name, None for a server-wide one (secrets are never
    stored, only prefixes)."""
    rows = session.execute(
        select(Token, Project.name)
        .outerjoin(Project, Project.id == Token.project_id)
        .order_by(Token.id)
    ).all()
    return [(t, n) for t, n in rows]


def find_token(session: Session, secret: str) -> Token | None:
    """The live token whose secret hashes to the stored hash, if any."""
    return session.scalar(
        select(Token).where(Token.secret_hash == hash_secret(secret), Token.revoked_at.is_(None))
    )


# --- runs ------------------------------------------------------------------------------


def get_run(session: Session, run_id: int) -> Run | None:
    """The run, or None if it does not exist or was deleted."""
    run = session.get(Run, run_id)
    return None if run is None or run.status == DELETED else run


def get_run_by_name(session: Session, project_id: int, name: str) -> Run | None:
    return session.scalar(select(Run).where(Run.project_id == project_id, Run.name == name))


def get_or_create_run(
    session: Session,
    project: Project,
    name: str,
    config: dict[str, Any],
    tags: list[str],
) -> tuple[Run, bool]:
    """Create run ``name`` in ``project`` or return the existing one (a resumed run)."""
    run = get_run_by_name(session, project.id, name)
    if run is not None:
        return run, False
    run = Run(project_id=project.id, name=name, config=config, tags=tags, status="running")
    session.add(run)
    session.flush()
    return run, True


def list_runs(session: Session, project_id: int | None, limit: int, offset: int) -> Sequence[Run]:
    stmt = select(Run).where(Run.status != DELETED).order_by(Run.id.desc())
    stmt = stmt.limit(limit).offset(offset)
    if project_id is not None:
        stmt = stmt.where(Run.project_id == project_id)
    return session.scalars(stmt).all()


@dataclass(frozen=True)
class DeletedRun:
    """What :func:`delete_run` removed; the caller deletes ``blob_keys`` after the commit."""

    frames: int
    bytes: int
    blob_keys: list[str]


def delete_run(session: Session, run: Run) -> DeletedRun | None:
    """Delete everything stored for ``run``; its row stays as a tombstone (None: it already
    is one, deleted by a concurrent request).

    Frames (and by cascade their jobs, metrics and spectra), metrics and spectra, scalars and
    alerts are deleted; the row keeps its id (so an id is never handed out again, which SQLite
    would otherwise do for the highest one, and a late client of the run gets 404, not another
    run) with status ``deleted``, a name no client can choose (``deleted/<id>``: names cannot
    hold ``/``) and no config, tags or summary. Webhook deliveries stay, unlinked from their
    alerts. The row is updated first, so a concurrent ingest that locks it (:func:`live_runs`)
    either commits before and is deleted too, or sees the tombstone; the project's endpoints
    next, before the deliveries are unlinked.
    """
    result = session.execute(
        update(Run)
        .where(Run.id == run.id, Run.status != DELETED)
        .values(
            status=DELETED,
            name=f"deleted/{run.id}",
            config={},
            tags=[],
            summary={},
            client_stats={},
        )
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        return None  # deleted meanwhile by a concurrent request
    # the alerts' deletion unlinks their deliveries: the endpoints first (see lock_webhooks)
    alert_store.lock_webhooks(session, project_id=run.project_id)
    rows = session.execute(select(Frame.blob_key, Frame.bytes).where(Frame.run_id == run.id)).all()
    for model in (Frame, Metric, MetricSeries, Spectrum, Scalar, Alert):
        session.execute(delete(model).where(model.run_id == run.id))
    keys = [k for k, _ in rows if k]  # imported metric batches have no blob
    return DeletedRun(len(rows), sum(int(b) for _, b in rows), keys)


@dataclass(frozen=True)
class DeletedProject:
    """What :func:`delete_project` removed; the caller deletes ``blob_keys`` after the commit
    and forgets ``run_ids`` (jobs, cached ingest authorisation)."""

    run_ids: list[int]
    frames: int
    bytes: int
    blob_keys: list[str]
    tokens_revoked: int
    alert_rules: int
    webhooks: int
    deliveries_dropped: int


def delete_project(session: Session, project: Project) -> DeletedProject | None:
    """Delete everything stored for ``project``; its row stays as a tombstone (None: it
    already is one, deleted by a concurrent request).

    The row is renamed (``deleted/<id>``: no client can choose a name with ``/``), so the name
    is free at once for a new project, and on PostgreSQL it stays locked until the commit.
    Each run is deleted as :func:`delete_run` does (a tombstone: a client still streaming to it
    gets 404 ``run_deleted`` and stops, never recreates it); its tokens are revoked (kept,
    listed by ``spectrawatch token list`` under the tombstone name); its alert rules, webhooks
    and their deliveries (pending ones too: nothing is sent for a deleted project) are deleted.

    Lock order (PostgreSQL): the project's runs (:func:`live_runs`), then its row, then its
    endpoints (:func:`~spectrawatch_server.storage.alert_store.lock_webhooks`), then the rest.
    The worker's results transaction locks its run, then the project's row (the alert
    engine's rule lock), and a sender disabling an endpoint locks it before its deliveries:
    the project's row first, or a delivery (an alert's, unlinked) before its endpoint,
    deadlocked with them.
    """
    listed = select(Run.id).where(Run.project_id == project.id, Run.status != DELETED)
    live_runs(session, session.scalars(listed))
    result = session.execute(
        update(Project)
        .where(Project.id == project.id, ~Project.name.startswith(DELETED_PROJECT_PREFIX))
        .values(name=f"{DELETED_PROJECT_PREFIX}{project.id}")
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        return None
    alert_store.lock_webhooks(session, project_id=project.id)  # before the runs' deliveries
    run_ids = list(session.scalars(listed.order_by(Run.id)))
    frames, size, keys = 0, 0, []
    for run_id in run_ids:
        deleted = delete_run(session, session.get_one(Run, run_id))
        if deleted is not None:
            frames, size = frames + deleted.frames, size + deleted.bytes
            keys.extend(deleted.blob_keys)
    tokens = session.execute(
        update(Token)
        .where(Token.project_id == project.id, Token.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    hooks = select(Webhook.id).where(Webhook.project_id == project.id).scalar_subquery()
    deliveries = select(Delivery.id).where(Delivery.webhook_id.in_(hooks)).scalar_subquery()
    session.execute(delete(DeliveryAttempt).where(DeliveryAttempt.delivery_id.in_(deliveries)))
    dropped = session.execute(
        delete(Delivery).where(Delivery.webhook_id.in_(hooks), Delivery.status == "pending")
    )
    session.execute(delete(Delivery).where(Delivery.webhook_id.in_(hooks)))
    webhooks = session.execute(delete(Webhook).where(Webhook.project_id == project.id))
    rules = session.execute(delete(AlertRule).where(AlertRule.project_id == project.id))
    return DeletedProject(
        run_ids=run_ids,
        frames=frames,
        bytes=size,
        blob_keys=keys,
        tokens_revoked=int(tokens.rowcount),  # type: ignore[attr-defined]
        alert_rules=int(rules.rowcount),  # type: ignore[attr-defined]
        webhooks=int(webhooks.rowcount),  # type: ignore[attr-defined]
        deliveries_dropped=int(dropped.rowcount),  # type: ignore[attr-defined]
    )


def stale_runs(
    session: Session,
    before: datetime,
    statuses: Iterable[str],
    project_id: int | None = None,
    limit: int = 1000,
) -> tuple[int, Sequence[Run]]:
    """Runs of ``statuses`` whose last activity (``updated_at``; ``last_seen_at`` when later)
    is before ``before``, optionally of one project: how many in all, and the oldest ``limit``
    of them (what a retention deletes)."""
    where = [
        Run.status.in_([s for s in statuses if s != DELETED]),
        Run.updated_at < before,
        or_(Run.last_seen_at.is_(None), Run.last_seen_at < before),
    ]
    if project_id is not None:
        where.append(Run.project_id == project_id)
    matched = int(session.scalar(select(func.count()).select_from(Run).where(*where)) or 0)
    runs = session.scalars(
        select(Run).where(*where).order_by(Run.updated_at, Run.id).limit(limit)
    ).all()
    return matched, runs


def project_names(session: Session, project_ids: Iterable[int]) -> dict[int, str]:
    """``{id: name}`` of the projects ``project_ids`` (those that exist), read by key only."""
    wanted = sorted(set(project_ids))
    if not wanted:
        return {}
    rows = session.execute(select(Project.id, Project.name).where(Project.id.in_(wanted)))
    return {int(row.id): str(row.name) for row in rows}


def is_stale(run: Run, before: datetime, statuses: Iterable[str]) -> bool:
    """Whether ``run`` still matches :func:`stale_runs` (re-checked under its lock)."""
    return (
        run.status in statuses
        and run.status != DELETED
        and run.updated_at < before
        and (run.last_seen_at is None or run.last_seen_at < before)
    )


def frame_totals(session: Session, run_ids: Sequence[int]) -> tuple[int, int]:
    """How many frames the runs hold and their stored bytes (what deleting them frees)."""
    frames, size = 0, 0
    for start in range(0, len(run_ids), 500):
        chunk = run_ids[start : start + 500]
        n, b = session.execute(
            select(func.count(), func.coalesce(func.sum(Frame.bytes), 0)).where(
                Frame.run_id.in_(chunk)
            )
        ).one()
        frames, size = frames + int(n), size + int(b)
    return frames, size


PRUNABLE_RUN_STATUSES = ("finished", "crashed")


@dataclass(frozen=True)
class PrunedBlobs:
    """What :func:`prune_blobs` released; the caller deletes ``blob_keys`` after the commit."""

    frames: int
    bytes: int
    blob_keys: list[str]


def prune_blobs(
    session: Session,
    before: datetime,
    *,
    project_id: int | None = None,
    run_id: int | None = None,
    dry_run: bool = False,
) -> PrunedBlobs:
    """Release the blobs of analysed frames (done or failed) stored before ``before``, of runs
    that ended (finished or crashed), optionally of one project or run.

    The frame rows and everything computed from them (metrics, spectra, alerts) stay; a pruned
    frame is blob-less (``blob_key`` empty, as an imported metric batch), so analyses no longer
    read it. Running runs keep their blobs: SED windows and subspace drift read recent frames.
    """
    stmt = (
        select(Frame.id, Frame.blob_key, Frame.bytes)
        .join(Run, Run.id == Frame.run_id)
        .where(
            Frame.blob_key != "",
            Frame.status.in_(("done", "failed")),
            Frame.created_at < before,
            Run.status.in_(PRUNABLE_RUN_STATUSES),
        )
        .order_by(Frame.id)
    )
    if project_id is not None:
        stmt = stmt.where(Run.project_id == project_id)
    if run_id is not None:
        stmt = stmt.where(Frame.run_id == run_id)
    rows = session.execute(stmt).all()
    if not dry_run:
        ids = [r.id for r in rows]
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            session.execute(update(Frame).where(Frame.id.in_(chunk)).values(blob_key=""))
    return PrunedBlobs(len(rows), sum(int(r.bytes) for r in rows), [r.blob_key for r in rows])


def live_runs(session: Session, run_ids: Iterable[int]) -> set[int]:
    """The runs of ``run_ids`` that exist and are not deleted, locked until the commit: a
    deletion waits for the caller's writes (and deletes them too) or made the run a tombstone
    before this check.

    On SQLite the lock is the database's write lock (:func:`sqlite_write_lock`): else a
    deletion could commit between this check and the caller's writes (a frame stored under a
    tombstone, a tombstone revived by a status, results for a deleted frame).

    On PostgreSQL it is ``FOR NO KEY UPDATE``: the one the writes' own ``UPDATE run`` (last step,
    status, client stats) takes, so two writes to one run queue instead of deadlocking (a share
    lock then an update would deadlock), frames' foreign-key checks (``KEY SHARE``) are not
    blocked, and a deletion (an ``UPDATE``) waits for the writes that checked. Rows are locked
    in id order, so batches naming several runs cannot deadlock either.
    """
    stmt = select(Run.id).where(Run.id.in_(set(run_ids)), Run.status != DELETED)
    if not sqlite_write_lock(session) and session.get_bind().dialect.name == "postgresql":
        stmt = stmt.order_by(Run.id).with_for_update(key_share=True)
    return set(session.scalars(stmt).all())


def touch_run(session: Session, run_id: int, step: int | None) -> None:
    """Record activity (and the highest step seen) on a run."""
    values: dict[str, Any] = {"last_seen_at": utcnow()}
    if step is not None:
        values["last_step"] = _greatest(session, func.coalesce(Run.last_step, step), step)
    session.execute(update(Run).where(Run.id == run_id).values(**values))


# --- frames and jobs -------------------------------------------------------------------


def frame_by_key(session: Session, key: str) -> Frame | None:
    return session.scalar(select(Frame).where(Frame.idempotency_key == key))


def insert_frame(session: Session, frame: Frame) -> Frame:
    """Insert ``frame`` (the caller enqueues its job in the same transaction)."""
    insert_frames(session, [frame])
    return frame


def insert_frames(session: Session, frames: Sequence[Frame]) -> None:
    """Insert ``frames`` in one flush (ids assigned) and touch each run once with its top step."""
    session.add_all(frames)
    session.flush()
    top: dict[int, int] = {}
    for frame in frames:
        top[frame.run_id] = max(frame.step, top.get(frame.run_id, frame.step))
    # one executemany on the connection (compiled once) instead of an ORM statement per run
    step = bindparam("top_step", type_=BigInteger)
    stmt = (
        update(Run)
        .where(Run.id == bindparam("run_id", type_=BigInteger))
        .values(
            last_seen_at=utcnow(),
            last_step=_greatest(session, func.coalesce(Run.last_step, step), step),
        )
    )
    session.connection().execute(stmt, [{"run_id": r, "top_step": s} for r, s in top.items()])


def list_frames(
    session: Session,
    run_id: int,
    kind: str | None,
    limit: int,
    offset: int,
    status: str | None = None,
) -> Sequence[Frame]:
    stmt = (
        select(Frame).where(Frame.run_id == run_id).order_by(Frame.seq).limit(limit).offset(offset)
    )
    if kind is not None:
        stmt = stmt.where(Frame.kind == kind)
    if status is not None:
        stmt = stmt.where(Frame.status == status)
    return session.scalars(stmt).all()


def recent_frames(
    session: Session, run_id: int, kind: str, before_seq: int, limit: int
) -> list[Frame]:
    """Up to ``limit`` frames of ``kind`` with seq < ``before_seq``, oldest first; only frames
    with a blob (never imported metric batches, whatever their kind)."""
    rows = session.scalars(
        select(Frame)
        .where(
            Frame.run_id == run_id,
            Frame.kind == kind,
            Frame.seq < before_seq,
            Frame.blob_key != "",
        )
        .order_by(Frame.seq.desc())
        .limit(limit)
    ).all()
    return list(reversed(rows))


def referenced_blob_keys(session: Session) -> set[str]:
    return set(session.scalars(select(Frame.blob_key)).all())


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
    claim cost grew with the job table (17 ms on SQLite after 100,000 jobs).
    """
    now = utcnow()
    # a pending job's lease_until is its not-before time (a retry's backoff), if it has one
    waited = or_(Job.lease_until.is_(None), Job.lease_until <= now)
    pending = (Job.status == "pending") & waited
    expired = (Job.status == "running") & (Job.lease_until < now)
    runnable = or_(pending, expired)
    candidates = sorted(
        job_id
        for where in (pending, expired)
        for job_id in session.scalars(
            select(Job.id).where(where, Job.attempts < max_attempts).order_by(Job.id).limit(8)
        )
    )[:8]
    for job_id in candidates:
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
    return None


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
        values["attempts"] = _greatest(session, Job.attempts - 1, 0)
    session.execute(update(Job).where(Job.id == job_id, Job.status == "running").values(**values))


def _greatest(session: Session, *values: Any) -> Any:
    """The larger of scalar SQL values: GREATEST on PostgreSQL, multi-argument max() on SQLite."""
    larger = func.greatest if session.get_bind().dialect.name == "postgresql" else func.max
    return larger(*values)


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


def job_for_frame(session: Session, frame_id: int) -> Job | None:
    return session.scalar(select(Job).where(Job.frame_id == frame_id))


# --- results ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricRow:
    layer: str
    name: str
    step: int
    value: float


@dataclass(frozen=True)
class SpectrumRow:
    layer: str
    payload: dict[str, Any]


def layer_values_at(
    session: Session, run_id: int, step: int, analysis: str, model_layer: str
) -> dict[str, dict[str, float]]:
    """``{layer: {name: value}}`` an analysis stored at ``step`` for every layer of the run
    but ``model_layer`` (all frames; the latest row wins where a step was analysed twice).

    By a seek per metric name of the run (``ix_metric_run_name_step``): filtered on step and
    analysis alone the read walked every metric row of the run, once per weight frame (0.42
    -> 0.01 s on a run of 4.5 M rows)."""
    from spectrawatch_server.storage.dashboard_reads import series_names

    rows = session.execute(
        select(Metric.layer, Metric.name, Metric.value)
        .where(
            Metric.run_id == run_id,
            Metric.name.in_(series_names(session, run_id)),
            Metric.step == step,
            Metric.analysis == analysis,
            Metric.layer != model_layer,
            Metric.value.is_not(None),
        )
        .order_by(Metric.id)
    ).all()
    out: dict[str, dict[str, float]] = {}
    for layer, name, value in rows:
        if value is not None:
            out.setdefault(layer, {})[name] = float(value)
    return out


def replace_model_values(
    session: Session,
    run_id: int,
    frame_id: int,
    step: int,
    analysis: str,
    model_layer: str,
    values: Mapping[str, float],
) -> None:
    """Make ``values`` the only ``model_layer`` rows of ``analysis`` at ``step`` (owned by
    ``frame_id``), whichever frame wrote the earlier ones.

    The delete seeks each of the run's metric names (``ix_metric_run_name_step``): filtered on
    step, analysis and layer alone it walked every metric row of the run, once per weight
    frame (10 ms on a 90,000-row run, growing with the run)."""
    from spectrawatch_server.storage.dashboard_reads import series_names

    gone = _delete_metrics(
        session,
        Metric.run_id == run_id,
        Metric.name.in_(series_names(session, run_id)),
        Metric.step == step,
        Metric.analysis == analysis,
        Metric.layer == model_layer,
    )
    rows = [
        {
            "run_id": run_id,
            "frame_id": frame_id,
            "analysis": analysis,
            "layer": model_layer,
            "name": name,
            "step": step,
            "value": finite_or_none(value),
        }
        for name, value in values.items()
    ]
    if rows:
        session.execute(insert(cast(Table, Metric.__table__)), rows)
    _count_points(session, run_id, _series_counts(rows), gone)


def drop_other_model_values(
    session: Session,
    run_id: int,
    frame_id: int,
    analysis: str,
    model_layer: str,
    keys: Iterable[tuple[str, int]],
) -> None:
    """Delete the ``model_layer`` values of ``(name, step)`` ``keys`` other frames of the run
    wrote for ``analysis``: a whole-model value has one point per step, the latest (the SED
    analysis of an update-sketch frame and of a theta-sketch frame ending at the same step
    both evaluate the grokking detector there).

    The names and steps are also given on their own, so that the delete seeks them in
    ``ix_metric_run_name_step``: with the ``(name, step)`` pairs alone it walked every metric
    row of the run, once per SED frame (17 ms on a 90,000-row run, growing with the run)."""
    wanted = sorted(set(keys))
    gone: Counter[tuple[str, str]] = Counter()
    for start in range(0, len(wanted), 200):
        chunk = wanted[start : start + 200]
        gone += _delete_metrics(
            session,
            Metric.run_id == run_id,
            Metric.name.in_(sorted({name for name, _ in chunk})),
            Metric.step.in_(sorted({step for _, step in chunk})),
            Metric.analysis == analysis,
            Metric.layer == model_layer,
            Metric.frame_id != frame_id,
            tuple_(Metric.name, Metric.step).in_(chunk),
        )
    _count_points(session, run_id, Counter(), gone)


def replace_results(
    session: Session,
    run_id: int,
    frame_id: int,
    step: int,
    analysis: str,
    metrics: Iterable[MetricRow],
    spectra: Iterable[SpectrumRow],
) -> None:
    """Store an analysis' output for a frame, replacing any earlier output (idempotent)."""
    gone = _delete_metrics(session, Metric.frame_id == frame_id, Metric.analysis == analysis)
    session.execute(
        delete(Spectrum).where(Spectrum.frame_id == frame_id, Spectrum.analysis == analysis),
        execution_options={"synchronize_session": False},
    )
    rows = [
        {
            "run_id": run_id,
            "frame_id": frame_id,
            "analysis": analysis,
            "layer": m.layer,
            "name": m.name,
            "step": m.step,
            "value": finite_or_none(m.value),
        }
        for m in metrics
    ]
    if rows:
        # Core insert of the table: one executemany, without the ORM's per-row bulk bookkeeping
        # (~7 us a row: 0.3 s for the 44k rows of a GPT-2-sized frame at per-step SED)
        session.execute(insert(cast(Table, Metric.__table__)), rows)
        _count_stored_points(session, run_id, frame_id, analysis)
    _count_points(session, run_id, Counter(), gone)
    spectrum_rows = [
        {
            "run_id": run_id,
            "frame_id": frame_id,
            "analysis": analysis,
            "layer": s.layer,
            "step": step,
            "payload": s.payload,
        }
        for s in spectra
    ]
    if spectrum_rows:
        session.execute(insert(Spectrum), spectrum_rows)


SeriesCounts = Counter[tuple[str, str]]  # (name, layer) -> metric rows


def _series_counts(rows: Iterable[Mapping[str, Any]]) -> SeriesCounts:
    return Counter((str(r["name"]), str(r["layer"])) for r in rows)


def _delete_metrics(session: Session, *where: ColumnElement[bool]) -> SeriesCounts:
    """Delete the metric rows matching ``where``; how many of each series went (``RETURNING``:
    the rows this transaction deleted, not ones a concurrent one took first)."""
    # No session synchronisation: metric rows are never loaded as objects, and evaluating the
    # criteria against the identity map cost more than the delete (~3 ms per call)
    result = session.execute(
        delete(Metric).where(*where).returning(Metric.name, Metric.layer),
        execution_options={"synchronize_session": False},
    )
    return Counter((str(n), str(la)) for n, la in result)


def _count_points(
    session: Session, run_id: int, added: SeriesCounts, removed: SeriesCounts
) -> None:
    """Add ``added`` minus ``removed`` rows to each series' ``metric_series.points``: an
    upsert incrementing the stored count, so concurrent writers' changes add up in any order
    (a series whose rows all went keeps a row with 0 points)."""
    delta = Counter(added)
    delta.subtract(removed)
    values = [
        {"run_id": run_id, "name": n, "layer": la, "points": d}
        for (n, la), d in sorted(delta.items(), key=lambda kv: (kv[0][1], kv[0][0]))
        if d
    ]
    if not values:
        return
    dialect = session.get_bind().dialect.name
    insert_fn = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert_fn(cast(Table, MetricSeries.__table__))  # Core: no ORM bulk bookkeeping
    stmt = stmt.on_conflict_do_update(
        index_elements=["run_id", "name", "layer"],
        set_={"points": MetricSeries.points + stmt.excluded.points},
    )
    session.connection().execute(stmt, values)


def _count_stored_points(session: Session, run_id: int, frame_id: int, analysis: str) -> None:
    """Add the metric rows ``analysis`` stored for ``frame_id`` to their series' counts, counted
    in the database (one ``INSERT ... SELECT ... GROUP BY`` over the frame's rows, by its
    unique index): a row-by-row upsert from Python doubled the time to store a weights frame
    (one row a series: 15 -> 28 ms for 1,500 rows)."""
    dialect = session.get_bind().dialect.name
    insert_fn = postgresql.insert if dialect == "postgresql" else sqlite.insert
    counted = (
        select(literal(run_id, BigInteger), Metric.name, Metric.layer, func.count())
        .where(Metric.frame_id == frame_id, Metric.analysis == analysis)
        # in the unique index's (layer, name) order, as _count_points writes series: no sort,
        # and two writers of one series lock their rows in one order (PostgreSQL)
        .group_by(Metric.layer, Metric.name)
        .order_by(Metric.layer, Metric.name)
    )
    table = cast(Table, MetricSeries.__table__)
    stmt = insert_fn(table).from_select(["run_id", "name", "layer", "points"], counted)
    stmt = stmt.on_conflict_do_update(
        index_elements=["run_id", "name", "layer"],
        set_={"points": MetricSeries.points + stmt.excluded.points},
    )
    session.execute(stmt)


def rebuild_metric_series(session: Session, run_id: int) -> None:
    """Count every series of a run anew from its metric rows: for rows written around this
    module (a benchmark's bulk seed through the DB-API)."""
    session.execute(delete(MetricSeries).where(MetricSeries.run_id == run_id))
    counted = (
        select(Metric.run_id, Metric.name, Metric.layer, func.count())
        .where(Metric.run_id == run_id)
        .group_by(Metric.run_id, Metric.name, Metric.layer)
    )
    session.execute(
        insert(MetricSeries).from_select(["run_id", "name", "layer", "points"], counted)
    )


def insert_metric_batch(
    session: Session,
    run_id: int,
    key: str,
    source: str,
    metrics: Sequence[MetricRow],
    *,
    digest: str | None = None,
) -> Frame:
    """Store externally computed metrics under one blob-less frame of kind ``source``.

    The frame row (idempotency ``key``) makes a replayed batch a no-op; it has no job, so the
    values are never re-analysed. ``digest`` (of the request body) is kept in its ``info`` so a
    reused key with another body can be told from a replay.
    """
    last = max(m.step for m in metrics)
    frame = Frame(
        run_id=run_id,
        kind=source,
        step=last,
        seq=-1,
        idempotency_key=key,
        blob_key="",
        bytes=0,
        info={"imported_metrics": len(metrics), **({"digest": digest} if digest else {})},
        layers=sorted({m.layer for m in metrics}),
        nonfinite={},
        status="done",
    )
    insert_frame(session, frame)
    replace_results(session, run_id, frame.id, last, source, metrics, [])
    return frame


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


# --- scalars ---------------------------------------------------------------------------


SCALAR_CHUNK = 5000  # rows of one multi-row INSERT: 4 bound values each, under PostgreSQL's
# 65,535 and SQLite's 250,000 parameters a statement (a batch of 16,384 rows failed on the first)


def upsert_scalars(session: Session, run_id: int, rows: Sequence[tuple[int, str, float]]) -> int:
    """Insert ``(step, name, value)`` scalars; a repeated (name, step) overwrites the value (a
    batch holding one twice: the later one, the rows go in order)."""
    if not rows:
        return 0
    dialect = session.get_bind().dialect.name
    insert_fn = postgresql.insert if dialect == "postgresql" else sqlite.insert
    values = [
        {"run_id": run_id, "step": step, "name": name, "value": finite_or_none(value)}
        for step, name, value in rows
    ]
    for start in range(0, len(values), SCALAR_CHUNK):
        stmt = insert_fn(Scalar).values(values[start : start + SCALAR_CHUNK])
        stmt = stmt.on_conflict_do_update(
            index_elements=["run_id", "name", "step"], set_={"value": stmt.excluded.value}
        )
        session.execute(stmt)
    touch_run(session, run_id, max(step for step, _, _ in rows))
    return len(rows)


# --- queries ---------------------------------------------------------------------------


def _in_range(step_col: Any, start: int | None, end: int | None) -> list[ColumnElement[bool]]:
    """WHERE clauses restricting ``step_col`` to ``[start, end]`` (either bound optional)."""
    clauses: list[ColumnElement[bool]] = []
    if start is not None:
        clauses.append(step_col >= start)
    if end is not None:
        clauses.append(step_col <= end)
    return clauses


def metric_points(
    session: Session,
    run_id: int,
    name: str,
    layer: str | None,
    start: int | None,
    end: int | None,
) -> Sequence[tuple[str, int, float | None]]:
    """``(layer, step, value)`` rows of one metric, ordered by layer then step."""
    stmt = select(Metric.layer, Metric.step, Metric.value).where(
        Metric.run_id == run_id, Metric.name == name
    )
    if layer is not None:
        stmt = stmt.where(Metric.layer == layer)
    stmt = stmt.where(*_in_range(Metric.step, start, end)).order_by(Metric.layer, Metric.step)
    return [(r[0], r[1], r[2]) for r in session.execute(stmt).all()]


def metric_layers(session: Session, run_id: int, name: str) -> list[str]:
    """The layers of metric ``name`` in a run, sorted, by a recursive skip-scan of
    ``ix_metric_run_name_layer_step``: one index seek per layer, not a read of every point."""
    rows = session.execute(
        text(
            "WITH RECURSIVE l(layer) AS ("
            " SELECT min(layer) FROM metric WHERE run_id = :r AND name = :n"
            " UNION ALL"
            " SELECT (SELECT min(m.layer) FROM metric m"
            "  WHERE m.run_id = :r AND m.name = :n AND m.layer > l.layer)"
            " FROM l WHERE l.layer IS NOT NULL"
            ") SELECT layer FROM l WHERE layer IS NOT NULL"
        ),
        {"r": run_id, "n": name},
    ).all()
    return [str(r[0]) for r in rows]


def metric_series(
    session: Session,
    run_id: int,
    name: str,
    layer: str | None,
    start: int | None,
    end: int | None,
    *,
    at_steps: Sequence[int] | None = None,
) -> dict[str, tuple[list[int], list[float | None]]]:
    """``{layer: (steps, values)}`` of one metric (one layer if given), layers sorted, steps
    ascending: what :func:`metric_points` returns, split by layer (only the points at
    ``at_steps`` when given: a bounded read of a long series).

    One search of the covering ``ix_metric_run_name_layer_step`` per layer (the layers by
    :func:`metric_layers`), each returning only steps and values as the DB-API's tuples: one
    read of every layer through the ORM built a row object, with the layer's name, per point
    (150 layers x 5,000 steps: 0.4-0.9 s instead of ~3 s). With ``at_steps``, one index seek
    per step (``step IN`` of literal integers, :data:`IN_CHUNK` a statement: SQLAlchemy's
    expanding parameters took longer to render than the seeks)."""
    where = [
        Metric.run_id == run_id,
        Metric.name == name,
        Metric.layer == bindparam("layer"),
        *_in_range(Metric.step, start, end),
    ]
    stmt = select(Metric.step, Metric.value).where(*where).order_by(Metric.step)
    statements: list[Any] = [stmt]
    if at_steps is not None:
        lo, hi = (-1 if start is None else start), (INT64_MAX if end is None else end)
        wanted = sorted({int(t) for t in at_steps if lo <= int(t) <= hi})  # ints: no injection
        statements = [
            text(
                "SELECT step, value FROM metric WHERE run_id = :r AND name = :n AND layer = :layer"
                f" AND step IN ({','.join(map(str, wanted[i : i + IN_CHUNK]))}) ORDER BY step"
            ).bindparams(r=run_id, n=name)
            for i in range(0, len(wanted), IN_CHUNK)
        ]
    conn = session.connection()
    out: dict[str, tuple[list[int], list[float | None]]] = {}
    for lname in metric_layers(session, run_id, name) if layer is None else [layer]:
        rows: list[Any] = []
        for statement in statements:
            result = conn.execute(statement, {"layer": lname})
            try:  # the DB-API's tuples: a SQLAlchemy Row a point cost 3x the read itself here
                rows += result.cursor.fetchall()
            finally:
                result.close()
        if rows:
            out[lname] = ([r[0] for r in rows], [r[1] for r in rows])
    return out


IN_CHUNK = 1000  # steps of one ``IN`` list
INT64_MAX = 2**63 - 1


def metric_tail(
    session: Session, run_id: int, name: str, layer: str, limit: int
) -> list[tuple[int, float]]:
    """The last ``limit`` finite points of a metric, oldest first."""
    args = {"run": run_id, "name": name, "layer": layer, "limit": limit}
    rows = session.connection().execute(_METRIC_TAIL, args).all()
    return [(int(s), float(v)) for s, v in reversed(rows) if v is not None]


# The worker's history reads, built once and run with bound values (a frame reads dozens of
# tails: building each statement anew cost more than its index seek)
_METRIC_TAIL = (
    select(Metric.step, Metric.value)
    .where(
        Metric.run_id == bindparam("run"),
        Metric.name == bindparam("name"),
        Metric.layer == bindparam("layer"),
        Metric.value.is_not(None),
    )
    .order_by(Metric.step.desc())
    .limit(bindparam("limit"))
)
_SCALAR_TAIL = (
    select(Scalar.step, Scalar.value)
    .where(
        Scalar.run_id == bindparam("run"),
        Scalar.name == bindparam("name"),
        Scalar.value.is_not(None),
    )
    .order_by(Scalar.step.desc())
    .limit(bindparam("limit"))
)


def metric_catalog(session: Session, run_id: int) -> Sequence[tuple[str, str, int, int, int]]:
    """``(name, layer, points, first_step, last_step)`` for every metric series of a run, by
    name then layer.

    The series and their point counts from ``metric_series`` (kept by every metric write), the
    first and last step by a seek each in ``ix_metric_run_name_layer_step``: one ``GROUP BY
    name, layer`` over every metric row took 0.5-0.6 s on 2.3 M rows in SQLite and 0.4 s in
    PostgreSQL."""
    series = "FROM metric m WHERE m.run_id = s.run_id AND m.name = s.name AND m.layer = s.layer"
    rows = session.execute(
        text(
            f"SELECT s.name, s.layer, s.points, (SELECT min(m.step) {series}),"
            f" (SELECT max(m.step) {series})"
            " FROM metric_series s WHERE s.run_id = :r AND s.points > 0"
            " ORDER BY s.name, s.layer"
        ),
        {"r": run_id},
    )
    return [(str(n), str(la), int(p), int(a), int(b)) for n, la, p, a, b in rows]


def scalar_points(
    session: Session, run_id: int, name: str | None, start: int | None, end: int | None
) -> Sequence[tuple[str, int, float | None]]:
    """``(name, step, value)`` scalar rows, ordered by name then step."""
    stmt = select(Scalar.name, Scalar.step, Scalar.value).where(Scalar.run_id == run_id)
    if name is not None:
        stmt = stmt.where(Scalar.name == name)
    stmt = stmt.where(*_in_range(Scalar.step, start, end)).order_by(Scalar.name, Scalar.step)
    return [(r[0], r[1], r[2]) for r in session.execute(stmt).all()]


def scalar_tail(session: Session, run_id: int, name: str, limit: int) -> list[tuple[int, float]]:
    """The last ``limit`` finite points of a scalar, oldest first."""
    args = {"run": run_id, "name": name, "limit": limit}
    rows = session.connection().execute(_SCALAR_TAIL, args).all()
    return [(int(s), float(v)) for s, v in reversed(rows) if v is not None]


def spectrum_steps(
    session: Session, run_id: int, layer: str, analysis: str
) -> list[tuple[int, int]]:
    """``(step, id)`` of one layer's spectra of one analysis, by step then id: the keys alone
    (a layer's drill-down lists its steps and loads one payload, not every one of the run)."""
    stmt = (
        select(Spectrum.step, Spectrum.id)
        .where(Spectrum.run_id == run_id, Spectrum.layer == layer, Spectrum.analysis == analysis)
        .order_by(Spectrum.step, Spectrum.id)
    )
    return [(int(step), int(sid)) for step, sid in session.execute(stmt)]


SpectrumKey = tuple[int, str, str, int]  # (step, layer, analysis, id): the page order


def spectra_for(
    session: Session,
    run_id: int,
    layer: str | None,
    frame_id: int | None,
    analysis: str | None,
    *,
    start: int | None = None,
    end: int | None = None,
    limit: int | None = None,
    offset: int = 0,
    after: SpectrumKey | None = None,
) -> Sequence[Spectrum]:
    """Spectra of a run (of one layer, frame, analysis and step range where given) by step,
    layer, analysis and id: ``limit`` of them (all when None) after the key ``after`` (the
    previous page's last: keyset pagination), from the ``offset``-th of those.

    A page is chosen on the rows' keys, in ``ix_spectrum_run_step_layer``'s order (0008: a page
    after a key is an index range that stops after ``limit`` entries; with ``ix_spectrum_run_id``
    alone every page read and sorted the keys of all of the run's spectra), then only its rows
    are loaded: ordering whole rows would carry every payload of the run (a histogram and fits,
    ~10 KB each) through the sorter."""
    order = (Spectrum.step, Spectrum.layer, Spectrum.analysis, Spectrum.id)
    stmt = select(Spectrum.id).where(Spectrum.run_id == run_id)
    if layer is not None:
        stmt = stmt.where(Spectrum.layer == layer)
    if frame_id is not None:
        stmt = stmt.where(Spectrum.frame_id == frame_id)
    if analysis is not None:
        stmt = stmt.where(Spectrum.analysis == analysis)
    if after is not None:
        stmt = stmt.where(tuple_(*order) > tuple_(*after))
    stmt = stmt.where(*_in_range(Spectrum.step, start, end)).order_by(*order)
    stmt = stmt.limit(limit).offset(offset)
    ids = session.scalars(stmt).all()
    rows: dict[int, Spectrum] = {}
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        rows.update(
            (r.id, r) for r in session.scalars(select(Spectrum).where(Spectrum.id.in_(chunk)))
        )
    return [rows[i] for i in ids]


def count_rows(session: Session, model: Any, **where: Any) -> int:
    """``SELECT count(*)`` of ``model`` filtered by equality on column names."""
    stmt = select(func.count()).select_from(model)
    for column, value in where.items():
        stmt = stmt.where(getattr(model, column) == value)
    return int(session.scalar(stmt) or 0)


def stale_before(minutes: float) -> datetime:
    return utcnow() - timedelta(minutes=minutes)
