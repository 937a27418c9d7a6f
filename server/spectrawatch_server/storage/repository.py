"""Projects, tokens, runs and frames: small functions over a caller-owned ``Session``.

The server's SQL lives in ``storage/``: this module, :mod:`.job_store` (the embedded queue's
jobs), :mod:`.result_store` (analysis results, scalars), :mod:`.metric_reads` (series reads),
:mod:`.dashboard_reads` and :mod:`.alert_store`.

Callers own the transaction (``with session.begin():``); functions here never commit, so
several of them compose into one atomic unit (frame row + job row, results + job done).
"""

from __future__ import annotations

import hashlib
import itertools
import secrets
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    String,
    bindparam,
    case,
    delete,
    func,
    or_,
    select,
    update,
)
from sqlalchemy import column as sa_column
from sqlalchemy.orm import Session, defer

from spectrawatch.wire import LAYER_MAX, MODEL_LAYER, row_steps
from spectrawatch_server.db.base import utcnow
from spectrawatch_server.db.models import (
    Alert,
    AlertRule,
    Delivery,
    DeliveryAttempt,
    Frame,
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


def list_runs(
    session: Session,
    project_id: int | None,
    limit: int,
    offset: int,
    before_id: int | None = None,
    name: str | None = None,
    statuses: Collection[str] = (),
    tags: Collection[str] = (),
) -> Sequence[Run]:
    """Live runs newest first (id descending), of one project, of one exact ``name``, with one
    of ``statuses`` and with every one of ``tags`` when given: those with an id below
    ``before_id`` (a keyset page, unmoved by runs created or deleted meanwhile), ``offset`` of
    them skipped, at most ``limit``."""
    stmt = select(Run).where(Run.status != DELETED).order_by(Run.id.desc())
    stmt = stmt.limit(limit).offset(offset)
    if project_id is not None:
        stmt = stmt.where(Run.project_id == project_id)
    if before_id is not None:
        stmt = stmt.where(Run.id < before_id)
    if name is not None:
        stmt = stmt.where(Run.name == name)
    if statuses:
        stmt = stmt.where(Run.status.in_(sorted(statuses)))
    for tag in sorted(set(tags)):
        stmt = stmt.where(has_tag(session, tag))
    return session.scalars(stmt).all()


def has_tag(session: Session, tag: str) -> ColumnElement[bool]:
    """Whether a run's tags hold ``tag`` exactly, in SQL (:func:`tag_matches`)."""
    return tag_matches(session, lambda value: value == tag)


def tag_matches(
    session: Session, test: Callable[[ColumnElement[str]], ColumnElement[bool]]
) -> ColumnElement[bool]:
    """Whether one of a run's tags passes ``test`` (a condition on the tag's text), in SQL: an
    ``EXISTS`` over the elements of its JSON ``tags`` array (``json_each`` on SQLite,
    ``json_array_elements_text`` on PostgreSQL), correlated to the query's ``run``."""
    postgres = session.get_bind().dialect.name == "postgresql"
    each = func.json_array_elements_text if postgres else func.json_each
    elements = each(Run.tags).table_valued(sa_column("value", String))
    return select(elements.c.value).where(test(elements.c.value)).exists()


@dataclass(frozen=True)
class DeletedRun:
    """What :func:`delete_run` removed; the caller deletes ``blob_keys`` after the commit."""

    frames: int
    bytes: int  # of the blobs still stored (pruned frames freed theirs before)
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
    # imported metric batches and pruned frames have no blob: their bytes are not freed here
    keys = [k for k, _ in rows if k]
    return DeletedRun(len(rows), sum(int(b) for k, b in rows if k), keys)


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


def frame_counts(session: Session, run_ids: Sequence[int]) -> dict[int, dict[str, int]]:
    """``{run id: {frame status: count}}`` of the runs ``run_ids`` (runs without frames are
    absent), by one grouped query."""
    if not run_ids:
        return {}
    rows = session.execute(
        select(Frame.run_id, Frame.status, func.count())
        .where(Frame.run_id.in_(sorted(set(run_ids))))
        .group_by(Frame.run_id, Frame.status)
    )
    out: dict[int, dict[str, int]] = {}
    for run_id, status, n in rows:
        out.setdefault(int(run_id), {})[str(status)] = int(n)
    return out


def is_stale(run: Run, before: datetime, statuses: Iterable[str]) -> bool:
    """Whether ``run`` still matches :func:`stale_runs` (re-checked under its lock)."""
    return (
        run.status in statuses
        and run.status != DELETED
        and run.updated_at < before
        and (run.last_seen_at is None or run.last_seen_at < before)
    )


def frame_totals(session: Session, run_ids: Sequence[int]) -> tuple[int, int]:
    """How many frames the runs hold and the bytes of their blobs still stored (what deleting
    them frees: pruned frames' blobs are gone already)."""
    frames, size = 0, 0
    stored = case((Frame.blob_key != "", Frame.bytes), else_=0)
    for start in range(0, len(run_ids), 500):
        chunk = run_ids[start : start + 500]
        n, b = session.execute(
            select(func.count(), func.coalesce(func.sum(stored), 0)).where(Frame.run_id.in_(chunk))
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


def touch_run(session: Session, run_id: int, step: int | None, *, seen: bool = True) -> None:
    """Record activity (and the highest step seen) on a run; ``seen=False`` only the step (a
    write that is no sign of training going on, which ``run_silent`` must not count)."""
    values: dict[str, Any] = {"last_seen_at": utcnow()} if seen else {}
    if step is not None:
        values["last_step"] = greatest(session, func.coalesce(Run.last_step, step), step)
    session.execute(update(Run).where(Run.id == run_id).values(**values))


# --- frames and jobs -------------------------------------------------------------------


def frame_by_key(session: Session, key: str) -> Frame | None:
    return session.scalar(select(Frame).where(Frame.idempotency_key == key))


def insert_frame(session: Session, frame: Frame) -> Frame:
    """Insert ``frame`` (the caller enqueues its job in the same transaction)."""
    insert_frames(session, [frame])
    return frame


def frame_last_step(frame: Frame) -> int:
    """The last step a frame holds: its last row's for sketch frames (``info.steps``, checked
    at ingest), else its step. A run resumed by name continues after it."""
    steps = row_steps(frame.kind, frame.info or {})
    return int(steps[-1]) if steps else frame.step


def insert_frames(session: Session, frames: Sequence[Frame]) -> None:
    """Insert ``frames`` in one flush (ids assigned) and touch each run once with its top step."""
    session.add_all(frames)
    session.flush()
    top: dict[int, int] = {}
    for frame in frames:
        last = frame_last_step(frame)
        top[frame.run_id] = max(last, top.get(frame.run_id, last))
    # one executemany on the connection (compiled once) instead of an ORM statement per run
    step = bindparam("top_step", type_=BigInteger)
    stmt = (
        update(Run)
        .where(Run.id == bindparam("run_id", type_=BigInteger))
        .values(
            last_seen_at=utcnow(),
            last_step=greatest(session, func.coalesce(Run.last_step, step), step),
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
    return frames_page(session, run_id, kind, limit, offset, status)[0]


def frames_page(
    session: Session,
    run_id: int,
    kind: str | None,
    limit: int,
    offset: int,
    status: str | None = None,
    max_layer_chars: int | None = None,
) -> tuple[list[Frame], bool]:
    """Up to ``limit`` frames by seq, without their ``info`` (the client's metadata, up to
    ``MAX_INFO_BYTES`` each: not loaded), and whether more follow the page.

    With ``max_layer_chars`` the page also ends once its frames' layer names add up to more
    than that many characters (it holds one frame at least); rows are read a few at a time.
    """
    stmt = (
        select(Frame)
        .options(defer(Frame.info))
        .where(Frame.run_id == run_id)
        .order_by(Frame.seq)
        .limit(limit)
        .offset(offset)
    )
    if kind is not None:
        stmt = stmt.where(Frame.kind == kind)
    if status is not None:
        stmt = stmt.where(Frame.status == status)
    if max_layer_chars is None:
        return list(session.scalars(stmt)), False
    page: list[Frame] = []
    chars = 0
    result = session.scalars(stmt.execution_options(yield_per=16))
    try:
        for frame in result:
            chars += sum(map(len, frame.layers))
            if page and chars > max_layer_chars:
                return page, True
            page.append(frame)
    finally:
        result.close()  # a page ended early leaves rows unread
    return page, False


def recent_frames(
    session: Session,
    run_id: int,
    kind: str,
    before_seq: int,
    limit: int,
    skip: Collection[int] = (),
) -> list[Frame]:
    """Up to ``limit`` frames of ``kind`` with seq < ``before_seq``, oldest first; only frames
    with a blob (never imported metric batches, whatever their kind, nor pruned frames) and
    not in ``skip`` (frame ids whose blob the store no longer has: read as if pruned)."""
    where = [
        Frame.run_id == run_id,
        Frame.kind == kind,
        Frame.seq < before_seq,
        Frame.blob_key != "",
    ]
    if skip:
        where.append(Frame.id.not_in(skip))
    rows = session.scalars(
        select(Frame).where(*where).order_by(Frame.seq.desc()).limit(limit)
    ).all()
    return list(reversed(rows))


HOLDING_PAGES = (4, 16, 64, 256)  # frame rows read per query by frames_holding, then the last


def frames_holding(
    session: Session,
    run_id: int,
    kind: str,
    before_seq: int,
    before_step: int,
    layers: Collection[str],
    skip: Collection[int] = (),
) -> dict[str, Frame]:
    """For each of ``layers``, the newest frame of ``kind`` (highest seq below ``before_seq``,
    at a step below ``before_step``, with a blob, not in ``skip``) whose ``layers`` name it;
    layers no such frame holds are absent.

    A weight snapshot arrives in parts: each layer's previous snapshot is in one of them. Reads
    frame rows' ids and layer names a page at a time, newest first (small pages first: part
    ``k`` of a snapshot finds its layers ``parts - k`` rows back), until every layer is found,
    then loads only the rows that hold one."""
    wanted = set(layers)
    found: dict[str, int] = {}
    seq, seen = before_seq - 1, set[int]()  # next page: seq <= seq, ids not seen at that seq
    pages = itertools.chain(HOLDING_PAGES, itertools.repeat(HOLDING_PAGES[-1]))
    while wanted:
        limit = next(pages)
        where = [
            Frame.run_id == run_id,
            Frame.kind == kind,
            Frame.seq <= seq,
            Frame.step < before_step,
            Frame.blob_key != "",
        ]
        if skip:
            where.append(Frame.id.not_in(skip))
        if seen:  # a seq may repeat: keyset paging on (seq, id)
            where.append(Frame.id.not_in(seen))
        page = session.execute(
            select(Frame.id, Frame.seq, Frame.layers)
            .where(*where)
            .order_by(Frame.seq.desc(), Frame.id.desc())
            .limit(limit)
        ).all()
        for frame_id, _, names in page:
            held = wanted.intersection(names or ())
            found.update(dict.fromkeys(held, frame_id))
            wanted -= held
        if len(page) < limit:
            break
        last = page[-1].seq
        seen = (seen if last == seq else set()) | {i for i, s, _ in page if s == last}
        seq = last
    if not found:
        return {}
    rows = session.scalars(select(Frame).where(Frame.id.in_(set(found.values()))))
    by_id = {row.id: row for row in rows}
    return {layer: by_id[frame_id] for layer, frame_id in found.items()}


UNCHANGED_INFO_KEY = "unchanged"  # weights frame info: {layer: step last sent}, left out


def unchanged_layers(session: Session, run_id: int, step: int) -> dict[str, int]:
    """``{layer: step last sent}`` of the frozen weights the run's weight snapshot at ``step``
    left out as unchanged, named by its frames' ``info["unchanged"]`` (:func:`unchanged_since`).

    Reads that info entry alone (a JSON path in the query), not each part's whole info, which
    names and shapes up to thousands of tensors; the parts' layer lists only when it names
    any."""
    where = (Frame.run_id == run_id, Frame.kind == "weights", Frame.step == step)
    named = [
        value
        for value in session.execute(select(Frame.info[UNCHANGED_INFO_KEY]).where(*where))
        .scalars()
        .all()
        if value is not None
    ]
    if not named:
        return {}
    held = {
        layer
        for layers in session.execute(select(Frame.layers).where(*where)).scalars()
        for layer in layers or ()
    }
    return unchanged_since(named, step, held)


def latest_unchanged(session: Session, run_id: int) -> tuple[int, dict[str, int]]:
    """The step of the run's latest weight snapshot (-1: none) and :func:`unchanged_layers`
    of it: the frozen weights whose metrics stop at the step they were last sent."""
    step = session.execute(
        select(func.max(Frame.step)).where(Frame.run_id == run_id, Frame.kind == "weights")
    ).scalar()
    return (-1, {}) if step is None else (step, unchanged_layers(session, run_id, step))


def unchanged_since(entries: Iterable[object], step: int, held: Collection[str]) -> dict[str, int]:
    """``{layer: step last sent}`` from the ``info["unchanged"]`` ``entries`` of a snapshot at
    ``step`` (as the client sent them): a layer the snapshot holds, an unprintable or over-long
    name, or a step not before ``step`` is ignored; a layer named twice keeps its latest."""
    out: dict[str, int] = {}
    for entry in entries:
        if not isinstance(entry, Mapping):
            continue
        for layer, since in entry.items():
            if (
                isinstance(layer, str)
                and 0 < len(layer) <= LAYER_MAX
                and layer.isprintable()
                and layer != MODEL_LAYER
                and layer not in held
                and type(since) is int
                and 0 <= since < step
            ):
                out[layer] = max(since, out.get(layer, since))
    return out


def referenced_blob_keys(session: Session) -> set[str]:
    return set(session.scalars(select(Frame.blob_key)).all())


def greatest(session: Session, *values: Any) -> Any:
    """The larger of scalar SQL values: GREATEST on PostgreSQL, multi-argument max() on SQLite."""
    larger = func.greatest if session.get_bind().dialect.name == "postgresql" else func.max
    return larger(*values)


def count_rows(session: Session, model: Any, **where: Any) -> int:
    """``SELECT count(*)`` of ``model`` filtered by equality on column names."""
    stmt = select(func.count()).select_from(model)
    for column, value in where.items():
        stmt = stmt.where(getattr(model, column) == value)
    return int(session.scalar(stmt) or 0)


def stale_before(minutes: float) -> datetime:
    return utcnow() - timedelta(minutes=minutes)
