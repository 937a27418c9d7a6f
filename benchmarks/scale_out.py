"""Scale-out mode: ingest frames/s on PostgreSQL vs SQLite, and job throughput with 1 vs 2 workers.

Real processes throughout: ``spectrawatch server`` (API), ``spectrawatch worker`` (procrastinate
on PostgreSQL from ``.ci/postgres.sh``), one fresh database per measurement.

* ingest: frames/s posted by 1 and by 4 client threads (small weight frames, no worker running,
  so only the ingest path is timed: body validation, blob write, frame row + job in one commit);
* drain: a backlog of ``runs x frames`` weight frames is queued with no worker; then W workers
  start and the drain time is taken from procrastinate's own events (first job start -> last
  job end), so worker start-up is excluded. Jobs of one run execute in order (per-run lock),
  so parallelism comes from several runs.

    eval "$(.ci/postgres.sh)"
    .venv/bin/python -m benchmarks.scale_out --runs 4 --frames 6 --size 256 --layers 4
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch
from sqlalchemy import create_engine, text

from benchmarks.ingest_load import sketch_frame
from spectrawatch.wire import FrameKind, encode_frame
from tests.servers import ServerProcess, fresh_database, wait_until


def weight_frame(step: int, seq: int, layers: int, size: int, seed: int) -> bytes:
    gen = torch.Generator().manual_seed(seed * 100_003 + seq)
    tensors = {f"h.{i}.weight": torch.randn(size, size, generator=gen) for i in range(layers)}
    return encode_frame(FrameKind.WEIGHTS, step, seq, tensors, {"dtype": "float32"})


def post_all(api_url: str, run_id: int, bodies: list[bytes], threads: int, offset: int) -> None:
    def send(part: list[tuple[int, bytes]]) -> None:
        with httpx.Client(base_url=f"{api_url}/api/v1", timeout=60) as client:
            for seq, body in part:
                key = f"{run_id}:{offset + seq}"
                r = client.post(
                    f"/runs/{run_id}/frames", content=body, headers={"Idempotency-Key": key}
                )
                assert r.status_code == 202, r.text

    items = list(enumerate(bodies))
    workers = [threading.Thread(target=send, args=(items[i::threads],)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def make_run(api_url: str, name: str) -> int:
    r = httpx.post(f"{api_url}/api/v1/runs", json={"project": "bench", "name": name}, timeout=30)
    assert r.status_code in (200, 201), r.text
    return int(r.json()["id"])


def bench_ingest(env: dict[str, str], root: Path, frames: int) -> dict[int, float]:
    api = ServerProcess(root, env=env, args=["--no-worker"]).start()
    try:
        run_id = make_run(api.url, "ingest")
        out = {}
        for threads in (1, 4):
            bodies = [weight_frame(i, i, 2, 24, threads) for i in range(frames)]
            start = time.perf_counter()
            post_all(api.url, run_id, bodies, threads, offset=threads * 1_000_000)
            out[threads] = frames / (time.perf_counter() - start)
        return out
    finally:
        api.stop()


def start_worker(env: dict[str, str], root: Path, name: str) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "spectrawatch",
        "worker",
        "--device",
        "cpu",
        "--name",
        name,
        "--data-dir",
        str(root),
    ]
    with open(root / f"{name}.log", "ab") as log:
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )


def bench_drain(
    pg: str, root: Path, workers: int, runs: int, frames: int, body: Callable[[int, int], bytes]
) -> tuple[float, int, float]:
    """Drain time of ``runs x frames`` queued frames (``body(seq, run)``) by ``workers``."""
    with fresh_database(pg, "sw_bench") as url:
        env = {
            "SPECTRAWATCH_DATABASE_URL": url,
            "SPECTRAWATCH_QUEUE": "procrastinate",
            "SPECTRAWATCH_BLOB_DIR": str(root / "blobs"),
            "SPECTRAWATCH_DEVICE": "cpu",
            "SPECTRAWATCH_LOG_LEVEL": "warning",
        }
        api = ServerProcess(root / "api", env=env).start()
        procs: list[subprocess.Popen[bytes]] = []
        try:
            for r in range(runs):
                run_id = make_run(api.url, f"drain-{r}")
                bodies = [body(s, r) for s in range(frames)]
                post_all(api.url, run_id, bodies, 1, offset=0)
            # one intra-op thread per worker: W workers use W cores (oversubscribed OpenMP
            # threads spin and distort the comparison on a small, shared machine)
            wenv = {**env, "OMP_NUM_THREADS": "1"}
            procs = [start_worker(wenv, root, f"bench-{workers}-{i}") for i in range(workers)]
            db = create_engine(url)
            total = runs * frames

            def done() -> bool:
                with db.connect() as conn:
                    n = conn.scalar(text("SELECT count(*) FROM frame WHERE status = 'done'"))
                return int(n or 0) == total

            wait_until(done, timeout=3600, interval=0.5)
            with db.connect() as conn:
                first, last, median = conn.execute(
                    text(
                        "WITH ev AS (SELECT e.job_id, e.type, e.at FROM procrastinate_events e "
                        "  JOIN procrastinate_jobs j ON j.id = e.job_id "
                        "  WHERE j.task_name = 'spectrawatch.analyse_frame'), "
                        "dur AS (SELECT s.job_id, extract(epoch FROM f.at - s.at) AS d "
                        "  FROM ev s JOIN ev f ON f.job_id = s.job_id "
                        "  WHERE s.type = 'started' AND f.type = 'succeeded') "
                        "SELECT (SELECT min(at) FROM ev WHERE type = 'started'), "
                        "(SELECT max(at) FROM ev WHERE type = 'succeeded'), "
                        "(SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d) FROM dur)"
                    )
                ).one()
            db.dispose()
            return (last - first).total_seconds(), total, float(median)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                p.wait(120)
            api.stop()


def bench_ingest_both(pg: str, root: Path, frames: int) -> None:
    """Ingest frames/s with 1 and 4 client threads on SQLite and on PostgreSQL."""
    sqlite = bench_ingest({}, root / "sqlite", frames)
    with fresh_database(pg, "sw_bench") as url:
        postgres = bench_ingest(
            {"SPECTRAWATCH_DATABASE_URL": url, "SPECTRAWATCH_QUEUE": "procrastinate"},
            root / "postgres",
            frames,
        )
    for threads in (1, 4):
        print(
            f"ingest, {threads} client thread(s): SQLite {sqlite[threads]:.0f} frames/s, "
            f"PostgreSQL+procrastinate {postgres[threads]:.0f} frames/s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ingest-frames", type=int, default=200)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument(
        "--sketch-layers",
        type=int,
        default=0,
        help="drain update-sketch frames of this many tensors x (16, 640) instead of weight "
        "frames (150 = GPT-2 small: 149 parameter tensors + the whole model)",
    )
    parser.add_argument("--skip-ingest", action="store_true")
    args = parser.parse_args()
    if args.sketch_layers:
        shape = f"{args.sketch_layers} x (16, 640) sketch"

        def body(seq: int, run: int) -> bytes:
            return sketch_frame(seq, args.sketch_layers)
    else:
        shape = f"{args.layers} x ({args.size}, {args.size})"

        def body(seq: int, run: int) -> bytes:
            return weight_frame(10 * seq, seq, args.layers, args.size, run)

    pg = os.environ.get("SPECTRAWATCH_TEST_POSTGRES_URL")
    if not pg:
        raise SystemExit('SPECTRAWATCH_TEST_POSTGRES_URL is unset: eval "$(.ci/postgres.sh)"')
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if not args.skip_ingest:
            bench_ingest_both(pg, root, args.ingest_frames)
        for workers in (1, 2):
            seconds, jobs, median = bench_drain(
                pg,
                root / f"drain{workers}",
                workers,
                args.runs,
                args.frames,
                body,
            )
            print(
                f"drain, {workers} worker(s): {jobs} jobs ({args.runs} runs x {args.frames}, "
                f"{shape}) in {seconds:.1f} s = "
                f"{jobs / seconds:.2f} jobs/s (median job {median:.2f} s)"
            )


if __name__ == "__main__":
    main()
