"""Group commit of frames and the ingest auth cache, over a real SQLite database (Alembic)."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, inspect, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from spectrawatch_server.api.auth_cache import AuthCache
from spectrawatch_server.api.errors import ApiError
from spectrawatch_server.db import migrate
from spectrawatch_server.db.base import utcnow
from spectrawatch_server.db.models import Frame, Job, Run
from spectrawatch_server.db.session import make_engine, make_session_factory
from spectrawatch_server.queue.embedded import EmbeddedQueue
from spectrawatch_server.schemas import FramePublic
from spectrawatch_server.storage import job_store
from spectrawatch_server.storage import repository as repo
from spectrawatch_server.storage.group_commit import (
    Committed,
    CommitUnknown,
    FrameCommitter,
    RunGone,
)


def make_runs(sessions: sessionmaker[Session], n: int, project: str = "p") -> list[int]:
    with sessions.begin() as session:
        proj, _ = repo.get_or_create_project(session, project)
        return [repo.get_or_create_run(session, proj, f"r{i}", {}, [])[0].id for i in range(n)]


def frame(run_id: int, seq: int, key: str | None = None) -> Frame:
    return Frame(
        run_id=run_id,
        kind="weights",
        step=10 * seq,
        seq=seq,
        idempotency_key=key or f"{run_id}/{run_id}:{seq}",
        blob_key=f"runs/{run_id}/{seq}",
        bytes=1,
        info={},
        layers=["w"],
        nonfinite={},
        status="pending",
    )


def committer(sessions: sessionmaker[Session]) -> FrameCommitter:
    return FrameCommitter(sessions, EmbeddedQueue(sessions, lambda _: None), max_batch=64)


def created(results: list[Committed | Exception]) -> list[bool]:
    return [r.created if isinstance(r, Committed) else False for r in results]


def stored(sessions: sessionmaker[Session]) -> tuple[int, int, list[str]]:
    with sessions() as session:
        keys = list(session.scalars(select(Frame.idempotency_key).order_by(Frame.id)))
        jobs = session.scalar(select(func.count()).select_from(Job)) or 0
        return len(keys), jobs, keys


def test_batch_is_one_transaction_with_jobs_and_run_steps(sessions: sessionmaker[Session]) -> None:
    a, b = make_runs(sessions, 2)
    frames = [frame(a, 0), frame(b, 0), frame(a, 1), frame(a, 2), frame(b, 5)]
    c = committer(sessions)
    assert created(c.write(frames)) == [True] * 5
    assert c.batches == 1
    assert c.frames == 5
    n, jobs, keys = stored(sessions)
    assert (n, jobs) == (5, 5)
    assert keys == [f.idempotency_key for f in frames]  # arrival order kept
    with sessions() as session:
        assert session.get_one(Run, a).last_step == 20
        assert session.get_one(Run, b).last_step == 50


def test_a_sketch_frames_last_row_is_its_runs_last_step(sessions: sessionmaker[Session]) -> None:
    """A sketch frame's ``step`` is its first row's: the run's last step is its last row's,
    else a run resumed by name started inside the frame and stored its last steps twice."""
    (a,) = make_runs(sessions, 1)
    sketch = frame(a, 1)
    sketch.kind, sketch.step, sketch.info = "update_sketch", 9, {"steps": [9, 10, 11, 12]}
    assert created(committer(sessions).write([frame(a, 0), sketch])) == [True, True]
    with sessions() as session:
        assert session.get_one(Run, a).last_step == 12


def test_duplicate_key_in_batch_costs_only_itself(sessions: sessionmaker[Session]) -> None:
    (a,) = make_runs(sessions, 1)
    c = committer(sessions)
    (first,) = c.write([frame(a, 0)])
    # a replay of seq 0 (already stored), a new frame, and two racing copies of seq 2
    results = c.write([frame(a, 0), frame(a, 1), frame(a, 2), frame(a, 2)])
    assert created(results) == [False, True, True, False]
    ids = [r.frame.id for r in [first, *results] if isinstance(r, Committed)]
    assert ids[1] == ids[0]
    assert ids[4] == ids[3]
    n, jobs, keys = stored(sessions)
    assert (n, jobs, len(set(keys))) == (3, 3, 3)


def test_a_batch_committed_as_the_connection_failed_is_answered_from_its_rows(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection lost while the database acknowledged COMMIT: the batch is stored, yet
    the error reached the requests, which deleted their blobs (rows naming missing blobs).
    The rows are read back; a batch that did not commit still raises, and one whose outcome
    cannot be read raises CommitUnknown (the requests keep their blobs)."""
    (a,) = make_runs(sessions, 1)
    c = committer(sessions)
    insert = c._insert
    lost = OperationalError("COMMIT", {}, Exception("server closed the connection"))

    def commit_then_fail(frames: list[Frame], at_commit: list[bool]) -> None:
        insert(frames, at_commit)
        raise lost

    monkeypatch.setattr(c, "_insert", commit_then_fail)
    results = c.write([frame(a, 0), frame(a, 1)])
    assert created(results) == [True, True]
    assert [r.frame.blob_key for r in results if isinstance(r, Committed)] == [
        f"runs/{a}/0",
        f"runs/{a}/1",
    ]
    assert stored(sessions)[:2] == (2, 2)

    def fail_at_commit(frames: list[Frame], at_commit: list[bool]) -> None:
        at_commit[0] = True
        raise lost

    monkeypatch.setattr(c, "_insert", fail_at_commit)  # nothing committed: the error itself
    with pytest.raises(OperationalError):
        c.write([frame(a, 2)])
    monkeypatch.setattr(repo, "frame_by_key", lambda *_: (_ for _ in ()).throw(lost))
    with pytest.raises(CommitUnknown) as unknown:  # the database cannot say
        c.write([frame(a, 3)])
    assert unknown.value.error is lost
    # down before COMMIT (connection refused): rolled back for sure, the blob goes, no
    # read-back (it kept every blob of an outage as an orphan until the next start-up)
    monkeypatch.setattr(c, "_insert", lambda frames, at_commit: (_ for _ in ()).throw(lost))
    with pytest.raises(OperationalError):
        c.write([frame(a, 4)])


def test_concurrent_requests_share_transactions(sessions: sessionmaker[Session]) -> None:
    runs = make_runs(sessions, 4)
    c = committer(sessions)

    async def post_all() -> list[bool]:
        tasks = [c.commit(frame(r, s)) for s in range(25) for r in runs]
        return [r.created for r in await asyncio.gather(*tasks)]

    assert asyncio.run(post_all()) == [True] * 100
    n, jobs, keys = stored(sessions)
    assert (n, jobs, len(set(keys))) == (100, 100, 100)
    assert c.frames == 100
    assert c.batches == 2  # all 100 queued before the first commit: batches of 64 and 36


def test_frames_of_missing_or_deleted_runs_fail_alone(sessions: sessionmaker[Session]) -> None:
    a, b = make_runs(sessions, 2)
    with sessions.begin() as session:
        repo.delete_run(session, session.get_one(Run, b))  # b is now a tombstone
    c = committer(sessions)

    async def post() -> list[object]:
        # run 999 does not exist and run b was deleted: the batch is split and the other
        # frames are stored and acknowledged
        tasks = [
            c.commit(frame(a, 0)),
            c.commit(frame(999, 0)),
            c.commit(frame(b, 0)),
            c.commit(frame(a, 1)),
        ]
        return list(await asyncio.gather(*tasks, return_exceptions=True))

    ok0, missing, deleted, ok1 = asyncio.run(post())
    assert isinstance(missing, RunGone)
    assert isinstance(deleted, RunGone)
    assert deleted.run_id == b
    assert isinstance(ok0, Committed)
    assert isinstance(ok1, Committed)
    assert ok0.created
    assert ok1.created
    assert stored(sessions)[:2] == (2, 2)
    with sessions() as session:
        assert repo.get_run(session, b) is None
        assert repo.live_runs(session, [a, b, 999]) == {a}


def test_auth_cache_ttl_revocation_and_no_negative_caching(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as session:
        mine, _ = repo.get_or_create_project(session, "mine")
        other, _ = repo.get_or_create_project(session, "other")
        token, secret = repo.create_token(session, mine)
        run_mine = repo.get_or_create_run(session, mine, "a", {}, [])[0].id
        run_other = repo.get_or_create_run(session, other, "b", {}, [])[0].id
    now = [0.0]
    cache = AuthCache(5.0, clock=lambda: now[0])
    header = f"Bearer {secret}"
    assert not cache.check(True, header, run_mine)  # nothing cached yet
    cache.authorize(sessions, True, header, run_mine)
    assert cache.check(True, header, run_mine)
    assert not cache.check(True, header, run_other)  # another project's run: ask the DB
    with pytest.raises(ApiError) as err:
        cache.authorize(sessions, True, header, run_other)
    assert err.value.status == 404
    with sessions.begin() as session:
        repo.revoke_token(session, token.id)
    now[0] = 4.9
    assert cache.check(True, header, run_mine)  # the documented revocation delay
    now[0] = 5.1
    assert not cache.check(True, header, run_mine)
    with pytest.raises(ApiError) as err:
        cache.authorize(sessions, True, header, run_mine)
    assert err.value.status == 401
    assert not cache.check(True, None, run_mine)  # auth required: no anonymous pass
    assert not AuthCache(0.0).check(False, None, run_mine)  # disabled


def test_auth_cache_keeps_the_token_role_and_refuses_a_read_token(
    sessions: sessionmaker[Session],
) -> None:
    """The cache answers for a token's role too: a ``read`` token is refused (403, another
    project's run still 404 first) and never cached; a cached ``write`` token passes a
    ``write`` check from memory, not an ``admin`` one."""
    with sessions.begin() as session:
        mine, _ = repo.get_or_create_project(session, "mine")
        other, _ = repo.get_or_create_project(session, "other")
        _, reader = repo.create_token(session, mine, role="read")
        _, writer = repo.create_token(session, mine, role="write")
        run_mine = repo.get_or_create_run(session, mine, "a", {}, [])[0].id
        run_other = repo.get_or_create_run(session, other, "b", {}, [])[0].id
    cache = AuthCache(5.0, clock=lambda: 0.0)
    with pytest.raises(ApiError) as err:
        cache.authorize(sessions, True, f"Bearer {reader}", run_mine)
    assert (err.value.status, err.value.code) == (403, "insufficient_role")
    assert "'write'" in err.value.message
    assert "'read'" in err.value.message
    assert not cache.check(True, f"Bearer {reader}", run_mine)
    with pytest.raises(ApiError) as err:
        cache.authorize(sessions, True, f"Bearer {reader}", run_other)
    assert err.value.status == 404
    cache.authorize(sessions, True, f"Bearer {writer}", run_mine)
    assert cache.check(True, f"Bearer {writer}", run_mine)
    assert not cache.check(True, f"Bearer {writer}", run_mine, role="admin")
    with sessions.begin() as session:  # a server-wide token is cached as one
        _, everywhere = repo.create_token(session, None, role="write")
    cache.authorize(sessions, True, f"Bearer {everywhere}", run_other)
    assert cache.check(True, f"Bearer {everywhere}", run_other)
    assert cache.check(True, f"Bearer {everywhere}", run_mine)


def test_a_job_cut_by_a_database_outage_is_released_at_once_without_using_an_attempt(
    sessions: sessionmaker[Session],
) -> None:
    from sqlalchemy.exc import OperationalError

    (a,) = make_runs(sessions, 1)
    outage = {"on": True}

    def handler(frame_id: int) -> None:  # as the worker: the job ends with its frame
        if outage["on"]:
            raise OperationalError("SELECT 1", {}, Exception("connection lost"))
        with sessions.begin() as session:
            job_store.finish_frame(session, frame_id, "done", None)

    queue = EmbeddedQueue(sessions, handler, lease_seconds=3600, max_attempts=2)
    FrameCommitter(sessions, queue).write([frame(a, 0)])
    with pytest.raises(OperationalError):
        queue.run_once()  # the analysis dies with the database
    with sessions() as session:
        job = session.scalars(select(Job)).one()
        assert (job.status, job.attempts) == ("running", 1)  # nothing can be written yet
    outage["on"] = False
    assert queue.run_once()  # the database answers: released (attempt refunded), then re-run
    with sessions() as session:
        job = session.scalars(select(Job)).one()
        assert (job.status, job.attempts) == ("done", 1)  # not held until the 1-hour lease


def test_job_out_of_attempts_fails_its_frame_too(sessions: sessionmaker[Session]) -> None:
    (run_id,) = make_runs(sessions, 1)
    with sessions.begin() as session:
        row = repo.insert_frame(session, frame(run_id, 0))
        session.add(Job(frame_id=row.id, status="pending", attempts=3))
    with sessions.begin() as session:
        assert job_store.fail_expired_jobs(session, max_attempts=3) == 1
    with sessions() as session:
        job = session.scalars(select(Job)).one()
        assert (job.status, job.error) == ("failed", "gave up after max attempts")
        assert session.scalars(select(Frame.status)).one() == "failed"
        assert session.scalars(select(Frame.error)).one() == "gave up after max attempts"
        assert job_store.fail_expired_jobs(session, max_attempts=3) == 0


def test_a_failed_job_waits_its_backoff_before_the_next_attempt(
    sessions: sessionmaker[Session],
) -> None:
    """The embedded queue re-ran a failed analysis at once: five attempts took ~25 ms, so a
    blob store away for a second failed the frame for good. It now waits backoff**attempts s."""
    (run_id,) = make_runs(sessions, 1)
    calls: list[float] = []

    def handler(frame_id: int) -> None:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise OSError("blob store unavailable")
        with sessions.begin() as session:
            job_store.finish_frame(session, frame_id, "done", None)

    queue = EmbeddedQueue(sessions, handler, max_attempts=5, backoff_seconds=0.5)
    FrameCommitter(sessions, queue).write([frame(run_id, 0)])
    assert queue.run_once()  # attempt 1 fails: not before 0.5**1 s from now
    assert not queue.run_once()  # nothing runnable yet
    with sessions() as session:
        job = session.scalars(select(Job)).one()
        assert (job.status, job.attempts, job.error) == (
            "pending",
            1,
            "OSError('blob store unavailable')",
        )
    while len(calls) < 3:
        queue.run_once()
        time.sleep(0.01)
    assert calls[1] - calls[0] >= 0.5
    assert calls[2] - calls[1] >= 0.25  # 0.5**2
    with sessions() as session:
        assert session.scalars(select(Job.status)).one() == "done"


def test_a_failed_frame_says_why_until_it_is_analysed(sessions: sessionmaker[Session]) -> None:
    """The reason of a failed analysis was kept in the embedded queue's job row only (none with
    procrastinate): it is on the frame now, listed by status, and cleared when it succeeds."""
    (run_id,) = make_runs(sessions, 1)
    fail = {"on": True}

    def handler(frame_id: int) -> None:
        if fail["on"]:
            raise OSError("blob store unavailable")
        with sessions.begin() as session:
            job_store.finish_frame(session, frame_id, "done", None)

    queue = EmbeddedQueue(sessions, handler, max_attempts=1)
    FrameCommitter(sessions, queue).write([frame(run_id, 0), frame(run_id, 1)])
    assert queue.run_once()
    with sessions() as session:
        (failed,) = repo.list_frames(session, run_id, None, 10, 0, status="failed")
        assert FramePublic.model_validate(failed).error == "OSError('blob store unavailable')"
        assert [f.error for f in repo.list_frames(session, run_id, None, 10, 0)] == [
            "OSError('blob store unavailable')",
            None,
        ]
    fail["on"] = False
    with sessions.begin() as session:
        job_store.finish_frame(session, failed.id, "done", None)  # re-analysed
    with sessions() as session:
        assert repo.list_frames(session, run_id, None, 10, 0, status="failed") == []
        assert session.get_one(Frame, failed.id).error is None


def add_jobs(sessions: sessionmaker[Session], run_id: int, statuses: list[str]) -> list[int]:
    """One frame per status with its job in that status (``running`` ones leased for an hour);
    the job ids in order."""
    with sessions.begin() as session:
        ids = []
        for seq, status in enumerate(statuses):
            row = repo.insert_frame(session, frame(run_id, seq))
            lease = utcnow() + timedelta(hours=1) if status == "running" else None
            job = Job(frame_id=row.id, status=status, lease_until=lease)
            session.add(job)
            session.flush()
            ids.append(job.id)
        return ids


def claim_cost(path: Path, pending: int, done: int) -> int:
    """SQLite virtual-machine instructions (in hundreds) one embedded-queue claim executes, on
    a fresh database holding ``done`` finished jobs then ``pending`` pending ones: a measure of
    the rows it reads that does not depend on the machine's speed."""
    engine = make_engine(f"sqlite:///{path}")
    migrate.upgrade(engine)
    sessions = make_session_factory(engine)
    (run_id,) = make_runs(sessions, 1)
    with sessions.begin() as session:
        for seq in range(done + pending):
            row = repo.insert_frame(session, frame(run_id, seq))
            session.add(Job(frame_id=row.id, status="done" if seq < done else "pending"))
    queue = EmbeddedQueue(sessions, lambda _frame_id: None)
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0  # go on

    def watch(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        dbapi_connection.set_progress_handler(count, 100)

    event.listen(engine, "checkout", watch)
    try:
        assert queue.run_once()
    finally:
        event.remove(engine, "checkout", watch)
        engine.dispose()
    return steps[0]


def test_a_claims_cost_does_not_grow_with_the_backlog_or_the_history(tmp_path: Path) -> None:
    """The expired-job check read every pending job on each claim, and the candidate query could
    walk the primary key past every finished job (they are kept): a claim's cost grew with the
    backlog and the history (SQLite 2.3 -> 8.6 ms from 100 to 100,000 pending jobs, 18 ms behind
    100,000 finished ones; PostgreSQL 4 -> 21 ms: benchmarks/job_claim.py). Now both are index
    ranges that stop after a few rows."""
    small = claim_cost(tmp_path / "small.db", pending=10, done=0)
    large = claim_cost(tmp_path / "large.db", pending=3000, done=3000)
    assert large < 1.5 * small + 5, (small, large)  # was 20x


def test_claims_take_the_oldest_runnable_job_pending_or_lapsed(
    sessions: sessionmaker[Session],
) -> None:
    """Unchanged by the index-range claim: the oldest runnable job first, whether pending or
    running with a lapsed lease; a leased, a finished or a backed-off job is not claimed; a job
    whose lease lapsed after its last attempt fails (with its frame) on the next claim; pending
    jobs out of attempts (a crashed process's, released at start) fail when the queue starts."""
    statuses = ["done", "running", "running", "pending", "pending", "pending"]
    runs = make_runs(sessions, len(statuses))  # a run each: a run's jobs also wait in turn
    ids = [add_jobs(sessions, r, [s])[0] for r, s in zip(runs, statuses, strict=True)]
    done, _leased, lapsed, waiting, later, exhausted = ids
    with sessions.begin() as session:
        session.execute(
            update(Job).where(Job.id == lapsed).values(lease_until=utcnow() - timedelta(1))
        )
        session.execute(
            update(Job).where(Job.id == waiting).values(lease_until=utcnow() + timedelta(1))
        )
        session.execute(update(Job).where(Job.id == exhausted).values(attempts=5))
    claimed: list[int] = []

    def handler(frame_id: int) -> None:
        claimed.append(frame_id)

    queue = EmbeddedQueue(sessions, handler, max_attempts=5)
    with sessions() as session:
        frame_of = {
            int(r.frame_id): int(r.id) for r in session.execute(select(Job.frame_id, Job.id))
        }
    while queue.run_once():
        pass
    assert [frame_of[f] for f in claimed] == [lapsed, later]  # oldest first; no others
    with sessions.begin() as session:
        session.execute(
            update(Job)
            .where(Job.id == later)
            .values(attempts=5, lease_until=utcnow() - timedelta(seconds=1))
        )
    assert not queue.run_once()  # nothing to run, but the lapsed last attempt is failed
    with sessions() as session:
        status = {int(r.id): str(r.status) for r in session.execute(select(Job.id, Job.status))}
    assert status[later] == "failed"
    assert status[exhausted] == "pending"  # found at start only
    queue.start()
    queue.stop()
    with sessions() as session:
        status = {int(r.id): str(r.status) for r in session.execute(select(Job.id, Job.status))}
        frame_status = session.scalar(
            select(Frame.status).join(Job, Job.frame_id == Frame.id).where(Job.id == exhausted)
        )
    assert (status[exhausted], frame_status) == ("failed", "failed")
    assert (status[done], status[waiting]) == ("done", "pending")


def test_a_runs_jobs_wait_for_its_job_backing_off(sessions: sessionmaker[Session]) -> None:
    """A transient failure's backoff let the run's later frames be analysed first (frames 2, 3,
    then 1), on the wrong history: SED windows, EigenTrack's change score, alert episodes. A
    run's jobs now run in order; another run's go on meanwhile, however many of the waiting
    run's jobs come before them."""
    a, b = make_runs(sessions, 2)
    # more of a's jobs before b's than a claim reads at once: they stalled b's too
    first, second, third, *_ = add_jobs(sessions, a, ["pending"] * 12)
    (other,) = add_jobs(sessions, b, ["pending"])
    with sessions.begin() as session:  # the first one failed and backs off
        session.execute(
            update(Job).where(Job.id == first).values(lease_until=utcnow() + timedelta(hours=1))
        )

    def claim() -> int | None:
        with sessions.begin() as session:
            job = job_store.claim_job(session, "w", timedelta(minutes=5), 5)
            return None if job is None else job.job_id

    assert claim() == other  # run b goes on; a's later jobs wait
    assert claim() is None
    with sessions.begin() as session:  # its backoff over: the first, then the others in turn
        session.execute(update(Job).where(Job.id == first).values(lease_until=None))
    assert claim() == first
    assert claim() is None  # while it runs
    for job_id, then in ((first, second), (second, third)):
        with sessions.begin() as session:
            job_store.finish_frame(session, session.get_one(Job, job_id).frame_id, "done", None)
        assert claim() == then


def test_the_frame_listing_leaves_info_unloaded(sessions: sessionmaker[Session]) -> None:
    """``info`` (up to ``MAX_INFO_BYTES`` a frame) is not part of the listing's answer: it was
    read for every listed row all the same (3.3 s for 60 frames of 8 MB)."""
    (run_id,) = make_runs(sessions, 1)
    FrameCommitter(sessions, EmbeddedQueue(sessions, lambda _: None)).write([frame(run_id, 0)])
    with sessions() as session:
        (listed,) = repo.list_frames(session, run_id, None, 10, 0)
        assert "info" in inspect(listed).unloaded
        assert "layers" not in inspect(listed).unloaded


def test_requeued_frames_run_in_the_order_given_and_count_as_the_runs_backlog(
    sessions: sessionmaker[Session],
) -> None:
    """A re-analysis queues frames analysed before (one job row per frame): their finished
    jobs are replaced and the new ones are claimed in the order given (seq order), whatever
    order the frames were ingested in; the run's backlog counts them until they are done."""
    run_id, other = make_runs(sessions, 2)
    ran: list[int] = []

    def handler(frame_id: int) -> None:
        ran.append(frame_id)
        with sessions.begin() as session:
            job_store.finish_frame(session, frame_id, "done", None)

    queue = EmbeddedQueue(sessions, handler)
    FrameCommitter(sessions, queue).write([frame(run_id, s) for s in (2, 0, 1)] + [frame(other, 0)])
    while queue.run_once():
        pass
    with sessions() as session:
        rows = session.execute(select(Frame.seq, Frame.id).where(Frame.run_id == run_id))
        ids = {int(seq): int(i) for seq, i in rows}
        assert queue.backlog(session, run_id) == 0
    ran.clear()
    with sessions.begin() as session:
        queue.requeue(session, [ids[0], ids[1], ids[2]])
    with sessions() as session:
        assert queue.backlog(session, run_id) == 3
        assert queue.backlog(session, other) == 0
        assert session.scalar(select(func.count()).select_from(Job)) == 4
    while queue.run_once():
        pass
    assert ran == [ids[0], ids[1], ids[2]]
    with sessions() as session:
        assert queue.backlog(session, run_id) == 0
