"""Scale-out: a worker running when a newer spectrawatch (an API process upgraded beside it)
migrates the schema stops with one line and exit status 3, instead of reading and writing
tables whose shape it does not know (postgres mode: workers are separate processes there)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.servers import POSTGRES_MODE, ServerProcess, db_rows, wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not POSTGRES_MODE, reason="scale-out workers: postgres mode only"),
]


def test_worker_stops_when_a_newer_version_migrates_the_schema(tmp_path: Path) -> None:
    env = {"SPECTRAWATCH_WORKER_SCHEMA_CHECK_SECONDS": "0.5"}
    server = ServerProcess(tmp_path / "server", env=env).start()
    try:
        [current] = db_rows(server.data_dir, "SELECT version_num FROM alembic_version")
        time.sleep(2)  # several checks at this version's own revision: no false alarm
        assert server.workers
        assert all(w.alive for w in server.workers)
        db_rows(server.data_dir, "UPDATE alembic_version SET version_num = '0099_from_the_future'")
        wait_until(lambda: not any(w.alive for w in server.workers), timeout=30)
        for worker in server.workers:
            assert worker.proc is not None
            assert worker.proc.returncode == 3, worker.log_path.read_text()[-2000:]
            log = worker.log_path.read_text()
            lines = [line for line in log.splitlines() if "newer spectrawatch" in line]
            assert len(lines) == 1, log[-2000:]
            assert (
                f"worker {worker.name} stops: a newer spectrawatch migrated the database"
                in (lines[0])
            )
            assert "0099_from_the_future" in lines[0]
            assert "Traceback" not in log
        db_rows(
            server.data_dir, "UPDATE alembic_version SET version_num = :v", v=current[0]
        )  # back, so that the API stops cleanly
    finally:
        server.stop()
