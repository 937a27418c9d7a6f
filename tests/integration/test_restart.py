"""Jobs survive a server restart: pending jobs complete exactly once after start-up.

Both modes: the embedded queue's ``job`` table, or procrastinate's jobs in postgres mode
(where ``--no-worker`` means no worker processes and ``kill()`` kills the API).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.factories import make_run, post_frame, weight_frame
from tests.servers import POSTGRES_MODE, ServerProcess, db_rows, wait_until

pytestmark = pytest.mark.integration


def job_rows(data_dir: Path) -> list[tuple[int, str]]:
    """(frame id, status) of the analysis jobs, with the embedded queue's status names."""
    if not POSTGRES_MODE:
        return db_rows(data_dir, "SELECT frame_id, status FROM job ORDER BY frame_id")
    from spectrawatch_server.queue.procrastinate import ANALYSIS_QUEUE, STATUS_NAMES

    rows = db_rows(
        data_dir,
        "SELECT (args->>'frame_id')::int f, status::text FROM procrastinate_jobs "
        "WHERE queue_name = :q ORDER BY f",
        q=ANALYSIS_QUEUE,
    )
    return [(int(f), STATUS_NAMES[status]) for f, status in rows]


def fake_crash_mid_job(data_dir: Path) -> None:
    """Mark the one job running on a worker that died (as a kill -9 mid-analysis leaves it)."""
    if not POSTGRES_MODE:
        db_rows(
            data_dir,
            "UPDATE job SET status='running', worker_id='dead', attempts=1, "
            "lease_until='2999-01-01'",
        )
        return
    # a worker whose last heartbeat is an hour old holds the job: stalled
    ((worker_id,),) = db_rows(
        data_dir,
        "INSERT INTO procrastinate_workers (last_heartbeat) "
        "VALUES (now() - interval '1 hour') RETURNING id",
    )
    db_rows(
        data_dir,
        "UPDATE procrastinate_jobs SET status = 'doing', worker_id = :w WHERE status = 'todo'",
        w=worker_id,
    )


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
    ((dupes,),) = db_rows(
        data_dir,
        "SELECT count(*) FROM (SELECT frame_id, analysis, layer, name, step FROM metric "
        "GROUP BY frame_id, analysis, layer, name, step HAVING count(*) > 1) d",
    )
    ((norm_rows,),) = db_rows(data_dir, "SELECT count(*) FROM metric WHERE name = 'norm.spectral'")
    assert dupes == 0
    assert norm_rows == 10


def test_job_left_running_by_a_crash_is_redone_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "srv"
    proc = ServerProcess(data_dir, args=["--no-worker"]).start()
    with httpx.Client(base_url=f"{proc.url}/api/v1", timeout=30) as api:
        run_id = make_run(api, name="crashed-job")
        assert post_frame(api, run_id, weight_frame(0, 0), seq=0).status_code == 202
    proc.kill()
    fake_crash_mid_job(data_dir)
    proc = ServerProcess(data_dir, port=proc.port).start()
    try:
        wait_until(lambda: job_rows(data_dir) == [(1, "done")], timeout=120)
    finally:
        proc.stop()
