"""Bounded ingest load test: concurrent runs post frames and scalars to a real server.

Starts ``spectrawatch server`` (SQLite, embedded worker) on loopback, then R concurrent runs
each post F update-sketch frames (one (16, 640) float32 tensor per layer, 4 layers, 164 KiB;
``--small``: one (4, 64) tensor, 1.2 KiB) and scalar batches as fast as the server accepts them,
from ``--procs`` load-generator processes (R runs each). Reports sustained frames/s, p50/p99
ingest latency, CPU milliseconds per frame of the server and of the load generator (the
machine-independent part on a shared box), frames per commit, worker backlog drain time,
server RSS growth, and checks that every frame is stored exactly once.

    python benchmarks/ingest_load.py --runs 8 --frames 250 [--no-worker] [--small] [--procs 2]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spectrawatch.wire import FrameKind, encode_frame
from tests.servers import ServerProcess


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sketch_frame(seq: int, layers: int = 4, rows: int = 16, dim: int = 640) -> bytes:
    tensors = {f"layer{i}": torch.randn(rows, dim) for i in range(layers)}
    steps = list(range(seq * rows, (seq + 1) * rows))
    info = {"steps": steps, "sketch": {"dim": dim, "seed": 1}, "window": 32}
    return encode_frame(FrameKind.UPDATE_SKETCH, steps[0], seq, tensors, info)


async def one_run(
    client: httpx.AsyncClient, run: str, frames: list[bytes], lat: list[float]
) -> None:
    created = await client.post("/runs", json={"project": "load", "name": run})
    run_id = created.json()["id"]
    for seq, body in enumerate(frames):
        t0 = time.perf_counter()
        r = await client.post(
            f"/runs/{run_id}/frames", content=body, headers={"Idempotency-Key": f"{run_id}:{seq}"}
        )
        lat.append(time.perf_counter() - t0)
        if r.status_code != 202:
            raise RuntimeError(f"frame {seq} of run {run_id}: {r.status_code} {r.text}")
        if seq % 10 == 0:
            rows = [
                {"step": seq * 16 + i, "name": "loss", "value": 1.0 / (1 + seq)} for i in range(16)
            ]
            await client.post(f"/runs/{run_id}/scalars", json=rows)


async def load(url: str, proc: int, runs: int, bodies: list[bytes]) -> list[float]:
    lat: list[float] = []
    limits = httpx.Limits(max_connections=runs)
    async with httpx.AsyncClient(base_url=f"{url}/api/v1", timeout=120, limits=limits) as client:
        await asyncio.gather(
            *(one_run(client, f"run-{proc}-{r}", bodies, lat) for r in range(runs))
        )
    return lat


def load_process(url: str, proc: int, runs: int, bodies: list[bytes], start: Any, out: Any) -> None:
    """One load-generator process: wait for the others, post, send (t0, t1, cpu, latencies)."""
    start.wait()
    t0, c0 = time.time(), time.process_time()
    lat = asyncio.run(load(url, proc, runs, bodies))
    out.put((t0, time.time(), time.process_time() - c0, lat))


def run_load(
    url: str, procs: int, runs: int, bodies: list[bytes]
) -> tuple[float, float, list[float]]:
    """``procs`` forked load generators at once; (elapsed s, their CPU s, latencies s)."""
    ctx = mp.get_context("fork")
    start, out = ctx.Barrier(procs), ctx.Queue()
    workers = [
        ctx.Process(target=load_process, args=(url, i, runs, bodies, start, out))
        for i in range(procs)
    ]
    for w in workers:
        w.start()
    results = [out.get() for _ in workers]
    for w in workers:
        w.join()
        if w.exitcode != 0:
            raise SystemExit(f"load generator exited with {w.exitcode}")
    elapsed = max(r[1] for r in results) - min(r[0] for r in results)
    return elapsed, sum(r[2] for r in results), [x for r in results for x in r[3]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--frames", type=int, default=250)
    ap.add_argument("--no-worker", action="store_true", help="measure ingest alone (no analysis)")
    ap.add_argument("--small", action="store_true", help="1.2 KiB frames: per-request costs")
    ap.add_argument(
        "--layers", type=int, default=4, help="tensors per frame (GPT-2 small sends 150)"
    )
    ap.add_argument("--procs", type=int, default=1, help="load-generator processes")
    ap.add_argument(
        "--database-url", help="e.g. a PostgreSQL URL (empty database; default: SQLite in tmp)"
    )
    ap.add_argument("--no-drain", action="store_true", help="do not wait for the worker backlog")
    args = ap.parse_args()
    if args.small:
        bodies = [sketch_frame(seq, layers=1, rows=4, dim=64) for seq in range(args.frames)]
    else:
        bodies = [sketch_frame(seq, layers=args.layers) for seq in range(args.frames)]
    env = {"SPECTRAWATCH_LOG_LEVEL": "warning"}
    if args.no_worker:
        env["SPECTRAWATCH_RUN_WORKER"] = "false"
    if args.database_url:
        env["SPECTRAWATCH_DATABASE_URL"] = args.database_url
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(Path(tmp), env=env).start()
        try:
            assert server.proc is not None
            pid = server.proc.pid
            rss0, cpu0 = rss_mib(pid), cpu_seconds(pid)
            elapsed, client_cpu, lat = run_load(server.url, args.procs, args.runs, bodies)
            rss1, server_cpu = rss_mib(pid), cpu_seconds(pid) - cpu0
            total = args.procs * args.runs * args.frames
            t_drain = time.perf_counter()
            engine = create_engine(
                args.database_url or f"sqlite:///{Path(tmp) / 'spectrawatch.db'}"
            )
            with engine.connect() as db:
                while not (args.no_worker or args.no_drain) and db.scalar(
                    text("SELECT count(*) FROM job WHERE status != 'done'")
                ):
                    db.rollback()
                    time.sleep(0.5)
                drain = time.perf_counter() - t_drain
                stored = db.scalar(text("SELECT count(*) FROM frame"))
                distinct = db.scalar(text("SELECT count(DISTINCT idempotency_key) FROM frame"))
                commits = None  # PostgreSQL: xmin names the transaction that inserted a row
                if engine.dialect.name == "postgresql":
                    commits = db.scalar(text("SELECT count(DISTINCT xmin::text) FROM frame"))
            engine.dispose()
            rss2 = rss_mib(server.proc.pid)
        finally:
            server.stop()
    lat_ms = sorted(x * 1000 for x in lat)
    p99 = lat_ms[int(0.99 * (len(lat_ms) - 1))]
    cores = len(os.sched_getaffinity(0))
    print(f"machine: {platform.machine()} {platform.processor() or ''} cores={cores}")
    print(f"frames sent {total}, stored {stored}, distinct keys {distinct}, lost {total - stored}")
    rate = total / elapsed
    runs = args.procs * args.runs
    print(f"sustained ingest: {rate:.0f} frames/s over {elapsed:.1f} s ({runs} runs at once)")
    print(
        f"CPU per frame: server {1000 * server_cpu / total:.2f} ms, "
        f"load generator {1000 * client_cpu / total:.2f} ms ({args.procs} process(es))"
    )
    if commits:
        print(f"frames per insert transaction: {stored / commits:.2f} ({commits} transactions)")
    print(f"latency p50 {statistics.median(lat_ms):.1f} ms, p99 {p99:.1f} ms")
    print(f"worker backlog drain after load: {drain:.1f} s")
    print(f"server RSS: {rss0:.0f} MiB before, {rss1:.0f} after load, {rss2:.0f} after drain")
    if stored != total or distinct != total:
        raise SystemExit("frames lost or duplicated")


if __name__ == "__main__":
    main()
