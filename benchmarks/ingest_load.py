"""Bounded ingest load test: concurrent runs post frames and scalars to a real server.

Starts ``spectrawatch server`` (SQLite, embedded worker) on loopback, then R concurrent runs
each post F update-sketch frames (one (16, 640) float32 tensor per layer, 4 layers) and scalar
batches as fast as the server accepts them. Reports sustained frames/s, p50/p99 ingest latency,
worker backlog drain time, server RSS growth, and checks that every frame is stored exactly once.

    python benchmarks/ingest_load.py --runs 8 --frames 250
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spectrawatch.wire import FrameKind, encode_frame
from tests.servers import ServerProcess


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def sketch_frame(seq: int, layers: int = 4, rows: int = 16, dim: int = 640) -> bytes:
    tensors = {f"layer{i}": torch.randn(rows, dim) for i in range(layers)}
    steps = list(range(seq * rows, (seq + 1) * rows))
    info = {"steps": steps, "sketch": {"dim": dim, "seed": 1}, "window": 32}
    return encode_frame(FrameKind.UPDATE_SKETCH, steps[0], seq, tensors, info)


async def one_run(
    client: httpx.AsyncClient, run: int, frames: list[bytes], lat: list[float]
) -> None:
    created = await client.post("/runs", json={"project": "load", "name": f"run-{run}"})
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


async def load(url: str, runs: int, frames: int) -> tuple[float, list[float]]:
    bodies = [sketch_frame(seq) for seq in range(frames)]
    lat: list[float] = []
    limits = httpx.Limits(max_connections=runs)
    async with httpx.AsyncClient(base_url=f"{url}/api/v1", timeout=120, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one_run(client, r, bodies, lat) for r in range(runs)))
        elapsed = time.perf_counter() - t0
    return elapsed, lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--frames", type=int, default=250)
    ap.add_argument("--no-worker", action="store_true", help="measure ingest alone (no analysis)")
    args = ap.parse_args()
    env = {"SPECTRAWATCH_LOG_LEVEL": "warning"}
    if args.no_worker:
        env["SPECTRAWATCH_RUN_WORKER"] = "false"
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(Path(tmp), env=env).start()
        try:
            assert server.proc is not None
            rss0 = rss_mib(server.proc.pid)
            elapsed, lat = asyncio.run(load(server.url, args.runs, args.frames))
            rss1 = rss_mib(server.proc.pid)
            total = args.runs * args.frames
            t_drain = time.perf_counter()
            db = sqlite3.connect(Path(tmp) / "spectrawatch.db")
            while (
                not args.no_worker
                and db.execute("SELECT count(*) FROM job WHERE status != 'done'").fetchone()[0]
            ):
                time.sleep(0.5)
            drain = time.perf_counter() - t_drain
            stored = db.execute("SELECT count(*) FROM frame").fetchone()[0]
            distinct = db.execute("SELECT count(DISTINCT idempotency_key) FROM frame").fetchone()[0]
            db.close()
            rss2 = rss_mib(server.proc.pid)
        finally:
            server.stop()
    lat_ms = sorted(x * 1000 for x in lat)
    p99 = lat_ms[int(0.99 * (len(lat_ms) - 1))]
    cores = len(os.sched_getaffinity(0))
    print(f"machine: {platform.machine()} {platform.processor() or ''} cores={cores}")
    print(f"frames sent {total}, stored {stored}, distinct keys {distinct}, lost {total - stored}")
    rate = total / elapsed
    print(f"sustained ingest: {rate:.0f} frames/s over {elapsed:.1f} s ({args.runs} runs at once)")
    print(f"latency p50 {statistics.median(lat_ms):.1f} ms, p99 {p99:.1f} ms")
    print(f"worker backlog drain after load: {drain:.1f} s")
    print(f"server RSS: {rss0:.0f} MiB before, {rss1:.0f} after load, {rss2:.0f} after drain")
    if stored != total or distinct != total:
        raise SystemExit("frames lost or duplicated")


if __name__ == "__main__":
    main()
