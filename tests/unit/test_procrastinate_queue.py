"""ProcrastinateQueue and worker configuration.

The first tests need nothing; the ``pg`` ones run in-process against the real PostgreSQL of
``.ci/postgres.sh`` (``SPECTRAWATCH_TEST_POSTGRES_URL``) and skip without it.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from datetime import datetime, timezone

import psycopg
import pytest
from procrastinate.jobs import Job
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from spectrawatch_server.config import ServerSettings
from spectrawatch_server.db import migrate
from spectrawatch_server.db.models import Frame
from spectrawatch_server.db.session import make_engine, make_session_factory
from spectrawatch_server.queue import procrastinate as pq
from spectrawatch_server.queue.base import database_unavailable
from spectrawatch_server.storage import repository as repo
from spectrawatch_server.worker_main import (
    WorkerConfigError,
    check_config,
    is_cuda,
    worker_settings,
)
from tests.servers import fresh_database

POSTGRES_URL = os.environ.get("SPECTRAWATCH_TEST_POSTGRES_URL")
needs_pg = pytest.mark.skipif(
    not POSTGRES_URL, reason='SPECTRAWATCH_TEST_POSTGRES_URL is unset (eval "$(.ci/postgres.sh)")'
)
PG = "postgresql+psycopg://u:p%40ss@db.example:5433/sw"


def make_queue(
    url: str = PG, sessions: sessionmaker[Session] | None = None, **kw: int
) -> pq.ProcrastinateQueue:
    return pq.ProcrastinateQueue(sessions or sessionmaker(), url, lambda _fid: None, **kw)


def test_libpq_dsn_keeps_credentials_and_drops_the_driver() -> None:
    assert pq.libpq_dsn(PG) == "postgresql://u:p%40ss@db.example:5433/sw"
    assert pq.libpq_dsn("postgresql://a@h/d?application_name=w1") == (
        "postgresql://a@h/d?application_name=w1"
    )
    with pytest.raises(pq.QueueNotSupported, match="PostgreSQL"):
        pq.libpq_dsn("sqlite:///x.db")


def test_retry_strategy_is_exponential_and_bounded() -> None:
    queue = make_queue(max_attempts=4, backoff_seconds=3)
    job = Job(
        id=1, queue=pq.ANALYSIS_QUEUE, lock=None, queueing_lock=None, task_name=pq.ANALYSIS_TASK
    )
    before = datetime.now(timezone.utc)
    delays: list[float | None] = []
    for attempts in range(5):
        decision = queue.retry.get_retry_decision(
            exception=OSError("disk"), job=job.evolve(attempts=attempts)
        )
        retry_at = None if decision is None else decision.retry_at
        delays.append(None if retry_at is None else (retry_at - before).total_seconds())
    # backoff ** (attempts + 1) s: 3, 9, 27; then none (4 runs in all), within 1 s of clock drift
    assert [None if d is None else round(d) for d in delays] == [3, 9, 27, None, None]


def _outage() -> sa_exc.OperationalError:
    """What SQLAlchemy raises when PostgreSQL stops or restarts under a session."""
    return sa_exc.OperationalError("SELECT 1", {}, psycopg.OperationalError("connection refused"))


def test_database_outages_are_told_from_analysis_failures() -> None:
    invalidated = sa_exc.DBAPIError("SELECT 1", {}, Exception("EOF"), connection_invalidated=True)
    wrapped = RuntimeError("connector")
    wrapped.__cause__ = psycopg.OperationalError("server closed the connection")
    outages = [_outage(), sa_exc.TimeoutError("QueuePool limit"), invalidated, wrapped]
    assert [database_unavailable(e) for e in outages] == [True] * 4
    failures = [
        OSError("disk"),
        ValueError("bad frame"),
        sa_exc.DBAPIError("SELECT 1", {}, Exception("syntax")),
        sa_exc.IntegrityError("INSERT", {}, Exception("duplicate")),
        # one statement's errors, raised as OperationalError like a lost connection: they
        # would repeat on every retry, so they use the job's attempts
        sa_exc.OperationalError("SELECT", {}, psycopg.errors.QueryCanceled("statement timeout")),
        sa_exc.OperationalError("LOCK", {}, psycopg.errors.LockNotAvailable("lock timeout")),
        sa_exc.OperationalError("UPDATE", {}, psycopg.errors.DeadlockDetected("deadlock")),
    ]
    assert [database_unavailable(e) for e in failures] == [False] * 7
    shutdown = sa_exc.OperationalError("SELECT", {}, psycopg.errors.AdminShutdown("terminating"))
    assert database_unavailable(shutdown) is True


def test_database_outage_is_retried_without_limit_and_noted_for_a_refund() -> None:
    queue = make_queue(max_attempts=2, backoff_seconds=3)
    job = Job(
        id=7, queue=pq.ANALYSIS_QUEUE, lock=None, queueing_lock=None, task_name=pq.ANALYSIS_TASK
    )
    for attempts in (0, 1, 5, 50):  # past max_attempts: an outage does not use attempts up
        decision = queue.retry.get_retry_decision(
            exception=_outage(), job=job.evolve(attempts=attempts)
        )
        assert decision is not None
        assert decision.retry_at is not None
        wait = (decision.retry_at - datetime.now(timezone.utc)).total_seconds()
        assert 3 < wait <= 5  # db_retry_seconds, not the analysis backoff
    assert queue.retry.refunds == {7}
    assert queue.app.job_manager is queue.jobs
    assert queue.jobs.refunds is queue.retry.refunds
    # an analysis failure still counts: none left after the second run
    fail = OSError("disk")
    assert queue.retry.get_retry_decision(exception=fail, job=job.evolve(attempts=1)) is None


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"max_attempts": 0}, "max_attempts"), ({"stall_check_seconds": 60}, "stall_check")],
)
def test_queue_rejects_bad_tuning(kw: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_queue(**kw)


def test_worker_config_rules() -> None:
    ok = ServerSettings(queue="procrastinate", database_url=PG, device="cpu")
    check_config(ok, 4)  # several CPU worker processes are fine
    with pytest.raises(WorkerConfigError, match="one job per GPU"):
        check_config(ok.model_copy(update={"device": "cuda:0"}), 2)
    check_config(ok.model_copy(update={"device": "cuda:1"}), 1)
    with pytest.raises(WorkerConfigError, match="SPECTRAWATCH_QUEUE"):
        check_config(ok.model_copy(update={"queue": "embedded"}), 1)
    with pytest.raises(WorkerConfigError, match="needs PostgreSQL"):
        check_config(ok.model_copy(update={"database_url": "sqlite:///x.db"}), 1)
    with pytest.raises(WorkerConfigError, match="concurrency"):
        check_config(ok, 0)
    assert [is_cuda(d) for d in ("cpu", "cuda", "cuda:3", "auto")] == [False, True, True, True]


def test_worker_opens_the_database_with_the_worker_timeouts() -> None:
    """A `spectrawatch worker` gets WORKER_DB_*_TIMEOUT_SECONDS, not the API's shorter ones."""
    api = ServerSettings(queue="procrastinate", database_url=PG, device="cpu")
    worker = worker_settings(api, "w1@cpu")
    assert (api.db_statement_timeout_seconds, api.db_lock_timeout_seconds) == (10.0, 3.0)
    assert (worker.db_statement_timeout_seconds, worker.db_lock_timeout_seconds) == (300.0, 60.0)
    assert worker.database_url == f"{PG}?application_name=w1%40cpu"
    assert worker.db_pool_timeout_seconds == api.db_pool_timeout_seconds


# --- against a real PostgreSQL ----------------------------------------------------------


@pytest.fixture
def pg_sessions() -> Iterator[sessionmaker[Session]]:
    assert POSTGRES_URL is not None
    with fresh_database(POSTGRES_URL, "sw_unit") as url:
        engine = make_engine(url)
        try:
            migrate.upgrade(engine)
            assert pq.ensure_schema(engine) is True
            assert pq.ensure_schema(engine) is False  # idempotent
            yield make_session_factory(engine)
        finally:
            engine.dispose()


def _frame(session: Session, seq: int) -> Frame:
    project, _ = repo.get_or_create_project(session, "p")
    run, _ = repo.get_or_create_run(session, project, "r", {}, [])
    frame = Frame(
        run_id=run.id,
        kind="weights",
        step=seq,
        seq=seq,
        idempotency_key=f"k{seq}",
        blob_key=f"b{seq}",
        bytes=1,
    )
    return repo.insert_frame(session, frame)


def _jobs(sessions: sessionmaker[Session]) -> list[tuple[int, str, str, str, int]]:
    with sessions() as session:
        rows = session.execute(
            text(
                "SELECT (args->>'frame_id')::int, status::text, lock, queueing_lock, attempts "
                "FROM procrastinate_jobs WHERE queue_name = :q ORDER BY id"
            ),
            {"q": pq.ANALYSIS_QUEUE},
        )
        return [tuple(r) for r in rows]  # type: ignore[misc]


@needs_pg
def test_job_commits_and_rolls_back_with_its_frame(pg_sessions: sessionmaker[Session]) -> None:
    queue = make_queue(str(pg_sessions.kw["bind"].url.render_as_string(False)), pg_sessions)
    with pg_sessions.begin() as session:
        frame = _frame(session, 0)
        queue.enqueue(session, frame.id)
        queue.enqueue(session, frame.id)  # queueing lock: ignored, transaction still usable
        session.execute(text("SELECT 1"))
    with pg_sessions() as session:
        session.begin()
        queue.enqueue(session, _frame(session, 1).id)
        session.rollback()  # as a crash after the inserts, before the commit
    run_lock = f"run:{frame.run_id}"
    assert _jobs(pg_sessions) == [(frame.id, "todo", run_lock, f"frame:{frame.id}", 0)]
    with pg_sessions() as session:
        assert session.scalar(text("SELECT count(*) FROM frame")) == 1
    assert queue.counts() == {"pending": 1, "running": 0, "failed_recent": 0}
    assert queue.alive is False  # no worker heartbeat yet


@needs_pg
def test_stalled_jobs_are_requeued_then_failed_on_the_last_attempt(
    pg_sessions: sessionmaker[Session],
) -> None:
    url = pg_sessions.kw["bind"].url.render_as_string(False)
    queue = make_queue(url, pg_sessions, max_attempts=2)
    with pg_sessions.begin() as session:
        frame_id = _frame(session, 0).id
        queue.enqueue(session, frame_id)

    def die_while_running() -> None:  # what a kill -9 leaves: 'doing', heartbeat long gone
        with pg_sessions.begin() as session:
            worker = session.scalar(
                text("INSERT INTO procrastinate_workers (last_heartbeat) VALUES (:t) RETURNING id"),
                {"t": repo.stale_before(10)},
            )
            session.execute(
                text(
                    "UPDATE procrastinate_jobs SET status = 'doing', worker_id = :w "
                    "WHERE queue_name = :q"
                ),
                {"w": worker, "q": pq.ANALYSIS_QUEUE},
            )

    async def recover() -> list[int]:
        async with queue.app.open_async():
            return await queue.retry_stalled_jobs()

    die_while_running()
    assert len(asyncio.run(recover())) == 1
    (_, status, _, _, attempts) = _jobs(pg_sessions)[0]
    assert (status, attempts) == ("todo", 1)  # re-queued, one attempt used
    die_while_running()
    asyncio.run(recover())
    assert _jobs(pg_sessions)[0][1] == "failed"  # no attempts left: failed, not re-queued
    with pg_sessions() as session:
        assert session.get_one(Frame, frame_id).status == "failed"
    assert queue.counts() == {"pending": 0, "running": 0, "failed_recent": 1}
    assert asyncio.run(recover()) == []


@needs_pg
def test_job_cut_by_database_outages_keeps_its_attempts(
    pg_sessions: sessionmaker[Session],
) -> None:
    """More database outages than JOB_MAX_ATTEMPTS during one frame's analysis: the job is
    retried each time without using an attempt, and the frame is analysed once, not failed."""
    url = pg_sessions.kw["bind"].url.render_as_string(False)
    calls: list[int] = []

    def handler(frame_id: int) -> None:
        calls.append(frame_id)
        if len(calls) <= 3:  # max_attempts = 2
            raise _outage()

    queue = pq.ProcrastinateQueue(
        pg_sessions, url, handler, max_attempts=2, backoff_seconds=1, db_retry_seconds=0
    )
    with pg_sessions.begin() as session:
        frame_id = _frame(session, 0).id
        queue.enqueue(session, frame_id)

    async def work() -> None:
        async with queue.app.open_async():
            await queue.app.run_worker_async(
                queues=[pq.ANALYSIS_QUEUE], wait=False, install_signal_handlers=False
            )

    asyncio.run(work())
    assert calls == [frame_id] * 4  # 3 runs cut by the outage, then one that went through
    (_, status, _, _, attempts) = _jobs(pg_sessions)[0]
    # finishing counts its run too: only the run that went through is counted
    assert (status, attempts) == ("succeeded", 1)
    assert queue.retry.refunds == set()
    with pg_sessions() as session:
        assert session.get_one(Frame, frame_id).status != "failed"


@needs_pg
@pytest.mark.timeout(120)  # the bug this guards against was a hang
@pytest.mark.parametrize("delay", [0.0, 0.001, 0.003, 0.006, 0.05])
def test_worker_stops_on_a_signal_during_start_up(
    pg_sessions: sessionmaker[Session], delay: float
) -> None:
    """SIGTERM while the worker's pool connects (a supervisor killed right after spawning it):
    the worker returns promptly instead of hanging on the pool's retrying connection tasks."""
    queue = make_queue(pg_sessions.kw["bind"].url.render_as_string(False), pg_sessions)

    async def run() -> float:
        loop = asyncio.get_running_loop()
        loop.call_later(delay, os.kill, os.getpid(), signal.SIGTERM)  # handlers are set by then
        started = loop.time()
        await queue.run_worker_async("startup-stop")
        return loop.time() - started

    assert asyncio.run(run()) < 10
    assert queue.app.connector._async_pool is None  # closed, so nothing keeps reconnecting


@pytest.mark.gpu
def test_supervisor_refuses_to_spawn_after_cuda_init() -> None:
    import torch

    from spectrawatch_server.worker_main import _refuse_if_cuda_initialised

    torch.zeros(1, device="cuda")
    with pytest.raises(WorkerConfigError, match="CUDA is initialised"):
        _refuse_if_cuda_initialised()
