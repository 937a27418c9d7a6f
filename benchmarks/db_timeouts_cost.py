"""Cost of setting the PostgreSQL timeouts per transaction (``SPECTRAWATCH_DB_TRANSACTION_POOLING``)
against setting them once per connection (libpq ``options``, the default).

Each round runs ``--transactions`` short transactions through a SQLAlchemy session (one
``SELECT 1``, and one indexed read of a row, as a request does), on a warm pool; the timing is
the median of ``--repeat`` rounds, in microseconds per transaction. ``--pgbouncer URL`` adds the
same through a PgBouncer in transaction pooling mode (only the per-transaction mode keeps the
timeouts there; the per-connection one is measured only to show the pooler's own cost).

    PYTHONPATH=client:server python benchmarks/db_timeouts_cost.py \\
        --url postgresql+psycopg://spectrawatch:spectrawatch@127.0.0.1:54329/spectrawatch \\
        [--pgbouncer postgresql+psycopg://spectrawatch:spectrawatch@127.0.0.1:6432/spectrawatch]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spectrawatch_server.db.session import make_engine, make_session_factory


def per_transaction_us(url: str, pooling: bool, query: str, n: int, repeat: int) -> float:
    engine = make_engine(url, statement_timeout=10, lock_timeout=3, transaction_pooling=pooling)
    sessions = make_session_factory(engine)
    try:
        with sessions() as session:  # the expected timeouts, or the measurement means nothing
            timeout = session.scalar(text("SHOW statement_timeout"))
        rounds = []
        for _ in range(repeat + 1):  # the first round warms the pool and the caches
            start = time.perf_counter()
            for _ in range(n):
                with sessions() as session:
                    session.execute(text(query)).all()
            rounds.append((time.perf_counter() - start) / n * 1e6)
        print(
            f"  {'per transaction' if pooling else 'per connection ':s}  {query[:40]:40s} "
            f"{statistics.median(rounds[1:]):7.1f} us/txn  (statement_timeout {timeout})"
        )
        return statistics.median(rounds[1:])
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="postgresql+psycopg:// URL (direct)")
    parser.add_argument("--pgbouncer", help="the same database through PgBouncer")
    parser.add_argument("--transactions", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    queries = ["SELECT 1", "SELECT oid, relname FROM pg_class WHERE oid = 1259"]
    targets = [("direct", args.url)] + ([("pgbouncer", args.pgbouncer)] if args.pgbouncer else [])
    for name, url in targets:
        print(name)
        for query in queries:
            base = per_transaction_us(url, False, query, args.transactions, args.repeat)
            local = per_transaction_us(url, True, query, args.transactions, args.repeat)
            print(f"  +{local - base:.1f} us per transaction ({(local / base - 1) * 100:+.0f} %)")


if __name__ == "__main__":
    main()
