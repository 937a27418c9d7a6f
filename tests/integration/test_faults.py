"""Fault tests of issue 12 against real processes: a real training loop using
``spectrawatch.Monitor``, a real ``spectrawatch server`` subprocess, a real database.

1. kill -9 of the API during a stream of frames, restart on the same port and data dir: every
   frame the client numbered is stored exactly once, in ``seq`` order; no orphan blob or temp
   upload survives start-up reconciliation.
2. Server down ~20 s during training: the client spools within its cap, step time is not
   inflated (against a no-monitor baseline in the same test), the spool replays in order;
   a tiny spool cap drops frames, counts them and reports them to the server, never crashes.
3. PostgreSQL stopped and restarted under the API (a private cluster from ``.ci/postgres.sh``):
   503 with ``Retry-After`` while it is down, the client backs off and retries, nothing lost.
4. kill -9 while a large upload streams: the temp upload is removed at restart and no frame row
   points at a missing blob.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from sqlalchemy import create_engine, text

import spectrawatch
from spectrawatch.wire import FrameKind, encode_frame
from tests.factories import make_run, post_frame, weight_frame
from tests.servers import (
    POSTGRES_MODE,
    ServerProcess,
    db_rows,
    embedded_only,
    free_port,
    wait_until,
)
from tests.training import Loop, all_analysed, frames_of
from tests.training import client_settings as _client_settings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def settings(tmp_path: Path, url: str, run: str, **kw: Any) -> dict[str, Any]:
    """Small cadences so a few hundred steps make a few hundred frames; short backoff."""
    return _client_settings(tmp_path, url, run, project="faults", **kw)


@pytest.fixture
def m() -> Iterator[spectrawatch.Monitor]:
    """A fresh client; closed with a short deadline even when the test fails."""
    monitor = spectrawatch.Monitor()
    try:
        yield monitor
    finally:
        monitor.finish(status="crashed", timeout=5)


def numbered(m: spectrawatch.Monitor) -> list[int]:
    """The seq numbers the client gave its frames: ``base .. base + n - 1`` (base 0 for a run the
    server created at the first contact, microseconds since the epoch if it started offline)."""
    assert m._sender is not None
    base = m._sender._seq_base or 0
    return list(range(base, base + m._sender._seq_next))


def blob_files(blob_dir: Path) -> set[str]:
    tmp = blob_dir / ".tmp"
    return {
        p.relative_to(blob_dir).as_posix()
        for p in blob_dir.rglob("*")
        if p.is_file() and tmp not in p.parents
    }


def temp_uploads(blob_dir: Path) -> list[Path]:
    return sorted((blob_dir / ".tmp").glob("*.part"))


def assert_blobs_consistent(data_dir: Path) -> None:
    """Every frame row's blob exists; no blob without a row; no temp upload left.

    Postgres mode: the first only. Other API processes may share the blob store there, so the
    start-up reconciliation leaves files younger than 10 minutes (they may be mid-ingest).
    """
    blob_dir = data_dir / "blobs"
    keys = {k for (k,) in db_rows(data_dir, "SELECT blob_key FROM frame")}
    on_disk = blob_files(blob_dir)
    assert keys - on_disk == set(), "frame rows point at missing blobs"
    if not POSTGRES_MODE:
        assert on_disk - keys == set(), "orphan blobs"
        assert temp_uploads(blob_dir) == []


def assert_exactly_once_in_order(seqs_by_id: list[int], sent: list[int]) -> None:
    """``seqs_by_id``: stored seq numbers in insertion (id) order; ``sent``: the client's."""
    assert len(seqs_by_id) == len(set(seqs_by_id)), "duplicate frames"
    assert sorted(seqs_by_id) == sent, "lost frames"
    assert seqs_by_id == sorted(seqs_by_id), "frames stored out of order"


# --- 1. kill -9 of the API during a stream --------------------------------------------------


@pytest.mark.slow
def test_kill9_api_during_stream_stores_every_frame_once(
    tmp_path: Path, m: spectrawatch.Monitor
) -> None:
    data_dir = tmp_path / "server"
    srv = ServerProcess(data_dir).start()
    port = srv.port
    m.init(**settings(tmp_path, srv.url, "kill9", weights_every=20, activations_every=20))
    loop = Loop(m)
    kills = 0
    orphans_before_restart: list[str] = []
    t0 = time.monotonic()
    try:
        loop.run(30, pause=0.005)
        for _ in range(2):  # two crashes, each while the sender is busy posting frames
            loop.run(16)  # a burst: the sender is mid-request when the kill lands
            srv.kill()
            kills += 1
            orphans_before_restart += [p.name for p in temp_uploads(data_dir / "blobs")]
            loop.run(24, pause=0.01)  # training goes on; the client spools
            srv = ServerProcess(data_dir, port=port).start()
            loop.run(20, pause=0.005)
        loop.run(30, pause=0.005)
        assert m.finish(timeout=120)
        assert isinstance(m.run_id, int)
        n = numbered(m)
        seqs = [
            s
            for (s,) in db_rows(
                data_dir, "SELECT seq FROM frame WHERE run_id = :r ORDER BY id", r=m.run_id
            )
        ]
        assert_exactly_once_in_order(seqs, n)
        stats = m.stats
        assert stats.get("dropped_frames") == 0
        assert stats.get("spooled_frames") > 0  # the crashes were seen by the client
        assert stats.get("replayed_frames") == stats.get("spooled_frames")
        # scalars: one row per logged step (upserts make replays harmless)
        (loss_rows,) = db_rows(
            data_dir,
            "SELECT count(*), count(DISTINCT step) FROM scalar WHERE run_id = :r AND name = 'loss'",
            r=m.run_id,
        )
        assert loss_rows == (loop.step, loop.step)
        # the worker analyses every frame exactly once
        t_stream = time.monotonic() - t0
        wait_until(lambda: all_analysed(srv.url, m.run_id), timeout=180)
        t_analysed = time.monotonic() - t0
        (dupes,) = db_rows(
            data_dir,
            "SELECT count(*) FROM (SELECT frame_id, analysis, layer, name, step FROM metric "
            "GROUP BY frame_id, analysis, layer, name, step HAVING count(*) > 1) d",
        )
        assert dupes == (0,)
        # one more crash at rest, then the start-up reconciliation must find the store consistent
        srv.kill()
        srv = ServerProcess(data_dir, port=port).start()
        assert_blobs_consistent(data_dir)
        print(
            f"kill -9 x{kills}: {len(n)} frames numbered, {len(seqs)} stored, "
            f"{stats.get('spooled_frames')} spooled and replayed, "
            f"temp uploads left by the kills: {len(orphans_before_restart)}; stream "
            f"{t_stream:.0f} s, all analysed at {t_analysed:.0f} s"
        )
    finally:
        srv.kill()


# --- 2. server down for a while -------------------------------------------------------------


OUTAGE_S = 20.0
PAUSE_S = 0.04  # "data loading" between steps, so 20 s of training is ~450 steps


@pytest.mark.slow
def test_server_down_for_a_while_spools_and_replays_in_order(
    tmp_path: Path, m: spectrawatch.Monitor
) -> None:
    # baseline: the same loop without any monitor, measured in this test on this machine
    base = Loop(None)
    base.run(30)  # warm-up
    base.times.clear()
    base.run(300, pause=0.01)
    base_median = statistics.median(base.times)

    port = free_port()
    data_dir = tmp_path / "server"
    m.init(
        **settings(
            tmp_path,
            f"http://127.0.0.1:{port}",
            "outage",
            spool_max_bytes=64 << 20,
            flush_timeout_s=120.0,
        )
    )
    loop = Loop(m)
    loop.run_for(OUTAGE_S, pause=PAUSE_S)  # the server has not started yet
    outage = list(loop.times)
    assert m.wait_idle(30)
    spooled = m.stats.get("spooled_frames")
    spool_dir = tmp_path / "spool" / "faults" / "outage"
    spool_bytes = sum(p.stat().st_size for p in spool_dir.glob("*.sw"))
    assert spooled > 0
    assert spool_bytes <= 64 << 20
    assert m.stats.get("dropped_frames") == 0

    srv = ServerProcess(data_dir, port=port).start()
    try:
        loop.run(100, pause=0.005)
        assert m.finish(timeout=120)
        assert isinstance(m.run_id, int)
        n = numbered(m)
        seqs = [
            s
            for (s,) in db_rows(
                data_dir, "SELECT seq FROM frame WHERE run_id = :r ORDER BY id", r=m.run_id
            )
        ]
        assert_exactly_once_in_order(seqs, n)
        steps = [
            s
            for (s,) in db_rows(
                data_dir,
                "SELECT step FROM frame WHERE run_id = :r AND kind = 'weights' ORDER BY id",
                r=m.run_id,
            )
        ]
        assert steps == sorted(steps)
        assert len(steps) > 0
        assert m.stats.get("replayed_frames") == m.stats.get("spooled_frames") >= spooled
        assert list(spool_dir.glob("*.sw")) == []
        with httpx.Client(base_url=f"{srv.url}/api/v1", timeout=30) as c:
            run = c.get(f"/runs/{m.run_id}").json()
        assert run["status"] == "finished"
        assert run["client_stats"]["spooled_frames"] >= spooled
        assert run["client_stats"]["dropped_frames"] == 0
    finally:
        srv.stop()

    # training speed: the sender thread does all I/O, so the loop's step time barely moves
    med, worst = statistics.median(outage), max(outage)
    print(
        f"no-monitor median step {base_median * 1e3:.2f} ms (max {max(base.times) * 1e3:.2f}); "
        f"server down {OUTAGE_S:.0f} s: {len(outage)} steps, median {med * 1e3:.2f} ms, "
        f"max {worst * 1e3:.2f} ms, {spooled} frames / {spool_bytes} bytes spooled"
    )
    assert med < 3 * base_median + 0.005
    assert worst < max(0.5, 50 * base_median)


def test_tiny_spool_cap_overflow_is_counted_and_reported(
    tmp_path: Path, m: spectrawatch.Monitor
) -> None:
    port = free_port()
    cap = 48 << 10  # a few frames' worth
    m.init(
        **settings(
            tmp_path,
            f"http://127.0.0.1:{port}",
            "overflow",
            spool_max_bytes=cap,
            flush_timeout_s=60.0,
        )
    )
    loop = Loop(m)
    loop.run(120)  # server down: everything goes to the tiny spool
    assert m.wait_idle(30)
    spool_dir = tmp_path / "spool" / "faults" / "overflow"
    assert sum(p.stat().st_size for p in spool_dir.glob("*.sw")) <= cap
    dropped = m.stats.get("dropped_frames")
    assert dropped > 0
    srv = ServerProcess(tmp_path / "server", port=port).start()
    try:
        loop.run(20)
        assert loop.step == 140  # training never crashed
        assert m.finish(timeout=60)
        assert isinstance(m.run_id, int)
        n = numbered(m)
        stored = [f["seq"] for f in frames_of(srv.url, m.run_id)]
        assert len(stored) == len(set(stored))
        assert set(stored) <= set(n)
        final = m.stats
        # every numbered frame is either stored or counted as dropped (spool eviction/refusal)
        assert len(stored) + final.get("dropped_frames") == len(n)
        with httpx.Client(base_url=f"{srv.url}/api/v1", timeout=30) as c:
            reported = c.get(f"/runs/{m.run_id}").json()["client_stats"]
        assert reported["dropped_frames"] == final.get("dropped_frames") > 0
        assert reported["spool_overflow"] == final.get("spool_overflow")
        # scalar batches refused by the full spool are counted too: stored + dropped = logged
        # (the loss of every step, and the probe's prediction scalars: confidence at every
        # activation probe, churn and positions from its second on, agreement from its fourth)
        with httpx.Client(base_url=f"{srv.url}/api/v1", timeout=30) as c:
            series = c.get(f"/runs/{m.run_id}/scalars").json()
        probes = loop.step // 10  # activations_every
        logged = loop.step + probes + 2 * (probes - 1) + (probes - 3)
        stored_rows = sum(len(s["steps"]) for s in series)
        assert stored_rows + final.get("dropped_scalars") == logged
        assert reported["dropped_scalars"] == final.get("dropped_scalars")
        print(
            f"spool cap {cap} B: {len(n)} frames numbered, {len(stored)} stored, "
            f"{final.get('dropped_frames')} dropped (spool_overflow "
            f"{final.get('spool_overflow')}), {final.get('dropped_scalars')} scalars dropped"
        )
    finally:
        srv.stop()


# --- 3. PostgreSQL briefly unavailable ------------------------------------------------------


class PrivatePostgres:
    """A PostgreSQL cluster of this module only (own port and data dir), via .ci/postgres.sh."""

    def __init__(self) -> None:
        self.port = free_port()
        self.env = {
            **os.environ,
            "SPECTRAWATCH_PG_PORT": str(self.port),
            "SPECTRAWATCH_PG_DATA": f"/tmp/spectrawatch-faults-pg-{self.port}",
        }

    def _script(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(REPO / ".ci" / "postgres.sh"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def start(self) -> str:
        done = self._script("start")
        if done.returncode != 0 or "export SPECTRAWATCH_TEST_POSTGRES_URL=" not in done.stdout:
            raise RuntimeError(done.stderr[-2000:])
        return done.stdout.strip().split("=", 1)[1]

    def stop(self) -> None:
        self._script("stop").check_returncode()

    def clean(self) -> None:
        self._script("clean")


@pytest.fixture(scope="module")
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


@pytest.mark.slow
def test_database_down_answers_503_and_client_loses_nothing(
    tmp_path: Path, private_postgres: tuple[PrivatePostgres, str], m: spectrawatch.Monitor
) -> None:
    pg, url = private_postgres
    t0 = time.monotonic()
    marks: dict[str, float] = {}
    data_dir = tmp_path / "server"
    # A job whose analysis dies with the database is released once the database answers again
    # (attempt refunded); a short lease bounds the wait should that release be missed.
    env = {"SPECTRAWATCH_DATABASE_URL": url, "SPECTRAWATCH_JOB_LEASE_SECONDS": "15"}
    srv = ServerProcess(data_dir, env=env).start()
    api = httpx.Client(base_url=f"{srv.url}/api/v1", timeout=30)
    try:
        assert api.get("/health").json()["database"] == "postgresql"
        m.init(
            **settings(
                tmp_path,
                srv.url,
                "dbdown",
                weights_every=20,
                activations_every=20,
                flush_timeout_s=120.0,
            )
        )
        loop = Loop(m)
        loop.run(20, pause=0.005)
        assert m.wait_idle(30)
        probe_run = make_run(api, project="faults", name="probe")

        marks["pg stopped"] = time.monotonic() - t0
        pg.stop()
        try:
            resp = post_frame(api, probe_run, weight_frame(0, 0), seq=0)
            assert resp.status_code == 503, resp.text
            assert resp.headers["Retry-After"].isdigit()
            assert resp.json()["error"]["code"] == "database_unavailable"
            ready = api.get("/ready")
            assert ready.status_code == 503, ready.text
            assert ready.headers["Retry-After"].isdigit()
            assert ready.json()["checks"]["database"].startswith("unavailable")
            resp = api.post(
                f"/runs/{probe_run}/scalars", json=[{"step": 1, "name": "loss", "value": 1.0}]
            )
            assert resp.status_code == 503
            assert resp.headers["Retry-After"].isdigit()
            loop.run_for(4.0, pause=0.04)  # the client meets 503s, spools, backs off
            assert m.wait_idle(30)
            assert srv.proc is not None
            assert srv.proc.poll() is None
        finally:
            pg.start()
            marks["pg restarted"] = time.monotonic() - t0
        spooled = m.stats.get("spooled_frames")
        assert spooled > 0
        assert m.stats.get("errors") > 0

        loop.run(20, pause=0.005)
        assert m.finish(timeout=120)
        marks["client finished"] = time.monotonic() - t0
        assert isinstance(m.run_id, int)
        n = numbered(m)
        frames = frames_of(srv.url, m.run_id)
        seqs_by_id = [f["seq"] for f in sorted(frames, key=lambda f: f["id"])]
        assert_exactly_once_in_order(seqs_by_id, n)
        assert m.stats.get("dropped_frames") == 0
        assert m.stats.get("replayed_frames") >= spooled
        series = api.get(f"/runs/{m.run_id}/scalars", params={"name": "loss"}).json()
        assert [len(s["steps"]) for s in series if s["name"] == "loss"] == [loop.step]
        # the worker (embedded, or the two worker processes) survived the outage
        wait_until(lambda: all_analysed(srv.url, m.run_id), timeout=180)
        marks["all analysed"] = time.monotonic() - t0
        db = create_engine(url)
        with db.connect() as conn:
            jobs = "procrastinate_jobs" if POSTGRES_MODE else "job"
            retried = conn.execute(text(f"SELECT count(*) FROM {jobs} WHERE attempts > 1")).scalar()
        db.dispose()
        assert post_frame(api, probe_run, weight_frame(0, 0), seq=0).status_code == 202
        print(
            f"PostgreSQL down/up: {len(n)} frames, {spooled} spooled and replayed, {retried} "
            "job(s) re-run after the outage, timeline "
            + ", ".join(f"{k} {v:.0f} s" for k, v in marks.items())
        )
    finally:
        api.close()
        srv.stop()


# --- 4. kill -9 mid-ingest ------------------------------------------------------------------


def big_frame(seq: int) -> bytes:
    gen = torch.Generator().manual_seed(seq)
    tensors = {"big.weight": torch.randn(1024, 2048, generator=gen)}  # 8 MiB
    return encode_frame(FrameKind.WEIGHTS, 100, seq, tensors, {"dtype": "float32"})


@embedded_only(
    "the start-up clean-up of temp uploads and orphan blobs is immediate only when no other "
    "API process can share the blob store (postgres mode waits 10 minutes)"
)
def test_kill9_mid_upload_leaves_no_partial_state(tmp_path: Path) -> None:
    data_dir = tmp_path / "server"
    blob_dir = data_dir / "blobs"
    srv = ServerProcess(data_dir, args=["--no-worker"]).start()
    port = srv.port
    body = big_frame(1)
    chunk = 64 << 10
    try:
        with httpx.Client(base_url=f"{srv.url}/api/v1", timeout=30) as api:
            run_id = make_run(api, project="faults", name="mid-upload")
            assert post_frame(api, run_id, weight_frame(0, 0), seq=0).status_code == 202

        def slow_body() -> Iterator[bytes]:
            for start in range(0, len(body), chunk):
                yield body[start : start + chunk]
                time.sleep(0.02)  # ~2.5 s for the whole body: the kill lands mid-stream

        outcome: list[object] = []

        def upload() -> None:
            try:
                with httpx.Client(timeout=30) as c:
                    outcome.append(
                        c.post(
                            f"{srv.url}/api/v1/runs/{run_id}/frames",
                            content=slow_body(),
                            headers={
                                "Idempotency-Key": f"{run_id}:1",
                                "Content-Length": str(len(body)),
                            },
                        )
                    )
            except httpx.HTTPError as exc:
                outcome.append(exc)

        sender = threading.Thread(target=upload)
        sender.start()
        wait_until(
            lambda: any(p.stat().st_size > 4 * chunk for p in temp_uploads(blob_dir)),
            timeout=30,
            interval=0.02,
        )
        srv.kill()
        sender.join(30)
        assert len(outcome) == 1
        assert isinstance(outcome[0], httpx.HTTPError)
        partial = temp_uploads(blob_dir)
        assert len(partial) == 1
        assert 0 < partial[0].stat().st_size < len(body)
        # as if a crash also fell between a blob's rename and its row insert
        orphan = blob_dir / "runs" / str(run_id) / "weights" / "000000000007-deadbeef.safetensors"
        orphan.parent.mkdir(parents=True, exist_ok=True)
        orphan.write_bytes(weight_frame(7, 7))

        srv = ServerProcess(data_dir, port=port, args=["--no-worker"]).start()
        assert temp_uploads(blob_dir) == []
        assert not orphan.exists()
        assert_blobs_consistent(data_dir)
        assert [f["seq"] for f in frames_of(srv.url, run_id)] == [0]
        with httpx.Client(base_url=f"{srv.url}/api/v1", timeout=60) as api:
            # the client's retry of the interrupted frame is stored once
            assert post_frame(api, run_id, body, seq=1).status_code == 202
            assert post_frame(api, run_id, body, seq=1).status_code == 200
            stored = api.get(f"/runs/{run_id}/frames").json()
        assert [(f["seq"], f["bytes"]) for f in stored] == [
            (0, len(weight_frame(0, 0))),
            (1, len(body)),
        ]
        assert_blobs_consistent(data_dir)
    finally:
        srv.kill()
