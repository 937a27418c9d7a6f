"""Cost of one embedded-queue claim against the backlog of pending jobs, on SQLite and PostgreSQL.

For each backlog size a fresh database (schema from the migrations) gets one run with that
many frames, each with a pending job (after ``--done`` frames whose jobs are finished: the
queue keeps finished jobs); then ``--claims`` claims run as the embedded worker makes them
(:meth:`EmbeddedQueue.run_once`: the expired-job check and the claim, one transaction), each
claimed job left leased (a job body that does nothing) before the next claim. Printed: the
median and p90 milliseconds of a claim, and (``--plan``) the plans of its reads of the job
table (``EXPLAIN QUERY PLAN`` / ``EXPLAIN``).

    PYTHONPATH=client:server python benchmarks/job_claim.py [--backlogs 100,10000,100000] \\
        [--done 100000] [--postgres postgresql+psycopg://user:pw@host/db]  # a database to fill
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import Engine, event, insert, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spectrawatch_server.db import migrate
from spectrawatch_server.db.models import Frame, Job
from spectrawatch_server.db.session import make_engine, make_session_factory
from spectrawatch_server.queue.embedded import EmbeddedQueue
from spectrawatch_server.storage import repository as repo


def fill(engine: Engine, backlog: int, done: int = 0) -> None:
    """One run with ``done`` analysed frames (their jobs ``done``, kept as the queue keeps them)
    then ``backlog`` frames with pending jobs."""
    sessions = make_session_factory(engine)
    with sessions.begin() as session:
        project, _ = repo.get_or_create_project(session, "bench")
        run, _ = repo.get_or_create_run(session, project, "backlog", {}, [])
        run_id = run.id
    for start in range(0, done + backlog, 10_000):
        n = min(10_000, done + backlog - start)
        with sessions.begin() as session:
            rows = [
                {
                    "run_id": run_id,
                    "kind": "weights",
                    "step": start + i,
                    "seq": start + i,
                    "idempotency_key": f"{run_id}:{start + i}",
                    "blob_key": "",
                    "bytes": 0,
                }
                for i in range(n)
            ]
            ids = session.scalars(insert(Frame).returning(Frame.id), rows).all()
            jobs = [
                {"frame_id": i, "status": "done" if start + k < done else "pending"}
                for k, i in enumerate(ids)
            ]
            session.execute(insert(Job), jobs)
    if engine.dialect.name == "postgresql":  # as autovacuum would; the server never runs
        with engine.begin() as conn:  # ANALYZE on SQLite (no sqlite_stat1): nor does this
            conn.execute(text("ANALYZE"))


def claim_ms(engine: Engine, claims: int) -> list[float]:
    """Milliseconds of each of ``claims`` claims, as the embedded worker makes them
    (:meth:`EmbeddedQueue.run_once` with a job body that does nothing: the claimed job stays
    leased, the next claim takes the next one)."""
    queue = EmbeddedQueue(make_session_factory(engine), lambda _frame: None, max_attempts=5)
    times = []
    for _ in range(claims):
        start = time.perf_counter()
        assert queue.run_once()
        times.append((time.perf_counter() - start) * 1000)
    return times


def plan(engine: Engine) -> list[str]:
    """The plans of the claim's reads of the job table, as the database runs them."""
    captured: list[tuple[str, object]] = []

    def record(_conn: object, _cur: object, statement: str, params: object, *_: object) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM job" in statement:
            captured.append((statement, params))

    event.listen(engine, "before_cursor_execute", record)
    try:
        claim_ms(engine, 1)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    lines = []
    with engine.connect() as conn:
        for statement, params in captured:
            explain = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN "
            rows = conn.exec_driver_sql(explain + statement, params).all()  # type: ignore[arg-type]
            lines.append(" ".join(statement.split())[:160])
            lines += ["    " + " | ".join(str(c) for c in row) for row in rows]
    return lines


def run(name: str, engine: Engine, backlog: int, done: int, claims: int, show_plan: bool) -> None:
    migrate.upgrade(engine)
    fill(engine, backlog, done)
    times = claim_ms(engine, claims)
    times.sort()
    median, p90 = statistics.median(times), times[int(len(times) * 0.9)]
    print(
        f"{name:10s} backlog {backlog:7d}, done {done:7d}: "
        f"claim median {median:7.2f} ms, p90 {p90:7.2f} ms"
    )
    if show_plan:
        for line in plan(engine):
            print("   ", line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlogs", default="100,10000,100000")
    parser.add_argument("--done", type=int, default=0, help="finished jobs before the backlog")
    parser.add_argument("--claims", type=int, default=30)
    parser.add_argument("--postgres", help="a PostgreSQL database the benchmark may fill")
    parser.add_argument("--plan", action="store_true", help="print the queries' plans")
    args = parser.parse_args()
    for backlog in (int(b) for b in args.backlogs.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            engine = make_engine(f"sqlite:///{tmp}/bench.db")
            try:
                run("sqlite", engine, backlog, args.done, args.claims, args.plan)
            finally:
                engine.dispose()
        if args.postgres:
            engine = make_engine(args.postgres)
            try:
                with engine.begin() as conn:  # a clean slate: the schema dropped and re-made
                    conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
                run("postgresql", engine, backlog, args.done, args.claims, args.plan)
            finally:
                engine.dispose()


if __name__ == "__main__":
    main()
