"""Jobs survive a server restart: pending jobs complete exactly once after start-up."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
import pytest

from tests.factories import make_run, post_frame, weight_frame
from tests.servers import ServerProcess, wait_until

pytestmark = pytest.mark.integration


def job_rows(data_dir: Path) -> list[tuple[int, str]]:
    db = sqlite3.connect(data_dir / "spectrawatch.db")
    rows = list(db.execute("SELECT frame_id, status FROM job ORDER BY frame_id"))
    db.close()
    return rows


def test_pending_jobs_complete_exactly_once_after_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "srv"
    proc = ServerProcess(data_dir, args=["--no-worker"]).start()
    with httpx.Client(base_url=f"{proc.url}/api/v1", timeout=30) as api:
        run_id = make_run(api, name="restart")
        for seq in range(5):
            assert post_frame(api, run_id, weight_frame(10 * seq, seq), seq=seq).status_code == 202
    proc.kill()  # kill -9 with five pending jobs
    assert [s for _, s in job_rows(data_dir)] == ["pending"] * 5

    proc = ServerProcess(data_dir, port=proc.port).start()
    try:
        with httpx.Client(base_url=f"{proc.url}/api/v1", timeout=30) as api:
            wait_until(lambda: all(s == "done" for _, s in job_rows(data_dir)), timeout=120)
            series = api.get(f"/runs/{run_id}/metrics", params={"name": "norm.spectral"}).json()[
                "series"
            ]
            assert {s["layer"]: s["steps"] for s in series} == {
                "layer0.weight": [0, 10, 20, 30, 40],
                "layer1.weight": [0, 10, 20, 30, 40],
            }
            # replaying every frame after the restart stores nothing new
            for seq in range(5):
                assert (
                    post_frame(api, run_id, weight_frame(10 * seq, seq), seq=seq).status_code == 200
                )
            assert len(job_rows(data_dir)) == 5
    finally:
        proc.stop()
    db = sqlite3.connect(data_dir / "spectrawatch.db")
    (dupes,) = db.execute(
        "SELECT count(*) FROM (SELECT frame_id, analysis, layer, name, step, count(*) c "
        "FROM metric "
        "GROUP BY frame_id, analysis, layer, name, step HAVING c > 1)"
    ).fetchone()
    (norm_rows,) = db.execute("SELECT count(*) FROM metric WHERE name = 'norm.spectral'").fetchone()
    db.close()
    assert dupes == 0
    assert norm_rows == 10


def test_job_left_running_by_a_crash_is_redone_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "srv"
    proc = ServerProcess(data_dir, args=["--no-worker"]).start()
    with httpx.Client(base_url=f"{proc.url}/api/v1", timeout=30) as api:
        run_id = make_run(api, name="crashed-job")
        assert post_frame(api, run_id, weight_frame(0, 0), seq=0).status_code == 202
    proc.kill()
    db = sqlite3.connect(data_dir / "spectrawatch.db")  # as if a worker died mid-analysis
    db.execute(
        "UPDATE job SET status='running', worker_id='dead', attempts=1, lease_until='2999-01-01'"
    )
    db.commit()
    db.close()
    proc = ServerProcess(data_dir, port=proc.port).start()
    try:
        wait_until(lambda: job_rows(data_dir) == [(1, "done")], timeout=120)
    finally:
        proc.stop()
