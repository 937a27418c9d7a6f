"""Real ``spectrawatch server`` (and worker) subprocesses for integration tests (no mocks).

Two modes, chosen by the env var ``SPECTRAWATCH_TEST_MODE``:

- ``embedded`` (default): one ``spectrawatch server`` with SQLite in its data dir and the
  in-process worker.
- ``postgres``: the scale-out topology of docker-compose.yml from real processes: one API
  process (``SPECTRAWATCH_QUEUE=procrastinate``) and two ``spectrawatch worker`` processes, on
  a database of the PostgreSQL server named by ``SPECTRAWATCH_TEST_POSTGRES_URL``
  (``eval "$(.ci/postgres.sh)"``). Each data dir gets its own database, copied from a
  template migrated once per session (``CREATE DATABASE ... TEMPLATE``: no migrations per
  test), so a server restarted on the same data dir finds its data again. Blobs stay in
  ``<data_dir>/blobs``, shared by the API and its workers (the compose file's blob volume).

In postgres mode ``stop()`` stops the API and its workers; ``kill()`` is ``kill -9`` of the
API only: the workers are separate processes (separate hosts in production) and keep
consuming, and a later ``start()`` on the same data dir adopts them. ``--no-worker`` means
"no worker processes"; ``workers`` lists them and ``stop_workers()`` stops them alone.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

MODE = os.environ.get("SPECTRAWATCH_TEST_MODE", "embedded")
if MODE not in {"embedded", "postgres"}:
    raise RuntimeError(f"SPECTRAWATCH_TEST_MODE must be embedded or postgres, not {MODE!r}")
POSTGRES_MODE = MODE == "postgres"
POSTGRES_URL = os.environ.get("SPECTRAWATCH_TEST_POSTGRES_URL")
if POSTGRES_MODE and not POSTGRES_URL:
    raise RuntimeError(
        'SPECTRAWATCH_TEST_MODE=postgres needs SPECTRAWATCH_TEST_POSTGRES_URL: eval "$(.ci/'
        'postgres.sh)"'
    )
DIALECT = "postgresql" if POSTGRES_MODE else "sqlite"  # /health's "database"
WORKERS_PER_SERVER = 2

# Scale-out settings of the tests: short heartbeats and stall timeout (a killed worker's job is
# re-queued within seconds), CPU analyses. Shared with test_postgres_mode.
STALLED_SECONDS = 4.0
SCALE_ENV = {
    "SPECTRAWATCH_QUEUE": "procrastinate",
    "SPECTRAWATCH_WORKER_HEARTBEAT_SECONDS": "1",
    "SPECTRAWATCH_WORKER_STALLED_SECONDS": str(STALLED_SECONDS),
    "SPECTRAWATCH_STALL_CHECK_SECONDS": "1",
    "SPECTRAWATCH_WORKER_POLL_SECONDS": "0.5",
    "SPECTRAWATCH_DEVICE": "cpu",
}


def embedded_only(reason: str) -> pytest.MarkDecorator:
    """Skip in postgres mode: the test is about the embedded (SQLite, in-process) setup."""
    return pytest.mark.skipif(POSTGRES_MODE, reason=f"embedded mode only: {reason}")


_SESSION_TAG = uuid.uuid4().hex[:8]  # databases of this pytest session: sw_<tag>_*
_template: str | None = None
created_databases: list[str] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def fresh_database(base_url: str, prefix: str = "sw") -> Iterator[str]:
    """An empty database ``<prefix>_<random>`` on the PostgreSQL server of ``base_url``; yields
    its URL and drops it (closing any connection left) afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(base_url).set(database=name).render_as_string(hide_password=False)
    finally:
        try:
            _drop_database(admin, name)
        finally:
            admin.dispose()


DATABASES = [
    "sqlite",
    pytest.param(
        "postgresql",
        marks=pytest.mark.skipif(POSTGRES_URL is None, reason="no SPECTRAWATCH_TEST_POSTGRES_URL"),
    ),
]
"""Parameters of a fixture run on SQLite, and on PostgreSQL where one is named."""


@contextmanager
def migrated_sessions(kind: str, tmp_path: Path, prefix: str) -> Iterator[Any]:
    """A session factory (``sessionmaker``) of a migrated database of ``kind`` (one of
    :data:`DATABASES`): a SQLite file under ``tmp_path``, or a fresh PostgreSQL database
    ``<prefix>_<random>``, dropped afterwards."""
    from spectrawatch_server.db import migrate
    from spectrawatch_server.db.session import make_engine, make_session_factory

    with ExitStack() as stack:
        if kind == "sqlite":
            url = f"sqlite:///{tmp_path / 'db.sqlite'}"
        else:
            assert POSTGRES_URL is not None
            url = stack.enter_context(fresh_database(POSTGRES_URL, prefix))
        engine = make_engine(url)
        migrate.upgrade(engine)
        yield make_session_factory(engine)
        engine.dispose()


def _drop_database(admin: Engine, name: str, tries: int = 20) -> None:
    """``DROP DATABASE ... WITH (FORCE)``, retried: an autovacuum worker (a superuser's
    process, which the test role may not terminate) can be in the database for a moment."""
    for attempt in range(tries):
        try:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            return
        except DBAPIError:
            if attempt == tries - 1:
                raise
            time.sleep(0.5)


def _admin_url(database: str | None = None) -> str:
    assert POSTGRES_URL is not None
    url = make_url(POSTGRES_URL)
    return url.set(database=database or url.database).render_as_string(hide_password=False)


def _admin(statement: str) -> None:
    engine = create_engine(_admin_url(), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(statement))
    finally:
        engine.dispose()


def _template_database() -> str:
    """Once per session: a database at the Alembic head with procrastinate's schema."""
    global _template
    if _template is None:
        from spectrawatch_server.db import migrate
        from spectrawatch_server.db.session import make_engine
        from spectrawatch_server.queue.procrastinate import ensure_schema

        name = f"sw_{_SESSION_TAG}_template"
        _admin(f'CREATE DATABASE "{name}"')
        created_databases.append(name)
        engine = make_engine(_admin_url(name))
        try:
            migrate.upgrade(engine)
            ensure_schema(engine)
        finally:
            engine.dispose()  # CREATE DATABASE ... TEMPLATE needs it without connections
        _template = name
    return _template


def database_url(data_dir: Path) -> str:
    """The SQLAlchemy URL of the database a server on ``data_dir`` uses in this mode.

    Postgres mode: created from the session template at the first call for a data dir.
    """
    if not POSTGRES_MODE:
        return f"sqlite:///{data_dir / 'spectrawatch.db'}"
    digest = hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:16]
    name = f"sw_{_SESSION_TAG}_{digest}"
    if name not in created_databases:
        _admin(f'CREATE DATABASE "{name}" TEMPLATE "{_template_database()}"')
        created_databases.append(name)
    return _admin_url(name)


def drop_databases() -> None:
    """Drop every database this session created (end of the session), retried as
    :func:`_drop_database` is: an autovacuum worker in one failed the CI's last teardown."""
    admin = create_engine(_admin_url(), isolation_level="AUTOCOMMIT")
    try:
        while created_databases:
            _drop_database(admin, created_databases.pop())
    finally:
        admin.dispose()


def mode_env(data_dir: Path) -> dict[str, str]:
    """Environment for any process on ``data_dir`` (server, worker, ``spectrawatch`` CLI)."""
    if not POSTGRES_MODE:
        return {}
    return {**SCALE_ENV, "SPECTRAWATCH_DATABASE_URL": database_url(data_dir)}


def cli_env(data_dir: Path) -> dict[str, str]:
    """``os.environ`` plus :func:`mode_env`: for ``subprocess.run`` of the CLI on a data dir."""
    return {**os.environ, **mode_env(data_dir)}


def run_cli(data_dir: Path, *args: str) -> str:
    """Run ``spectrawatch ARGS`` on the database of ``data_dir``; its stdout, stripped (a
    non-zero exit raises ``CalledProcessError``)."""
    result = subprocess.run(
        [sys.executable, "-m", "spectrawatch", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env=cli_env(data_dir),
    )
    return result.stdout.strip()


def create_token(data_dir: Path, project: str, role: str = "admin") -> str:
    """A new token of ``project`` with ``role`` (``spectrawatch token create``; ``admin`` here
    by default, as tokens made before roles: these tests use every route), on ``data_dir``'s
    database."""
    return run_cli(
        data_dir,
        "token",
        "create",
        "--project",
        project,
        "--role",
        role,
        "--data-dir",
        str(data_dir),
    )


def db_rows(data_dir: Path, query: str, **params: Any) -> list[Any]:
    """Rows of a SQL query (``:name`` parameters) on the database of ``data_dir``."""
    return url_rows(database_url(data_dir), query, **params)


def url_rows(url: str, query: str, **params: Any) -> list[Any]:
    """Rows of a SQL query (``:name`` parameters) on the database at ``url``."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            result = conn.execute(text(query), params)
            return list(result.all()) if result.returns_rows else []
    finally:
        engine.dispose()


def end_process(
    proc: subprocess.Popen[bytes] | None, signum: int | None = None, timeout: float = 30.0
) -> None:
    """Stop ``proc`` if it runs: send ``signum`` and wait up to ``timeout`` s, then kill -9
    (``signum=None``: kill -9 at once, no shutdown code runs)."""
    if proc is None or proc.poll() is not None:
        return
    if signum is not None:
        proc.send_signal(signum)
        try:
            proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.kill()
    proc.wait()


@dataclass
class WorkerProcess:
    """A real ``spectrawatch worker`` subprocess (log: ``<data_dir>/<name>.log``)."""

    name: str
    data_dir: Path
    env: dict[str, str]
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.data_dir / f"{self.name}.log"

    def start(self) -> WorkerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "spectrawatch", "worker", "--device", "cpu"]
        cmd += ["--name", self.name, "--data-dir", str(self.data_dir), *self.args]
        env = {**os.environ, "OMP_NUM_THREADS": "1", **self.env}
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """kill -9: no shutdown code runs, the job it holds stays 'doing'."""
        end_process(self.proc)

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful stop (SIGTERM): the worker finishes its job in hand."""
        end_process(self.proc, signal.SIGTERM, timeout)

    def signal(self, signum: int) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signum)


# Worker processes by data dir: a server started again on a data dir (a new ServerProcess
# after kill()) adopts the workers still running there instead of starting more.
_workers: dict[Path, list[WorkerProcess]] = {}
_apis: dict[Path, subprocess.Popen[bytes]] = {}  # the API process last started on a data dir


def stop_all_workers() -> None:
    """Stop every worker process still running (end of the session)."""
    for workers in _workers.values():
        for worker in workers:
            worker.signal(signal.SIGTERM)
    for workers in _workers.values():
        for worker in workers:
            worker.stop()
    _workers.clear()


def stop_orphan_workers() -> None:
    """Stop the workers of data dirs whose API is no longer running (after each test)."""
    for key, workers in list(_workers.items()):
        api = _apis.get(key)
        if api is None or api.poll() is not None:
            for worker in workers:
                worker.stop()
            del _workers[key]


@dataclass
class ServerProcess:
    """A running server: ``url``, its data dir and log; ``stop()``/``kill()``/``start()``."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    @property
    def workers(self) -> list[WorkerProcess]:
        """The worker processes of this data dir (postgres mode; empty in embedded mode)."""
        return _workers.get(self.data_dir.resolve(), [])

    def start(self, timeout: float = 90.0) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "SPECTRAWATCH_LOG_LEVEL": "warning", **mode_env(self.data_dir)}
        env.update(self.env)
        with_workers = POSTGRES_MODE and "--no-worker" not in self.args
        args = list(self.args)
        if POSTGRES_MODE and "--no-worker" not in args:
            args.append("--no-worker")  # the API process never runs jobs in this mode
        if with_workers:
            self.start_workers(env)
        cmd = [sys.executable, "-m", "spectrawatch", "server", "--port", str(self.port)]
        cmd += ["--data-dir", str(self.data_dir), *args]
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _apis[self.data_dir.resolve()] = self.proc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log_path.read_text()[-4000:]}")
            try:
                health = httpx.get(f"{self.url}/api/v1/health", timeout=2)
                if health.status_code == 200 and self._workers_ready(health.json(), with_workers):
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.kill()
        self.stop_workers()
        logs = "".join(w.log_path.read_text()[-2000:] for w in self.workers)
        raise RuntimeError(
            f"server did not become healthy:\n{self.log_path.read_text()[-4000:]}\n{logs}"
        )

    def start_workers(self, env: dict[str, str] | None = None) -> None:
        """Start the missing ones of the data dir's workers (postgres mode)."""
        env = env if env is not None else {**mode_env(self.data_dir), **self.env}
        workers = _workers.setdefault(self.data_dir.resolve(), [])
        if not workers:
            workers += [
                WorkerProcess(f"worker-{i}", self.data_dir, env) for i in range(WORKERS_PER_SERVER)
            ]
        for worker in workers:
            if not worker.alive:
                worker.env = env
                worker.start()

    def _workers_ready(self, health: dict[str, Any], with_workers: bool) -> bool:
        if not with_workers:
            return True
        for worker in self.workers:
            if not worker.alive:
                raise RuntimeError(f"worker exited early:\n{worker.log_path.read_text()[-4000:]}")
        if "worker" not in health:  # --require-auth: workers are shown to a token only
            return httpx.get(f"{self.url}/api/v1/ready", timeout=2).status_code == 200
        return int(health["worker"].get("live", 0)) >= len(self.workers)

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful stop (SIGINT, as Ctrl-C); postgres mode: the workers too (SIGTERM)."""
        for worker in self.workers:  # in parallel: each finishes its job in hand
            worker.signal(signal.SIGTERM)
        end_process(self.proc, signal.SIGINT, timeout)
        self.proc = None
        self.stop_workers()

    def kill(self) -> None:
        """kill -9 of the API: no shutdown code runs (postgres mode: the workers live on)."""
        end_process(self.proc)
        self.proc = None

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.stop()


def wait_until(
    predicate: Callable[[], object], timeout: float = 60.0, interval: float = 0.2
) -> None:
    """Poll ``predicate()`` until truthy or fail with ``AssertionError``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")
