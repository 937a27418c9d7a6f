"""Scale-out mode end to end: a real PostgreSQL, one API process, two ``spectrawatch worker``s.

PostgreSQL comes from ``.ci/postgres.sh`` (``eval "$(.ci/postgres.sh)"`` exports
``SPECTRAWATCH_TEST_POSTGRES_URL``); every test module gets a fresh database on that server.
Heartbeats and stall timeouts are shortened (1 s / 4 s) so a killed worker is detected quickly.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import Engine, create_engine, text

from spectrawatch.wire import decode_frame
from spectrawatch_server.worker_main import threads_per_child
from tests.factories import make_run, post_frame, weight_frame
from tests.servers import (
    POSTGRES_MODE,
    STALLED_SECONDS,
    ServerProcess,
    WorkerProcess,
    fresh_database,
    wait_until,
)
from tests.servers import SCALE_ENV as SERVER_SCALE_ENV

pytestmark = pytest.mark.integration

POSTGRES_URL = os.environ.get("SPECTRAWATCH_TEST_POSTGRES_URL")
if POSTGRES_MODE:
    pytest.skip(
        "these tests build their own topology, whatever the mode: they ran in the embedded pass",
        allow_module_level=True,
    )
if not POSTGRES_URL:
    pytest.skip(
        "SPECTRAWATCH_TEST_POSTGRES_URL is unset: start PostgreSQL with "
        '`eval "$(.ci/postgres.sh)"` to run the scale-out tests',
        allow_module_level=True,
    )

SCALE_ENV = {
    **SERVER_SCALE_ENV,
    "SPECTRAWATCH_JOB_MAX_ATTEMPTS": "3",
    "SPECTRAWATCH_JOB_BACKOFF_SECONDS": "1",
}


@dataclass
class Topology:
    """The compose topology from real processes: PostgreSQL database, API, N workers."""

    db: Engine
    api: ServerProcess
    workers: list[WorkerProcess]
    client: httpx.Client

    def live_workers(self) -> set[str]:
        """Names of workers connected to the database (application_name ``<name>@<device>``)."""
        rows = self.sql(
            "SELECT DISTINCT application_name FROM pg_stat_activity "
            "WHERE datname = current_database()"
        )
        return {r[0].rsplit("@", 1)[0] for r in rows}

    def fresh_heartbeats(self) -> int:
        return int(
            self.sql(
                "SELECT count(*) FROM procrastinate_workers "
                "WHERE last_heartbeat > now() - make_interval(secs => :s)",
                s=STALLED_SECONDS,
            )[0][0]
        )

    def ensure_workers(self) -> None:
        """Restart killed workers and wait until every one heartbeats."""
        for worker in self.workers:
            if not worker.alive:
                worker.start()
        names = {w.name for w in self.workers}
        try:
            wait_until(lambda: names <= self.live_workers(), timeout=120)
            wait_until(lambda: self.fresh_heartbeats() >= len(self.workers), timeout=30)
        except AssertionError:
            logs = "\n".join(w.log_path.read_text()[-3000:] for w in self.workers)
            raise AssertionError(f"workers did not start:\n{logs}") from None

    def sql(self, query: str, **params: Any) -> list[Any]:
        with self.db.connect() as conn:
            return list(conn.execute(text(query), params).all())


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    """A fresh database on the test server, dropped afterwards."""
    assert POSTGRES_URL is not None
    with fresh_database(POSTGRES_URL, "sw_test") as url:
        yield url


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> Iterator[Topology]:
    root = tmp_path_factory.mktemp("scale")
    env = {
        **SCALE_ENV,
        "SPECTRAWATCH_DATABASE_URL": database_url,
        "SPECTRAWATCH_BLOB_DIR": str(root / "blobs"),  # the shared blob volume
    }
    api = ServerProcess(root / "api", env=env).start()
    workers = [WorkerProcess(f"worker-{i}", root / "workers", env) for i in range(2)]
    db = create_engine(database_url)
    client = httpx.Client(base_url=f"{api.url}/api/v1", timeout=30)
    topo = Topology(db, api, workers, client)
    try:
        topo.ensure_workers()
        yield topo
    finally:
        client.close()
        for worker in workers:  # graceful stops in parallel: each finishes its current job
            worker.signal(signal.SIGTERM)
        for worker in workers:
            worker.stop()
        api.stop()
        db.dispose()


def frame_statuses(client: httpx.Client, run_id: int) -> list[str]:
    frames = client.get(f"/runs/{run_id}/frames", params={"limit": 1000}).json()
    return [f["status"] for f in frames]


def metric_rows_per_frame(topo: Topology, run_id: int) -> dict[int, int]:
    rows = topo.sql(
        "SELECT frame_id, count(*) FROM metric WHERE run_id = :r GROUP BY frame_id", r=run_id
    )
    return {int(f): int(n) for f, n in rows}


def test_health_reports_postgres_and_live_workers(topology: Topology) -> None:
    health = topology.client.get("/health").json()
    assert health["database"] == "postgresql"
    assert health["queue"]["engine"] == "procrastinate"
    assert health["worker"]["running"] is True  # a worker heartbeat is fresh
    # the devices of the external workers, not of the API process
    assert health["worker"]["live"] == 2
    assert (health["worker"]["devices"], health["worker"]["external"]) == (["cpu"], True)


def test_ingest_worker_metrics_match_numpy(topology: Topology) -> None:
    client = topology.client
    run_id = make_run(client, name="pg-norms")
    bodies = [weight_frame(step=100 * i, seq=i) for i in range(3)]
    for i, body in enumerate(bodies):
        assert post_frame(client, run_id, body, seq=i).status_code == 202
    wait_until(lambda: frame_statuses(client, run_id) == ["done"] * 3, timeout=120)
    params = {"name": "norm.spectral"}
    series = client.get(f"/runs/{run_id}/metrics", params=params).json()["series"]
    by_layer = {s["layer"]: s for s in series}
    assert set(by_layer) == {"layer0.weight", "layer1.weight"}
    for i, body in enumerate(bodies):
        _, tensors = decode_frame(body)
        for layer, w in tensors.items():
            assert by_layer[layer]["steps"][i] == 100 * i
            expected = np.linalg.norm(w.double().numpy(), 2)
            assert by_layer[layer]["values"][i] == pytest.approx(expected, rel=1e-9)
    # one procrastinate job per frame, all succeeded; a replayed frame enqueues nothing
    assert post_frame(client, run_id, bodies[0], seq=0).status_code == 200
    jobs = topology.sql(
        "SELECT (args->>'frame_id')::int, status::text, attempts FROM procrastinate_jobs "
        "WHERE lock = :lock ORDER BY id",
        lock=f"run:{run_id}",
    )
    # (procrastinate counts a run in `attempts` when it ends: 1 = done at the first run)
    assert [(status, attempts) for _, status, attempts in jobs] == [("succeeded", 1)] * 3


def test_concurrent_runs_each_frame_done_once_in_run_order(topology: Topology) -> None:
    client = topology.client
    runs = [make_run(client, name=f"pg-multi-{k}") for k in range(3)]
    n_frames = 6

    def ingest(run_id: int) -> None:
        with httpx.Client(base_url=client.base_url, timeout=30) as own:
            for seq in range(n_frames):
                body = weight_frame(step=10 * seq, seq=seq, seed=run_id)
                assert post_frame(own, run_id, body, seq=seq).status_code == 202

    threads = [threading.Thread(target=ingest, args=(r,)) for r in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait_until(
        lambda: all(frame_statuses(client, r) == ["done"] * n_frames for r in runs), timeout=180
    )
    for run_id in runs:
        per_frame = metric_rows_per_frame(topology, run_id)
        assert len(per_frame) == n_frames
        assert len(set(per_frame.values())) == 1  # every frame has the same, complete result set
        # the jobs of one run ran one at a time, in ingest order, across workers
        events = topology.sql(
            "SELECT e.job_id, e.type::text, e.at FROM procrastinate_events e "
            "JOIN procrastinate_jobs j ON j.id = e.job_id "
            "WHERE j.lock = :lock AND e.type IN ('started', 'succeeded') ORDER BY e.at, e.id",
            lock=f"run:{run_id}",
        )
        kinds = [kind for _, kind, _ in events]
        assert kinds == ["started", "succeeded"] * n_frames  # never two of a run at once
        started = [job for job, kind, _ in events if kind == "started"]
        assert started == sorted(started)
    workers_used = topology.sql(
        "SELECT count(DISTINCT worker_id) FROM procrastinate_jobs WHERE lock = ANY(:locks)",
        locks=[f"run:{r}" for r in runs],
    )[0][0]
    assert workers_used == 2  # the work was shared


def test_failing_job_retries_with_backoff_then_fails_visibly(topology: Topology) -> None:
    client = topology.client
    run_id = make_run(client, name="pg-failing")
    for worker in topology.workers:  # hold the workers so the blob can vanish before the job runs
        worker.signal(signal.SIGSTOP)
    try:
        assert post_frame(client, run_id, weight_frame(0, 0), seq=0).status_code == 202
        (blob_key,) = topology.sql("SELECT blob_key FROM frame WHERE run_id = :r", r=run_id)[0]
        (Path(topology.api.env["SPECTRAWATCH_BLOB_DIR"]) / blob_key).unlink()
    finally:
        for worker in topology.workers:
            worker.signal(signal.SIGCONT)

    def job() -> tuple[str, int]:
        rows = topology.sql(
            "SELECT status::text, attempts FROM procrastinate_jobs WHERE lock = :l",
            l=f"run:{run_id}",
        )
        return (str(rows[0][0]), int(rows[0][1]))

    wait_until(lambda: job()[0] == "failed", timeout=60)
    assert job() == ("failed", 3)  # 3 runs (2 retries), then given up
    assert frame_statuses(client, run_id) == ["failed"]
    (failed,) = client.get(f"/runs/{run_id}/frames", params={"status": "failed"}).json()
    assert "MissingBlob" in failed["error"], failed  # why, through the API
    assert blob_key in failed["error"], failed  # naming the lost file
    assert client.get(f"/runs/{run_id}/frames", params={"status": "done"}).json() == []
    retry_gaps = topology.sql(
        "SELECT extract(epoch FROM e.at) FROM procrastinate_events e JOIN procrastinate_jobs j "
        "ON j.id = e.job_id WHERE j.lock = :l AND e.type = 'started' ORDER BY e.at",
        l=f"run:{run_id}",
    )
    starts = [float(t) for (t,) in retry_gaps]
    assert len(starts) == 3
    assert all(b - a >= 0.9 for a, b in itertools.pairwise(starts))  # backoff 1**n s
    assert client.get("/health").json()["queue"]["jobs"]["failed_recent"] >= 1


def test_kill_9_worker_mid_job_is_redelivered_and_stored_once(topology: Topology) -> None:
    client = topology.client
    topology.ensure_workers()
    run_id = make_run(client, name="pg-kill")
    assert post_frame(client, run_id, weight_frame(0, 0), seq=0).status_code == 202
    wait_until(lambda: frame_statuses(client, run_id) == ["done"], timeout=60)
    reference_rows = metric_rows_per_frame(topology, run_id)

    with topology.db.connect() as blocker:
        for worker in topology.workers:
            worker.signal(signal.SIGSTOP)
        try:
            assert post_frame(client, run_id, weight_frame(10, 1), seq=1).status_code == 202
            (frame_id,) = topology.sql(
                "SELECT id FROM frame WHERE run_id = :r AND seq = 1", r=run_id
            )[0]
            # Row lock: the worker computes, then blocks writing results -> it is mid-job.
            blocker.execute(text("SELECT id FROM frame WHERE id = :f FOR UPDATE"), {"f": frame_id})
        finally:
            for worker in topology.workers:
                worker.signal(signal.SIGCONT)

        names = {w.name for w in topology.workers}
        blocked: list[str] = []

        def worker_blocked() -> bool:
            """Whether one of the test's workers waits on a lock (other sessions may wait too)."""
            rows = topology.sql(
                "SELECT application_name FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            waiting = [str(r[0]).rsplit("@", 1)[0] for r in rows]
            blocked[:] = [n for n in waiting if n in names]
            return bool(blocked)

        wait_until(worker_blocked, timeout=60)
        ((first_worker_id,),) = topology.sql(
            "SELECT worker_id FROM procrastinate_jobs WHERE status = 'doing' AND lock = :l",
            l=f"run:{run_id}",
        )
        victim = next(w for w in topology.workers if w.name == blocked[0])
        victim.kill()
        blocker.rollback()

    wait_until(lambda: frame_statuses(client, run_id) == ["done", "done"], timeout=60)
    (status, attempts, worker_id) = topology.sql(
        "SELECT status::text, attempts, worker_id FROM procrastinate_jobs "
        "WHERE lock = :l AND (args->>'frame_id')::int = :f",
        l=f"run:{run_id}",
        f=frame_id,
    )[0]
    assert (status, attempts) == ("succeeded", 2)  # re-delivered once after the stall timeout
    assert worker_id != first_worker_id
    rows = metric_rows_per_frame(topology, run_id)
    assert rows[frame_id] == next(iter(reference_rows.values()))  # stored once, complete
    topology.ensure_workers()


@pytest.mark.slow
def test_cpu_supervisor_spawns_workers_that_die_with_it(topology: Topology, tmp_path: Path) -> None:
    env = dict(topology.workers[0].env)
    supervisor = WorkerProcess("sup", tmp_path, env, args=["--concurrency", "2"]).start()
    try:
        wait_until(lambda: {"sup-0", "sup-1"} <= topology.live_workers(), timeout=180)
        assert "sup" not in topology.live_workers()  # the supervisor itself runs no jobs
        assert supervisor.proc is not None
        children = _spawned_children(supervisor.proc.pid)
        assert len(children) == 2
        given = {**os.environ, **env}.get("OPENBLAS_NUM_THREADS")  # a user's setting is kept
        share = f"OPENBLAS_NUM_THREADS={given or threads_per_child(2)}".encode()
        for pid in children:  # each child's BLAS pool gets its share of the cores
            assert share in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        supervisor.kill()  # kill -9: the children stop (PDEATHSIG and a sentinel watcher)
        try:
            wait_until(lambda: not {"sup-0", "sup-1"} & topology.live_workers(), timeout=60)
        except AssertionError as exc:
            log_tail = supervisor.log_path.read_text(errors="replace")[-4000:]
            raise AssertionError(f"{exc}; the supervisor's log ends:\n{log_tail}") from None
    finally:
        supervisor.kill()


def _spawned_children(pid: int) -> list[int]:
    """PIDs of ``multiprocessing`` spawn children of ``pid`` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:  # the process ended meanwhile
            continue
        if parent == pid and b"spawn_main" in cmdline:
            out.append(int(stat.parent.name))
    return out


def test_several_api_processes_share_one_port(topology: Topology, tmp_path: Path) -> None:
    """`spectrawatch server --workers 2`: two uvicorn processes on the same database and port;
    concurrent frames all stored once, replays answered from the store, jobs analysed."""
    api = ServerProcess(tmp_path / "api2", env=topology.api.env, args=["--workers", "2"]).start()
    try:
        with httpx.Client(base_url=f"{api.url}/api/v1", timeout=30) as client:
            run_id = make_run(client, name="pg-api-processes")
            bodies = [weight_frame(step=10 * seq, seq=seq, seed=7) for seq in range(24)]

            def send(seq: int) -> int:
                with httpx.Client(base_url=client.base_url, timeout=30) as own:
                    return post_frame(own, run_id, bodies[seq], seq=seq).status_code

            with ThreadPoolExecutor(8) as pool:
                assert list(pool.map(send, range(24))) == [202] * 24
                assert list(pool.map(send, range(24))) == [200] * 24
            wait_until(lambda: frame_statuses(client, run_id) == ["done"] * 24, timeout=180)
        assert api.proc is not None
        children = _spawned_children(api.proc.pid)
        assert len(children) == 2  # uvicorn's supervisor and its 2
        # the main process killed by SIGKILL (an OOM kill): its 2 stop too, the port frees
        api.proc.kill()
        api.proc.wait()
        wait_until(lambda: not [c for c in children if _running(c)], timeout=30)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", api.port))
    finally:
        api.stop()


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.gpu
def test_gpu_worker_analyses_on_cuda(topology: Topology, tmp_path: Path) -> None:
    gpu = WorkerProcess("gpu-0", tmp_path, dict(topology.workers[0].env))
    gpu.env["SPECTRAWATCH_DEVICE"] = "cuda:0"
    gpu.args = ["--device", "cuda:0"]  # later flag wins over the cpu default
    for worker in topology.workers:
        worker.stop()
    try:
        gpu.start()
        wait_until(lambda: "gpu-0" in topology.live_workers(), timeout=180)
        run_id = make_run(topology.client, name="pg-gpu")
        body = weight_frame(0, 0)
        assert post_frame(topology.client, run_id, body, seq=0).status_code == 202
        wait_until(lambda: frame_statuses(topology.client, run_id) == ["done"], timeout=120)
        assert "on cuda:0" in gpu.log_path.read_text()
        params = {"name": "norm.spectral", "layer": "layer0.weight"}
        (series,) = topology.client.get(f"/runs/{run_id}/metrics", params=params).json()["series"]
        _, tensors = decode_frame(body)
        expected = np.linalg.norm(tensors["layer0.weight"].double().numpy(), 2)
        assert series["values"][0] == pytest.approx(expected, rel=1e-5)
    finally:
        gpu.stop()
        topology.ensure_workers()
