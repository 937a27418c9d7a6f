"""``spectrawatch db copy`` rate: a SQLite server database of realistic size (one long run's
frames, per-layer metrics, spectra and scalars) copied into TARGET, rows per second and the
process's peak memory before and after the copy (it must not grow with the table).

    python benchmarks/db_copy.py --target postgresql+psycopg://u:p@host/emptydb
    python benchmarks/db_copy.py                       # into a temporary SQLite file

The source is written with sqlite3 directly (fast, and not what is measured); TARGET must be an
empty database (``--replace`` is passed, so a rerun reuses it).
"""

from __future__ import annotations

import argparse
import json
import resource
import sqlite3
import tempfile
import time
from pathlib import Path

from spectrawatch_server.db import migrate, transfer
from spectrawatch_server.db.session import make_engine

NOW = "2026-11-29 12:00:00.000000"


def build(path: Path, frames: int, layers: int, metrics: int) -> int:
    """A migrated SQLite database with one run of ``frames`` analysed weight frames; rows."""
    engine = make_engine(f"sqlite:///{path}")
    migrate.upgrade(engine)
    engine.dispose()
    db = sqlite3.connect(path)
    db.execute(f"INSERT INTO project VALUES (1, 'bench', '{NOW}')")
    db.execute(
        "INSERT INTO run (id, project_id, name, uid, status, config, tags, summary, client_stats,"
        f" created_at, updated_at) VALUES (1, 1, 'long', '{'0' * 32}', 'finished', "
        f"'{{\"lr\": 0.001}}', '[]', '{{}}', '{{}}', '{NOW}', '{NOW}')"
    )
    names = [f"blocks.{i}.weight" for i in range(layers)]
    for seq in range(frames):
        step = 100 * seq
        db.execute(
            "INSERT INTO frame (id, run_id, kind, step, seq, idempotency_key, blob_key, encoding,"
            " bytes, info, layers, nonfinite, nonfinite_steps, status, created_at) VALUES "
            "(?, 1, 'weights', ?, ?, ?, ?, 'zstd', 1000000, '{}', ?, '{}', '{}', 'done', ?)",
            (
                seq + 1,
                step,
                seq,
                f"1:{seq}",
                f"runs/1/weights/{seq:012d}-0000abcd.safetensors.zst",
                json.dumps(names),
                NOW,
            ),
        )
        db.execute(
            "INSERT INTO job (frame_id, status, attempts, created_at) VALUES (?, 'done', 1, ?)",
            (seq + 1, NOW),
        )
        db.executemany(
            "INSERT INTO metric (run_id, frame_id, analysis, layer, name, step, value) "
            "VALUES (1, ?, 'htsr', ?, ?, ?, ?)",
            (
                (seq + 1, layer, f"htsr.m{m}", step, 1.0 + m + seq / frames)
                for layer in names
                for m in range(metrics)
            ),
        )
        db.executemany(
            "INSERT INTO spectrum (run_id, frame_id, analysis, layer, step, payload) "
            "VALUES (1, ?, 'htsr', ?, ?, ?)",
            ((seq + 1, layer, step, json.dumps({"hist": list(range(50))})) for layer in names),
        )
        db.executemany(
            "INSERT INTO scalar (run_id, step, name, value) VALUES (1, ?, ?, ?)",
            ((step + k, "loss", 1.0 / (step + k + 1)) for k in range(100)),
        )
    db.executemany(
        "INSERT INTO metric_series VALUES (1, ?, ?, ?)",
        ((f"htsr.m{m}", layer, frames) for layer in names for m in range(metrics)),
    )
    db.commit()
    total = sum(
        db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
        for t in ("project", "run", "frame", "job", "metric", "spectrum", "scalar", "metric_series")
    )
    db.close()
    return int(total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=None, help="empty database URL (default: temp SQLite)")
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--metrics", type=int, default=20, help="metrics per layer and frame")
    parser.add_argument("--batch-rows", type=int, default=transfer.BATCH_ROWS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "spectrawatch.db"
        started = time.monotonic()
        rows = build(source, args.frames, args.layers, args.metrics)
        size = source.stat().st_size / 2**20
        built = time.monotonic() - started
        print(f"source: {rows:,} rows, {size:,.0f} MiB, built in {built:.0f} s")
        target = args.target or f"sqlite:///{Path(tmp) / 'copy.db'}"
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        report = transfer.copy_database(
            f"sqlite:///{source}", target, replace=True, batch_rows=args.batch_rows
        )
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"copied {report.rows:,} rows into {transfer.shown(target)} in {report.seconds:.1f} s: "
        f"{report.rows / report.seconds:,.0f} rows/s; peak RSS {before:.0f} MiB before the "
        f"copy, {after:.0f} MiB after"
    )
    for table in report.tables:
        if table.rows:
            print(f"  {table.name:<16} {table.rows:>12,}")


if __name__ == "__main__":
    main()
