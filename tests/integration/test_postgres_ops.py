"""PostgreSQL operations against a real PostgreSQL (``.ci/postgres.sh``; skipped without
``SPECTRAWATCH_TEST_POSTGRES_URL``): what the API answers when the database is busy, the cost
of ``/health``, readiness, and how workers come back after an outage.

The API runs in-process (``TestClient``) on its own fresh database; the locks, finished jobs
and outages are real PostgreSQL ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session

from spectrawatch.config import ClientSettings
from spectrawatch_server.api.routes.blobs import prune_expired
from spectrawatch_server.app import create_app, reconcile_blobs
from spectrawatch_server.config import ServerSettings
from spectrawatch_server.db import migrate
from spectrawatch_server.db.models import Frame
from spectrawatch_server.db.session import make_engine, make_session_factory
from spectrawatch_server.queue import procrastinate as pq
from spectrawatch_server.queue.base import database_unavailable
from spectrawatch_server.queue.embedded import EmbeddedQueue
from spectrawatch_server.storage import job_store
from spectrawatch_server.storage import repository as repo
from tests.factories import make_run, post_frame, weight_frame
from tests.integration.test_faults import PrivatePostgres
from tests.servers import free_port, fresh_database, url_rows, wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not os.environ.get("SPECTRAWATCH_TEST_POSTGRES_URL"),
        reason='SPECTRAWATCH_TEST_POSTGRES_URL is unset (eval "$(.ci/postgres.sh)")',
    ),
]


@pytest.fixture
def pg_url() -> Iterator[str]:
    base = os.environ["SPECTRAWATCH_TEST_POSTGRES_URL"]
    with fresh_database(base, "sw_ops") as url:
        yield url


def settings(url: str, data_dir: Path, **values: object) -> ServerSettings:
    return ServerSettings(
        data_dir=data_dir,
        database_url=url,
        run_worker=False,
        run_webhooks=False,
        **values,  # type: ignore[arg-type]
    )


def api(app_settings: ServerSettings) -> TestClient:
    return TestClient(create_app(app_settings), base_url="http://127.0.0.1")


class TableLock:
    """``LOCK TABLE ... ACCESS EXCLUSIVE`` held by another connection until ``release()``: every
    statement that touches the table waits, as behind a long migration or a stuck writer."""

    def __init__(self, url: str, table: str) -> None:
        self._releasing = threading.Lock()
        self.engine = create_engine(url)
        self.conn = self.engine.connect()
        self.conn.execute(text(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))

    def release(self) -> None:
        """Idempotent and thread-safe (a timer thread and the test's ``finally`` both call it)."""
        with self._releasing:
            if self.conn.closed:
                return
            self.conn.rollback()
            self.conn.close()
            self.engine.dispose()


def get_while_locked(client: TestClient, url: str, path: str) -> tuple[Any, float]:
    """``GET path`` while another connection holds the ``project`` table locked (released after
    30 s at the latest, longer than the client waits): the response and its seconds."""
    lock = TableLock(url, "project")
    released = threading.Timer(30, lock.release)
    released.start()
    try:
        started = time.monotonic()
        resp = client.get(path)
        return resp, time.monotonic() - started
    finally:
        released.cancel()
        lock.release()


# --- 1. a busy database answers 503 database_busy before the client gives up ---------------


def test_request_blocked_on_a_lock_answers_503_before_the_client_times_out(
    pg_url: str, tmp_path: Path
) -> None:
    """A table locked for longer than the client waits: the request answers 503
    ``database_busy`` with ``Retry-After`` within the client's request timeout (default
    settings), instead of holding its connection as long as the lock lasts."""
    defaults = settings(pg_url, tmp_path)
    client_timeout = ClientSettings().timeout_s
    assert defaults.db_pool_timeout_seconds < client_timeout
    assert defaults.db_lock_timeout_seconds < client_timeout
    with api(defaults) as client:
        assert client.post("/api/v1/projects", json={"name": "p"}).status_code == 201
        engine = client.app.state.spectrawatch.engine  # type: ignore[attr-defined]
        assert engine.pool.timeout() == defaults.db_pool_timeout_seconds
        resp, elapsed = get_while_locked(client, pg_url, "/api/v1/projects")
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["code"] == "database_busy"
        assert "lock" in resp.json()["error"]["message"]
        assert resp.headers["Retry-After"].isdigit()
        assert elapsed < client_timeout
        assert client.get("/api/v1/projects").status_code == 200  # and fine once it is released


def test_statement_timeout_answers_503_database_busy(pg_url: str, tmp_path: Path) -> None:
    """A statement past SPECTRAWATCH_DB_STATEMENT_TIMEOUT_SECONDS (here waiting on a lock with
    no lock timeout): 503 ``database_busy`` naming the statement, not ``database_unavailable``."""
    app_settings = settings(
        pg_url, tmp_path, db_statement_timeout_seconds=1.0, db_lock_timeout_seconds=0
    )
    with api(app_settings) as client:
        lock = TableLock(pg_url, "project")
        released = threading.Timer(15, lock.release)  # without the timeout, the request waits
        released.start()
        try:
            started = time.monotonic()
            resp = client.get("/api/v1/projects")
            elapsed = time.monotonic() - started
        finally:
            released.cancel()
            lock.release()
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["code"] == "database_busy"
        assert "statement" in resp.json()["error"]["message"]
        assert resp.headers["Retry-After"].isdigit()
        assert elapsed < 5
        with client.app.state.spectrawatch.sessions() as session:  # type: ignore[attr-defined]
            assert session.scalar(text("SHOW statement_timeout")) == "1s"
            assert session.scalar(text("SHOW lock_timeout")) == "0"


def test_sweeps_are_not_cut_by_the_api_timeouts(pg_url: str, tmp_path: Path) -> None:
    """The start-up blob reconciliation and the retention sweep read or update every frame:
    behind a lock held longer than DB_LOCK_TIMEOUT_SECONDS they wait for it instead of failing
    every time (the sweep would then never prune), as migrations do."""
    with api(settings(pg_url, tmp_path, db_lock_timeout_seconds=0.5)) as client:
        state = client.app.state.spectrawatch  # type: ignore[attr-defined]
        for sweep in (lambda: reconcile_blobs(state, 0.0), lambda: prune_expired(state, 1.0)):
            lock = TableLock(pg_url, "frame")
            released = threading.Timer(2, lock.release)
            released.start()
            try:
                started = time.monotonic()
                assert sweep() == 0
                assert time.monotonic() - started > 1.5  # it waited for the lock
            finally:
                released.cancel()
                lock.release()
        assert client.get("/api/v1/runs").status_code == 200  # requests keep theirs


def test_engine_adds_the_timeouts_after_the_urls_own_options(pg_url: str) -> None:
    """``?options=...`` in SPECTRAWATCH_DATABASE_URL is kept; the timeouts are added to it."""
    url = f"{pg_url}?options=-c%20application_name%3Dx"
    engine = make_engine(url, statement_timeout=300, lock_timeout=60)
    try:
        with engine.connect() as conn:
            assert conn.scalar(text("SHOW statement_timeout")) == "5min"
            assert conn.scalar(text("SHOW lock_timeout")) == "1min"
            assert conn.scalar(text("SHOW application_name")) == "x"
    finally:
        engine.dispose()


def test_embedded_worker_runs_under_the_worker_timeouts(pg_url: str, tmp_path: Path) -> None:
    """``spectrawatch server`` with its in-process worker on PostgreSQL: the worker's claims
    and analysis writes run on connections with WORKER_DB_STATEMENT/LOCK_TIMEOUT_SECONDS
    (300 s, 60 s), the API's requests on the API's (10 s, 3 s); the worker shared the API's."""
    embedded = ServerSettings(data_dir=tmp_path, database_url=pg_url, run_webhooks=False)
    with api(embedded) as client:
        state = client.app.state.spectrawatch  # type: ignore[attr-defined]
        assert state.queue.alive
        assert timeouts_of(state.sessions) == ("10s", "3s")
        assert timeouts_of(state.worker.sessions) == ("5min", "1min")  # the analysis writes
        assert timeouts_of(state.queue.worker_sessions) == ("5min", "1min")  # the job claims


# --- 1b. PgBouncer in transaction pooling mode ------------------------------------------------


@contextlib.contextmanager
def pgbouncer(url: str) -> Iterator[str]:
    """A real PgBouncer in transaction pooling mode in front of ``url``'s server, with ONE
    server connection: every transaction of every client runs on it, in turn. Default
    ``ignore_startup_parameters`` (none): a client sending libpq ``options`` is refused."""
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not os.path.exists(binary):
        pytest.skip("pgbouncer is not installed (.ci/postgres.sh installs it as root)")
    with tempfile.TemporaryDirectory(prefix="sw-pgbouncer-") as tmp:  # readable by its account
        yield from _pgbouncer(binary, make_url(url), Path(tmp))


def _pgbouncer(binary: str, target: URL, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    (tmp_path / "users.txt").write_text(f'"{target.username}" "{target.password}"\n')
    (tmp_path / "pgbouncer.ini").write_text(
        f"[databases]\n* = host={target.host} port={target.port}\n"
        f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = plain\nauth_file = {tmp_path / 'users.txt'}\npool_mode = transaction\n"
        "default_pool_size = 1\nmax_client_conn = 50\n"
        # after every transaction the server connection forgets its session state, prepared
        # statements included, as when the next transaction gets another server connection:
        # a client relying on a statement it prepared earlier fails
        "server_reset_query = DISCARD ALL\nserver_reset_query_always = 1\n"
    )
    as_root = os.geteuid() == 0  # PgBouncer refuses to run as root: the package's account
    if as_root:
        shutil.chown(tmp_path, "postgres")
        for name in ("users.txt", "pgbouncer.ini"):
            shutil.chown(tmp_path / name, "postgres")
    runas = ["runuser", "-u", "postgres", "--"] if as_root else []
    proc = subprocess.Popen(
        [*runas, binary, str(tmp_path / "pgbouncer.ini")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        proxied = target.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)

        def answers() -> bool:
            with contextlib.suppress(sa_exc.OperationalError):
                engine = create_engine(proxied)
                try:
                    with engine.connect() as conn:
                        return conn.scalar(text("SELECT 1")) == 1
                finally:
                    engine.dispose()
            return False

        wait_until(answers, timeout=20)
        yield proxied
    finally:
        proc.terminate()
        proc.wait(10)


def timeouts_of(sessions: Callable[[], Session]) -> tuple[str | None, str | None]:
    with sessions() as session:
        return (
            session.scalar(text("SHOW statement_timeout")),
            session.scalar(text("SHOW lock_timeout")),
        )


def test_timeouts_hold_through_pgbouncer_in_transaction_pooling_mode(
    pg_url: str, tmp_path: Path
) -> None:
    """SPECTRAWATCH_DB_TRANSACTION_POOLING=true behind a real PgBouncer (transaction mode, one
    server connection shared by the API's and the embedded worker's engines): each transaction
    runs under its own engine's timeouts (the startup packet's ``options`` were refused or
    dropped by the pooler: no timeout at all), and a request blocked on a lock answers 503
    ``database_busy`` within the client's timeout. (That no statement is prepared server-side
    is the next test's: this one runs too few of each to reach psycopg's prepare threshold.)"""
    with pgbouncer(pg_url) as proxied:
        app_settings = ServerSettings(
            data_dir=tmp_path / "data",
            database_url=proxied,
            db_transaction_pooling=True,
            run_webhooks=False,
        )
        with api(app_settings) as client:
            state = client.app.state.spectrawatch  # type: ignore[attr-defined]
            for _ in range(4):  # alternately, on the one server connection
                assert timeouts_of(state.sessions) == ("10s", "3s")
                assert timeouts_of(state.worker.sessions) == ("5min", "1min")
                assert client.post("/api/v1/projects", json={"name": "p"}).status_code < 300
                assert client.get("/api/v1/projects").status_code == 200
            with state.sessions.begin() as session:  # a sweep lifts them for its transaction
                migrate.lift_timeouts(session.connection())
                assert session.scalar(text("SHOW statement_timeout")) == "0"
            assert timeouts_of(state.sessions) == ("10s", "3s")  # and only for it
            # locked directly: the pooler's one server connection stays free
            resp, elapsed = get_while_locked(client, pg_url, "/api/v1/projects")
            assert resp.status_code == 503, resp.text
            assert resp.json()["error"]["code"] == "database_busy"
            assert elapsed < ClientSettings().timeout_s
            assert client.get("/api/v1/projects").status_code == 200


def test_startup_behind_pgbouncer_without_the_pooling_setting_says_what_to_set(
    pg_url: str, tmp_path: Path
) -> None:
    """Behind PgBouncer in transaction mode without ``DB_TRANSACTION_POOLING``, the timeouts'
    startup ``options`` are refused: the start-up check opens the database as the server will,
    so the operator gets one line naming the setting (it was a 178-line traceback after the
    "serving on" banner); with the setting it passes."""
    from spectrawatch_server import startup

    with pgbouncer(pg_url) as proxied:
        with pytest.raises(startup.StartupError) as refused:
            startup.check_database(proxied, statement_timeout=10.0, lock_timeout=3.0)
        assert "unsupported startup parameter" in str(refused.value)
        assert "SPECTRAWATCH_DB_TRANSACTION_POOLING=true" in str(refused.value)
        startup.check_database(
            proxied, statement_timeout=10.0, lock_timeout=3.0, transaction_pooling=True
        )


def test_procrastinate_api_works_through_pgbouncer_in_transaction_pooling_mode(
    pg_url: str, tmp_path: Path
) -> None:
    """The API of the procrastinate queue behind PgBouncer (transaction mode, one server
    connection) with SPECTRAWATCH_DB_TRANSACTION_POOLING: each frame is accepted and its
    analysis job deferred in the frame's own transaction, more times than psycopg's prepare
    threshold (5), so neither the API nor procrastinate's defer uses a server-side prepared
    statement; a repeated frame is answered from its idempotency key, not queued twice.
    (Workers connect directly: procrastinate LISTENs, which a transaction pooler cannot carry.)"""
    frames = 8
    with pgbouncer(pg_url) as proxied:
        app_settings = settings(
            proxied, tmp_path / "data", queue="procrastinate", db_transaction_pooling=True
        )
        with TestClient(create_app(app_settings), base_url="http://127.0.0.1/api/v1") as client:
            run_id = make_run(client)
            for seq in range(frames):
                resp = post_frame(client, run_id, weight_frame(seq, seq), seq=seq)
                assert resp.status_code == 202, resp.text
            again = post_frame(client, run_id, weight_frame(0, 0), seq=0)
            assert again.status_code in (200, 202), again.text
            assert client.get(f"/runs/{run_id}").status_code == 200
    queued = url_rows(
        pg_url, "SELECT count(*) FROM procrastinate_jobs WHERE queue_name = :q", q=pq.ANALYSIS_QUEUE
    )
    assert queued == [(frames,)]


# --- 2. /health counts what it shows, not the whole job history ------------------------------

FINISHED_JOBS = 200_000


def insert_jobs(url: str, finished: int) -> None:
    """``finished`` succeeded analysis jobs (a long-lived deployment's history), then 2 failed,
    3 waiting and 1 running ones, and fresh planner statistics (as autovacuum keeps them)."""
    engine = create_engine(url)
    jobs = (
        "INSERT INTO procrastinate_jobs (queue_name, task_name, args, status, attempts) "
        "SELECT :queue, :task, jsonb_build_object('frame_id', g), "
        "CAST(:status AS procrastinate_job_status), 1 FROM generate_series(1, :n) AS g"
    )
    with engine.begin() as conn:
        for status, n in (("succeeded", finished), ("failed", 2), ("todo", 3), ("doing", 1)):
            conn.execute(
                text(jobs),
                {"queue": pq.ANALYSIS_QUEUE, "task": pq.ANALYSIS_TASK, "status": status, "n": n},
            )
    with engine.connect() as conn:
        conn.execute(text("ANALYZE procrastinate_jobs"))
        conn.commit()
    engine.dispose()


def test_health_job_counts_do_not_read_the_finished_jobs(pg_url: str, tmp_path: Path) -> None:
    """With 200,000 finished analysis jobs, the health counts read the waiting and running
    jobs and the latest RECENT_JOBS only (PostgreSQL's own per-transaction table statistics);
    they counted every job ever with ``GROUP BY status`` (PostgreSQL fault audit)."""
    with api(settings(pg_url, tmp_path, queue="procrastinate")) as client:
        insert_jobs(pg_url, FINISHED_JOBS)
        jobs = client.get("/api/v1/health").json()["queue"]["jobs"]
        assert jobs == {"pending": 3, "running": 1, "failed_recent": 2}
        # a backend of its own: since PostgreSQL 15 a backend flushes its table statistics at
        # most once a second, so a pooled one's view of "this transaction" may still hold the
        # scans of its earlier ones (the API's start-up, /health itself)
        engine = create_engine(pg_url)
        try:
            with Session(engine) as session:
                assert pq.analysis_job_counts(session) == jobs
                read = session.execute(
                    text(
                        "SELECT seq_scan, seq_tup_read, idx_tup_fetch "
                        "FROM pg_stat_xact_user_tables WHERE relname = 'procrastinate_jobs'"
                    )
                ).one()
        finally:
            engine.dispose()
        assert read.seq_scan == 0
        assert read.seq_tup_read == 0
        assert read.idx_tup_fetch <= 3 * job_store.RECENT_JOBS  # against 200,000 finished


# --- 3. readiness: 503 without a worker, /health stays the status report --------------------


def test_ready_is_503_until_a_worker_heartbeats(pg_url: str, tmp_path: Path) -> None:
    """Scale-out API with no ``spectrawatch worker``: ``/ready`` answers 503 (``/health`` 200
    with ``worker.running: false`` as before, where the truth was only in the body); once a
    worker registers with procrastinate it is ready; when that worker leaves, 503 again."""
    app_settings = settings(pg_url, tmp_path, queue="procrastinate", worker_stalled_seconds=5)
    with api(app_settings) as client:
        health = client.get("/api/v1/health")
        assert health.status_code == 200
        assert health.json()["worker"]["running"] is False
        resp = client.get("/api/v1/ready")
        assert resp.status_code == 503, resp.text
        assert resp.headers["Retry-After"].isdigit()
        body = resp.json()
        assert body["ready"] is False
        assert body["checks"]["database"] == "ok"
        assert "no worker heartbeat in the last 5 s" in body["checks"]["worker"]

        queue = client.app.state.spectrawatch.queue  # type: ignore[attr-defined]

        async def register() -> int:
            async with queue.app.open_async():
                return int(await queue.jobs.register_worker())

        async def unregister(worker_id: int) -> None:
            async with queue.app.open_async():
                await queue.jobs.unregister_worker(worker_id)

        worker_id = asyncio.run(register())  # what a starting worker does
        resp = client.get("/api/v1/ready")
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"ready": True, "checks": {"database": "ok", "worker": "ok"}}
        asyncio.run(unregister(worker_id))
        assert client.get("/api/v1/ready").status_code == 503


# --- 4. a worker is back within seconds of the database ---------------------------------------


def test_reconnect_delay_is_capped_and_jittered() -> None:
    rng = random.Random(0)
    delays = [[pq.reconnect_delay(n, rng) for n in range(40)] for _ in range(50)]
    assert all(0.25 <= d <= 5.0 for row in delays for d in row)
    assert all(d >= 2.5 for row in delays for d in row[4:])  # never hammering once capped
    assert len({round(row[10], 6) for row in delays}) == 50  # workers do not retry in step


@pytest.fixture
def private_postgres() -> Iterator[tuple[PrivatePostgres, str]]:
    pg = PrivatePostgres()
    try:
        url = pg.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        pg.clean()
        pytest.skip(f"PostgreSQL cannot be started here: {exc}")
    try:
        yield pg, url
    finally:
        pg.clean()


OUTAGE_SECONDS = 20.0


@pytest.mark.slow
def test_worker_is_back_within_seconds_of_the_database(
    private_postgres: tuple[PrivatePostgres, str], caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL stopped 20 s under a worker: the worker retries at most 5 s apart and
    heartbeats again within a few seconds of the restart. Its backoff doubled up to 30 s and
    procrastinate's pool waited 30 s with its own backoff: 6-18 s late (PostgreSQL audit)."""
    pg, url = private_postgres
    engine = make_engine(url)
    migrate.upgrade(engine)
    pq.ensure_schema(engine)
    engine.dispose()
    sessions = make_session_factory(make_engine(url))
    queue = pq.ProcrastinateQueue(sessions, url, lambda _fid: None, heartbeat_seconds=0.5)
    watcher = create_engine(url, connect_args={"connect_timeout": 2})

    def heartbeats_since(moment: object) -> int:
        with watcher.connect() as conn:
            return int(
                conn.scalar(
                    text("SELECT count(*) FROM procrastinate_workers WHERE last_heartbeat > :t"),
                    {"t": moment},
                )
                or 0
            )

    result: dict[str, float] = {}

    def outage() -> None:
        try:
            with watcher.connect() as conn:
                started = conn.scalar(text("SELECT now()"))
            wait_until(lambda: heartbeats_since(started) > 0, timeout=60)
            pg.stop()
            watcher.dispose()
            time.sleep(OUTAGE_SECONDS)
            pg.start()
            up = time.monotonic()
            with watcher.connect() as conn:
                back = conn.scalar(text("SELECT now()"))
            wait_until(lambda: heartbeats_since(back) > 0, timeout=60, interval=0.1)
            result["back_after"] = time.monotonic() - up
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # the worker's own stop signal

    control = threading.Thread(target=outage)
    control.start()
    with caplog.at_level(logging.WARNING, logger=pq.__name__):
        queue.run_worker("outage-worker")
    control.join()
    watcher.dispose()
    sessions.kw["bind"].dispose()
    delays = [
        float(r.getMessage().rsplit(" in ", 1)[1].split()[0])
        for r in caplog.records
        if "reconnecting to the database in" in r.getMessage()
    ]
    assert len(delays) >= 4  # it kept trying during the outage, ...
    assert max(delays) <= 5.0  # ... never more than 5 s apart
    assert result["back_after"] < 7.0  # 5 s at most + a connection + one heartbeat


# --- 5. a statement timeout in one job uses its attempts; an outage does not -----------------


def test_outages_are_told_from_one_statements_errors_by_sqlstate(pg_url: str) -> None:
    """Real PostgreSQL errors: a statement timeout and a lock timeout are the statement's
    (psycopg and SQLAlchemy raise them as OperationalError, like a lost connection); a
    terminated connection is an outage."""
    engine = make_engine(pg_url, statement_timeout=0.2, lock_timeout=0.2)
    errors: list[BaseException] = []
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE project (id int)"))
    try:
        with engine.connect() as conn:
            try:
                conn.execute(text("SELECT pg_sleep(2)"))
            except sa_exc.OperationalError as exc:
                errors.append(exc)
        lock = TableLock(pg_url, "project")
        try:
            with engine.connect() as conn:
                conn.execute(text("SET statement_timeout = 0"))
                try:
                    conn.execute(text("SELECT * FROM project"))
                except sa_exc.OperationalError as exc:
                    errors.append(exc)
        finally:
            lock.release()
        with engine.connect() as conn:
            try:
                conn.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
            except sa_exc.OperationalError as exc:
                outage = exc
    finally:
        engine.dispose()
    assert [type(e.orig).__name__ for e in errors] == [  # type: ignore[attr-defined]
        "QueryCanceled",
        "LockNotAvailable",
    ]
    assert [database_unavailable(e) for e in errors] == [False, False]
    assert database_unavailable(outage) is True


@contextlib.contextmanager
def slow_statement_handler(url: str, calls: list[int]) -> Iterator[Callable[[int], None]]:
    """A job body whose query always runs past the statement timeout (a real QueryCanceled),
    for the first 5 runs: without a bound it would be retried as an outage for ever."""
    engine = make_engine(url, statement_timeout=0.1)

    def handler(frame_id: int) -> None:
        calls.append(frame_id)
        if len(calls) <= 5:
            with engine.connect() as conn:
                conn.execute(text("SELECT pg_sleep(1)"))

    try:
        yield handler
    finally:
        engine.dispose()


def add_frame(session: Session) -> int:
    project, _ = repo.get_or_create_project(session, "p")
    run, _ = repo.get_or_create_run(session, project, "r", {}, [])
    frame = Frame(
        run_id=run.id, kind="weights", step=0, seq=0, idempotency_key="k", blob_key="b", bytes=1
    )
    return repo.insert_frame(session, frame).id


def test_statement_timeout_in_a_procrastinate_job_uses_its_attempts(
    pg_url: str, tmp_path: Path
) -> None:
    with api(settings(pg_url, tmp_path, queue="procrastinate")) as client:
        state = client.app.state.spectrawatch  # type: ignore[attr-defined]
        calls: list[int] = []
        with slow_statement_handler(pg_url, calls) as handler:
            queue = pq.ProcrastinateQueue(
                state.sessions,
                pg_url,
                handler,
                max_attempts=2,
                backoff_seconds=0,
                db_retry_seconds=0,
            )
            with state.sessions.begin() as session:
                frame_id = add_frame(session)
                queue.enqueue(session, frame_id)

            async def work() -> None:
                async with queue.app.open_async():
                    await queue.app.run_worker_async(
                        queues=[pq.ANALYSIS_QUEUE], wait=False, install_signal_handlers=False
                    )

            asyncio.run(work())
        assert calls == [frame_id] * 2  # two attempts, then failed (was: retried as an outage)
        assert queue.counts()["failed_recent"] == 1
        with state.sessions() as session:
            frame = session.get_one(Frame, frame_id)
            assert frame.status == "failed"
            assert "QueryCanceled" in (frame.error or "")


def test_statement_timeout_in_an_embedded_job_uses_its_attempts(
    pg_url: str, tmp_path: Path
) -> None:
    with api(settings(pg_url, tmp_path)) as client:
        state = client.app.state.spectrawatch  # type: ignore[attr-defined]
        calls: list[int] = []
        with slow_statement_handler(pg_url, calls) as handler:
            queue = EmbeddedQueue(state.sessions, handler, max_attempts=2)
            with state.sessions.begin() as session:
                frame_id = add_frame(session)
                queue.enqueue(session, frame_id)
            for _ in range(8):
                with contextlib.suppress(sa_exc.OperationalError):  # an outage is re-raised
                    queue.run_once()
        assert calls == [frame_id] * 2
        with state.sessions() as session:
            frame = session.get_one(Frame, frame_id)
            assert frame.status == "failed"
            assert "QueryCanceled" in (frame.error or "")
