"""Embedded analysis worker throughput on a backlog of many small frames from real clients.

Phase 1 (``--fill DIR``): starts ``spectrawatch server`` (SQLite, worker off) and ``--clients``
training processes (``spectrawatch.Monitor`` on a 32-64-64-8 MLP, AdamW: an update sketch
every step in 4-step frames, theta, weights and activations every 10 steps), which leaves a
backlog of pending analysis jobs in DIR. Phase 2 (``--drain DIR``): copies DIR, opens it as the
server would (``build_state``) and runs the embedded queue until no job is left, timing it;
``--profile`` prints the top cumulative cProfile entries, ``--dump FILE`` writes every stored
metric, spectrum and alert (for comparing the results of two versions of the worker).

    python benchmarks/worker_throughput.py --fill /tmp/wt --clients 4 --steps 200
    python benchmarks/worker_throughput.py --drain /tmp/wt [--profile] [--dump before.json]
    python benchmarks/worker_throughput.py --compare before.json after.json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import text

CLIENT = r"""
import sys, torch
from torch import nn
import spectrawatch
url, run, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(1)
torch.manual_seed(sum(map(ord, run)))
model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
x = torch.randn(128, 32)
m = spectrawatch.Monitor(url=url, project="throughput", run=run, frame_steps=4, theta_every=10,
    weights_every=10, activations_every=10, timeout_s=30.0)
m.attach(model, opt, probe=x[:32])
for s in range(steps):
    loss = model(x).pow(2).mean(); opt.zero_grad(); loss.backward(); opt.step()
    m.log({"loss": loss}, step=s + 1)
assert m.finish(timeout=300)
"""


def fill(data_dir: Path, clients: int, steps: int) -> None:
    from tests.servers import ServerProcess

    if data_dir.exists():
        raise SystemExit(f"{data_dir} exists")
    server = ServerProcess(data_dir, env={"SPECTRAWATCH_RUN_WORKER": "false"}).start()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPECTRAWATCH_LOG_LEVEL": "warning"}
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", CLIENT, server.url, f"r{i}", str(steps)], env=env
            )
            for i in range(clients)
        ]
        if any(p.wait() != 0 for p in procs):
            raise SystemExit("a client failed")
    finally:
        server.stop()


def dump(sessions: object, path: Path) -> None:
    """Every result row, in a stable order, without ids or times."""
    queries = {
        "metric": "SELECT r.name, m.frame_id IS NULL, f.seq, f.kind, m.step, m.analysis, "
        "m.layer, m.name, m.value FROM metric m JOIN run r ON r.id = m.run_id "
        "LEFT JOIN frame f ON f.id = m.frame_id ORDER BY 1, 4, 3, 5, 6, 7, 8",
        "spectrum": "SELECT r.name, f.seq, f.kind, s.step, s.analysis, s.layer, s.payload "
        "FROM spectrum s JOIN run r ON r.id = s.run_id JOIN frame f ON f.id = s.frame_id "
        "ORDER BY 1, 3, 2, 4, 5, 6",
        "metric_series": "SELECT r.name, ms.name, ms.layer, ms.points "
        "FROM metric_series ms JOIN run r ON r.id = ms.run_id ORDER BY 1, 2, 3",
        "alert": "SELECT r.name, a.rule, a.status, a.layer, a.step FROM alert a "
        "JOIN run r ON r.id = a.run_id ORDER BY 1, 2, 4, 5",
        "frame": "SELECT r.name, f.kind, f.seq, f.status, f.error FROM frame f "
        "JOIN run r ON r.id = f.run_id ORDER BY 1, 2, 3",
    }
    with sessions() as session:  # type: ignore[operator]
        out = {k: [list(row) for row in session.execute(text(q))] for k, q in queries.items()}
    path.write_text(json.dumps(out, default=str))
    print("dumped " + ", ".join(f"{k}: {len(v)}" for k, v in out.items()))


def compare(before: Path, after: Path) -> None:
    """Exit non-zero unless two ``--dump`` files hold the same rows; metric values may differ
    by round-off (relative 1e-12: the HT-SR whole-model summaries are not bit-reproducible
    from one process to the next)."""
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    for table in a:
        if len(a[table]) != len(b[table]):
            raise SystemExit(f"{table}: {len(a[table])} != {len(b[table])} rows")
        off = 0
        for x, y in zip(a[table], b[table], strict=True):
            if table == "metric" and x[:-1] == y[:-1] and None not in (x[-1], y[-1]):
                off += x[-1] != y[-1]
                if abs(x[-1] - y[-1]) > 1e-12 * max(abs(x[-1]), abs(y[-1])):
                    raise SystemExit(f"metric differs: {x} != {y}")
            elif x != y:
                raise SystemExit(f"{table} differs: {x} != {y}")
        print(f"{table}: {len(a[table])} rows equal" + (f" ({off} within 1e-12)" if off else ""))


def drain(source: Path, profile: bool, dump_to: Path | None) -> None:
    from spectrawatch_server.app import build_state
    from spectrawatch_server.config import ServerSettings

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        shutil.copytree(source, data_dir)
        settings = ServerSettings(data_dir=data_dir, device="cpu", run_webhooks=False)
        state = build_state(settings)
        queue = state.queue
        with state.sessions() as session:
            jobs = session.scalar(text("SELECT count(*) FROM job WHERE status = 'pending'"))
            kinds = session.execute(
                text("SELECT kind, count(*) FROM frame GROUP BY kind ORDER BY kind")
            ).all()
        print(f"backlog: {jobs} jobs; frames by kind: {dict(kinds)}")
        profiler = cProfile.Profile() if profile else None
        started, cpu = time.perf_counter(), time.process_time()
        if profiler is not None:
            profiler.enable()
        while queue.run_once():  # type: ignore[attr-defined]
            pass
        if profiler is not None:
            profiler.disable()
        took, cpu = time.perf_counter() - started, time.process_time() - cpu
        with state.sessions() as session:
            left = session.scalar(text("SELECT count(*) FROM job WHERE status != 'done'"))
            done = session.scalar(text("SELECT count(*) FROM frame WHERE status = 'done'"))
        cores = len(os.sched_getaffinity(0))
        print(f"machine: {platform.machine()} cores={cores} load={os.getloadavg()[0]:.1f}")
        print(f"drained {jobs} jobs in {took:.1f} s: {jobs / took:.1f} frames/s")
        print(f"worker CPU: {cpu:.1f} s, {1000 * cpu / jobs:.0f} ms a frame")
        print(f"jobs not done: {left}; frames done: {done}")
        if profiler is not None:
            profiler.dump_stats(os.environ.get("WT_PROFILE", "/dev/null"))
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(45)
        if dump_to is not None:
            dump(state.sessions, dump_to)
        state.engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fill", type=Path, help="make a backlog in this new data directory")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--drain", type=Path, help="drain a copy of this data directory's backlog")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--dump", type=Path, help="write the stored results here (JSON)")
    ap.add_argument("--compare", type=Path, nargs=2, help="two --dump files to compare")
    args = ap.parse_args()
    if args.fill:
        fill(args.fill, args.clients, args.steps)
    if args.drain:
        drain(args.drain, args.profile, args.dump)
    if args.compare:
        compare(*args.compare)


if __name__ == "__main__":
    main()
