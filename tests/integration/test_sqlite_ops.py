"""SQLite operations against a real SQLite file: what the API answers while another connection
holds the database's write lock, and what a real client does with that answer.

SQLite has one write lock per database. ``spectrawatch compact``, an admin command, or the
embedded worker's analysis write may hold it; a request waiting for it must answer
``503 database_busy`` (``Retry-After``) well within the client's request timeout, as a
PostgreSQL lock timeout does (``test_postgres_ops.py``), instead of waiting out a 30 s busy
timeout the client has long given up on.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, text
from sqlalchemy.orm import Session, sessionmaker

import spectrawatch
from spectrawatch.config import ClientSettings
from spectrawatch_server.app import create_app
from spectrawatch_server.config import ServerSettings
from spectrawatch_server.db.session import FREE_PAGES_PER_STEP, make_engine, release_free_pages
from tests.servers import ServerProcess, embedded_only, wait_until
from tests.training import Loop, frames_of
from tests.training import client_settings as _client_settings

pytestmark = [pytest.mark.integration, embedded_only("the SQLite write lock")]

PORT = 18301


class WriteLock:
    """``BEGIN IMMEDIATE`` on another connection: SQLite's write lock is held until
    :meth:`release` (readers go on: WAL), as by a long writer."""

    def __init__(self, path: Path) -> None:
        self._releasing = threading.Lock()
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        """Idempotent and thread-safe (a timer thread and the test's ``finally`` both call it)."""
        with self._releasing, contextlib.suppress(sqlite3.ProgrammingError):  # closed already
            self.conn.rollback()
            self.conn.close()


@contextlib.contextmanager
def write_locked(path: Path, seconds: float) -> Iterator[WriteLock]:
    """The write lock for at most ``seconds`` (longer than the client waits) or the block."""
    lock = WriteLock(path)
    released = threading.Timer(seconds, lock.release)
    released.start()
    try:
        yield lock
    finally:
        released.cancel()
        lock.release()


def test_request_waiting_for_the_write_lock_answers_503_before_the_client_times_out(
    tmp_path: Path,
) -> None:
    """Default settings: a write waiting for SQLite's lock answers 503 ``database_busy`` with
    ``Retry-After`` within the client's request timeout (it waited up to 30 s, then answered
    ``database_unavailable`` as for an outage); reads go on; the write succeeds once the lock is
    released."""
    settings = ServerSettings(data_dir=tmp_path, run_worker=False, run_webhooks=False)
    client_timeout = ClientSettings().timeout_s
    assert settings.db_lock_timeout_seconds < client_timeout
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        assert client.post("/api/v1/projects", json={"name": "p"}).status_code == 201
        database = settings.sqlite_path
        assert database is not None
        with write_locked(database, 20):
            started = time.monotonic()
            resp = client.post("/api/v1/projects", json={"name": "q"})
            elapsed = time.monotonic() - started
            assert client.get("/api/v1/projects").status_code == 200  # WAL: readers go on
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["code"] == "database_busy"
        assert "lock" in resp.json()["error"]["message"]
        assert resp.headers["Retry-After"].isdigit()
        assert settings.db_lock_timeout_seconds - 0.5 < elapsed < client_timeout
        assert client.post("/api/v1/projects", json={"name": "q"}).status_code == 201


def test_batches_are_validated_before_the_write_lock_is_taken(tmp_path: Path) -> None:
    """Scalar and metric batches took the write lock in a dependency, before FastAPI validated
    their bodies (99,900 metric rows: 1-1.75 s of validation under the lock, a refused batch
    too). Now the route takes it once the batch is checked: a batch refused for its size or a
    bad row answers so while another writer holds the lock (it waited for the lock, then
    answered 503); a valid one still waits for it (503 ``database_busy``) and stores nothing."""
    settings = ServerSettings(
        data_dir=tmp_path,
        run_worker=False,
        run_webhooks=False,
        max_scalars_per_batch=100,
        max_metrics_per_batch=100,
        db_lock_timeout_seconds=1,
    )
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        run_id = client.post("/api/v1/runs", json={"project": "p", "name": "r"}).json()["id"]
        metrics, scalars = f"/api/v1/runs/{run_id}/metrics", f"/api/v1/runs/{run_id}/scalars"
        rows = [{"step": s, "layer": "l0", "name": "m", "value": 1.0} for s in range(101)]
        points = [{"step": s, "name": "loss", "value": 1.0} for s in range(101)]
        refused = [
            (metrics, {"rows": rows}, 413),
            (metrics, {"rows": [*rows[:99], {"step": -1, "layer": "l0", "name": "m"}]}, 422),
            (scalars, points, 413),
            (scalars, [*points[:99], {"step": 1, "name": "", "value": 1.0}], 422),
        ]
        database = settings.sqlite_path
        assert database is not None
        with write_locked(database, 20):
            for path, body, code in refused:
                resp = client.post(path, json=body)
                assert resp.status_code == code, (path, code, resp.text[:200])
            busy = client.post(metrics, json={"rows": rows[:10]})
            assert busy.json()["error"]["code"] == "database_busy"
        assert client.get(f"/api/v1/runs/{run_id}/frames").json() == []
        assert client.post(metrics, json={"rows": rows[:10]}).status_code == 202


def test_embedded_worker_waits_for_the_lock_with_the_worker_timeout(tmp_path: Path) -> None:
    """The in-process worker's connections wait WORKER_DB_LOCK_TIMEOUT_SECONDS (60 s) for the
    write lock, the API's DB_LOCK_TIMEOUT_SECONDS (3 s): an analysis write queued behind ingest
    must not fail after a request's timeout."""
    settings = ServerSettings(data_dir=tmp_path, run_webhooks=False)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        state = client.app.state.spectrawatch  # type: ignore[attr-defined]
        assert state.queue.alive

        def busy_ms(sessions: sessionmaker[Session]) -> int | None:
            with sessions() as session:
                return session.scalar(text("PRAGMA busy_timeout"))

        assert busy_ms(state.sessions) == 3_000
        assert busy_ms(state.worker.sessions) == 60_000  # the analysis writes
        assert busy_ms(state.queue.worker_sessions) == 60_000  # the job claims


@pytest.mark.slow
def test_client_backs_off_on_database_busy_and_loses_nothing(tmp_path: Path) -> None:
    """A real server and a real training loop; the SQLite write lock is held, longer than the
    client's request timeout, until the client has spooled (at most 40 s): the client gets
    ``503 database_busy`` (not a timeout of its own), spools and retries after ``Retry-After``,
    and every frame and scalar arrives once, in order; the training loop's steps are never
    held up. (A lock of a fixed 12 s could end before the second 503 under load: no spool.)"""
    srv = ServerProcess(tmp_path / "server", port=PORT).start()
    m = spectrawatch.Monitor()
    try:
        run_settings = _client_settings(
            tmp_path, srv.url, "busy", project="ops", flush_timeout_s=120.0
        )
        m.init(**run_settings)
        loop = Loop(m)
        loop.run(10, pause=0.005)
        assert m.wait_idle(30)
        with write_locked(tmp_path / "server" / "spectrawatch.db", 40):
            loop.run_for(10.0, pause=0.04)
            # 503 after the 3 s lock timeout, a retry after Retry-After: 5 s, 503 again, spooled
            wait_until(lambda: "503 database_busy" in (m.stats.last_error or ""), timeout=15)
            wait_until(lambda: m.stats.get("spooled_frames") > 0, timeout=25)
        assert "database busy: timed out waiting for lock" in srv.log_path.read_text()
        assert m.stats.get("spooled_frames") > 0
        assert max(loop.times) < 1.0  # the sender thread waited, never the loop
        loop.run(10, pause=0.005)
        assert m.finish(timeout=120)
        assert m._sender is not None
        assert isinstance(m.run_id, int)
        base = m._sender._seq_base or 0
        sent = list(range(base, base + m._sender._seq_next))
        frames = sorted(frames_of(srv.url, m.run_id), key=lambda f: f["id"])
        assert [f["seq"] for f in frames] == sent  # each once, in order
        assert m.stats.get("dropped_frames") == 0
        with httpx.Client(base_url=f"{srv.url}/api/v1", timeout=30) as api:
            series = api.get(f"/runs/{m.run_id}/scalars", params={"name": "loss"}).json()
        assert [len(s["steps"]) for s in series if s["name"] == "loss"] == [loop.step]
    finally:
        m.finish(status="crashed", timeout=5)
        srv.stop()


def sqlite_pragmas(path: Path) -> dict[str, int]:
    """``auto_vacuum``, ``page_count`` and ``freelist_count`` as a fresh connection sees them."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return {
            name: int(db.execute(f"PRAGMA {name}").fetchone()[0])
            for name in ("auto_vacuum", "page_count", "freelist_count")
        }


def test_deleting_a_run_gives_its_pages_back_to_the_file_system(tmp_path: Path) -> None:
    """A new database uses ``auto_vacuum=INCREMENTAL``, and deleting a run gives its pages
    back (the file kept them free inside it until ``spectrawatch compact``); the other run's
    rows stay."""
    settings = ServerSettings(data_dir=tmp_path, run_worker=False, run_webhooks=False)
    database = tmp_path / "spectrawatch.db"
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        ids = [
            client.post("/api/v1/runs", json={"project": "p", "name": name}).json()["id"]
            for name in ("keep", "gone")
        ]
        for run_id in ids:
            rows = [
                {"step": step, "name": f"loss.{k}", "value": 0.5}
                for step in range(2000)
                for k in range(10)
            ]
            assert client.post(f"/api/v1/runs/{run_id}/scalars", json=rows).is_success
        full = sqlite_pragmas(database)
        assert full["auto_vacuum"] == 2  # INCREMENTAL
        assert client.delete(f"/api/v1/runs/{ids[1]}").status_code == 200
        after = sqlite_pragmas(database)
        series = client.get(f"/api/v1/runs/{ids[0]}/scalars", params={"name": "loss.0"}).json()
        assert [s["points"] for s in series] == [2000]
    assert after["freelist_count"] < 16, after  # was: every page of the deleted rows
    assert after["page_count"] < 0.75 * full["page_count"], (full, after)


def test_free_pages_are_given_back_a_thousand_a_step(tmp_path: Path) -> None:
    """``release_free_pages`` moves ``FREE_PAGES_PER_STEP`` pages a commit: the sqlite3
    driver's ``execute`` stepped ``incremental_vacuum`` once, one page a commit (a run of
    199,800 metric rows took 19 s and 87,769 statements to delete)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'free.db'}")
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE t (x BLOB)")
        connection.exec_driver_sql(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000) "
            "INSERT INTO t SELECT randomblob(3000) FROM n"
        )
    with engine.begin() as connection:
        connection.exec_driver_sql("DELETE FROM t")
    free = sqlite_pragmas(tmp_path / "free.db")["freelist_count"]
    commits = []
    event.listen(engine, "commit", lambda _connection: commits.append(1))
    assert release_free_pages(engine) == free
    assert free > 2 * FREE_PAGES_PER_STEP
    assert len(commits) == math.ceil(free / FREE_PAGES_PER_STEP)  # was: one per page
    assert sqlite_pragmas(tmp_path / "free.db")["freelist_count"] == 0
    engine.dispose()


def test_compact_switches_an_old_database_to_incremental_auto_vacuum(tmp_path: Path) -> None:
    """A database made before (``auto_vacuum=NONE``, fixed once a table exists): ``spectrawatch
    compact`` switches it, and the next run deletion gives its pages back."""
    from spectrawatch.cli import main

    database = tmp_path / "spectrawatch.db"
    with contextlib.closing(sqlite3.connect(database)) as db:
        db.execute("PRAGMA auto_vacuum=NONE")
        db.execute("CREATE TABLE made_by_an_older_version (x)")
        db.execute("DROP TABLE made_by_an_older_version")
    settings = ServerSettings(data_dir=tmp_path, run_worker=False, run_webhooks=False)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        assert client.post("/api/v1/runs", json={"project": "p", "name": "r"}).is_success
    assert sqlite_pragmas(database)["auto_vacuum"] == 0
    assert main(["compact", "--data-dir", str(tmp_path)]) == 0
    assert sqlite_pragmas(database)["auto_vacuum"] == 2
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        (run,) = client.get("/api/v1/runs").json()
        rows = [{"step": step, "name": "loss", "value": 0.5} for step in range(20_000)]
        assert client.post(f"/api/v1/runs/{run['id']}/scalars", json=rows).is_success
        assert client.delete(f"/api/v1/runs/{run['id']}").status_code == 200
    assert sqlite_pragmas(database)["freelist_count"] < 16


def test_offline_admin_commands_wait_for_a_live_servers_lock_as_before(tmp_path: Path) -> None:
    """The ``spectrawatch token`` commands open the database themselves: on SQLite they
    wait up to 30 s for a running server's write lock (as before the API's busy timeout became
    its 3 s lock timeout), neither the API's 3 s nor without a limit."""
    import argparse

    from spectrawatch import cli

    args = argparse.Namespace(data_dir=str(tmp_path), database_url=None)
    sessions = cli._open_db(args, create=True)
    try:
        with sessions() as session:
            assert session.scalar(text("PRAGMA busy_timeout")) == 30_000
    finally:
        sessions.kw["bind"].dispose()


def test_worker_counts_a_lock_wait_past_its_busy_timeout_as_the_jobs_failure(
    tmp_path: Path,
) -> None:
    """A worker write that waited out its busy timeout (``database is locked``) is one
    statement's failure, as a PostgreSQL lock timeout is: it uses an attempt and backs off, not
    given back as an outage and retried for ever behind a lock that may never go."""
    from sqlalchemy import exc as sa_exc

    from spectrawatch_server.db.session import make_engine
    from spectrawatch_server.queue.base import database_unavailable

    path = tmp_path / "db.sqlite"
    engine = make_engine(f"sqlite:///{path}", lock_timeout=0.2)
    try:
        with engine.begin() as connection:
            connection.execute(text("CREATE TABLE t (x INTEGER)"))
        with (
            write_locked(path, 5),
            pytest.raises(sa_exc.OperationalError) as caught,
            engine.begin() as connection,
        ):
            connection.execute(text("INSERT INTO t VALUES (1)"))
        assert "database is locked" in str(caught.value)
        assert database_unavailable(caught.value) is False
        wrapped = RuntimeError("analysis")
        wrapped.__cause__ = caught.value
        assert database_unavailable(wrapped) is False
    finally:
        engine.dispose()
