"""Deleting a run against a real server: its rows, blobs and pending jobs go, other runs stay,
late frames for it get 404 and its name can be used again (SQLite and PostgreSQL modes)."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import httpx
import pytest

import spectrawatch
from spectrawatch import wire
from spectrawatch.cli import main
from tests.servers import POSTGRES_MODE, ServerProcess, db_rows, wait_until
from tests.training import Loop, all_analysed, client_settings, frames_of

pytestmark = pytest.mark.integration


def _blob_files(server: ServerProcess) -> set[Path]:
    root = server.data_dir / "blobs"
    return {p for p in root.rglob("*") if p.is_file() and ".tmp" not in p.parts}


def _stream(server: ServerProcess, tmp_path: Path, name: str) -> int:
    m = spectrawatch.Monitor()
    m.init(**client_settings(tmp_path, server.url, name, project="deletes"))
    Loop(m).run(20)
    assert m.finish(timeout=60)
    assert isinstance(m.run_id, int)
    return m.run_id


def test_delete_run_removes_everything_of_it_and_nothing_else(
    server: ServerProcess, api: httpx.Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keep, gone = _stream(server, tmp_path, "keep"), _stream(server, tmp_path, "gone")
    assert gone > keep  # the highest id: the one SQLite would hand out again
    wait_until(
        lambda: all(f["status"] == "done" for r in (keep, gone) for f in frames_of(server.url, r)),
        timeout=180,
    )
    n_gone = len(frames_of(server.url, gone))
    kept = {
        "run": api.get(f"/runs/{keep}").json(),
        "frames": frames_of(server.url, keep),
        "catalog": api.get(f"/runs/{keep}/metrics/catalog").json(),
        "scalars": api.get(f"/runs/{keep}/scalars").json(),
    }
    assert api.get(f"/runs/{gone}/metrics/catalog").json()  # it has results to delete
    rows = {"rows": [{"step": 1, "layer": "x", "name": "ext.score", "value": 1.0}]}
    imported = api.post(f"/runs/{gone}/metrics", json=rows, headers={"Idempotency-Key": "i"})
    assert imported.status_code == 202  # a blob-less frame of kind "import"
    n_gone += 1
    blobs_before = _blob_files(server)

    url = ["--url", server.url]
    assert main(["runs", "delete", str(gone), *url]) == 1  # no --yes: a dry run
    assert main(["runs", "delete", str(gone), "--dry-run", "--yes", *url]) == 0  # still dry
    assert api.get(f"/runs/{gone}").status_code == 200
    assert main(["runs", "delete", "gone", "--project", "deletes", "--yes", *url]) == 0
    printed = capsys.readouterr().out
    assert f"deleted run {gone} (deletes/gone): {n_gone} frames" in printed
    assert "could not be deleted" not in printed

    for path in ("", "/frames", "/scalars", "/metrics/catalog", "/alerts"):
        assert api.get(f"/runs/{gone}{path}").status_code == 404
    assert len(blobs_before) - len(_blob_files(server)) == n_gone - 1  # exactly its blobs went
    assert not (server.data_dir / "blobs" / "runs" / str(gone)).exists()  # no empty directories
    assert api.get(f"/runs/{keep}").json()["frames"] == kept["run"]["frames"]
    assert frames_of(server.url, keep) == kept["frames"]
    assert api.get(f"/runs/{keep}/metrics/catalog").json() == kept["catalog"]
    assert api.get(f"/runs/{keep}/scalars").json() == kept["scalars"]

    # a late frame for the deleted run: 404, nothing stored
    body = wire.encode_frame(wire.FrameKind.UPDATE_SKETCH, 1, 10**6, {"a": _rows()}, _info())
    late = api.post(f"/runs/{gone}/frames", content=body, headers={"Idempotency-Key": "late:1"})
    assert late.status_code == 404
    assert late.json()["error"]["code"] == "run_deleted"  # the client stops, never recreates
    assert api.delete(f"/runs/{gone}").status_code == 404

    # the name is free again: a new, empty run
    again = api.post("/runs", json={"project": "deletes", "name": "gone"})
    assert again.status_code == 201
    assert again.json()["id"] > keep  # ids are never handed out again (SQLite would reuse)
    assert again.json()["frames"] == {}
    for table in ("frame", "metric", "spectrum", "scalar", "alert"):  # nothing left in SQL
        assert (
            db_rows(server.data_dir, f"SELECT count(*) FROM {table} WHERE run_id = :r", r=gone)[0][
                0
            ]
            == 0
        ), table
    # a run *named* like another run's id, with --project: the name counts, never the id
    digits = api.post("/runs", json={"project": "digits", "name": str(keep)}).json()["id"]
    assert main(["runs", "delete", str(keep), "--project", "digits", "--yes", *url]) == 0
    assert api.get(f"/runs/{digits}").status_code == 404
    assert api.get(f"/runs/{keep}").status_code == 200
    listed = {r["name"] for r in api.get("/runs", params={"project": "deletes"}).json()}
    assert listed == {"keep", "gone"}  # the tombstone of the deleted run is not listed
    assert main(["runs", "list", "--project", "deletes", *url]) == 0
    assert "deletes/keep" in capsys.readouterr().out


def test_delete_while_the_run_streams(
    server: ServerProcess, api: httpx.Client, tmp_path: Path
) -> None:
    """Frames, scalars and stats that arrive after the deletion are refused (404, counted by
    the client as rejected); none is stored under the deleted run, training is unaffected."""
    m = spectrawatch.Monitor()
    m.init(**client_settings(tmp_path, server.url, "live", project="deletes"))
    loop = Loop(m)
    loop.run(10)
    assert m.wait_idle(30)
    assert isinstance(m.run_id, int)
    run_id = m.run_id
    assert api.delete(f"/runs/{run_id}").status_code == 200
    loop.run(20)
    m.finish(timeout=30)
    assert loop.step == 30
    assert m.stats.get("rejected_frames") > 0
    for table in ("frame", "metric", "spectrum", "scalar", "alert"):
        rows = db_rows(server.data_dir, f"SELECT count(*) FROM {table} WHERE run_id = :r", r=run_id)
        assert rows[0][0] == 0, table
    if POSTGRES_MODE:  # procrastinate's waiting jobs of the run went with it
        waiting = "SELECT count(*) FROM procrastinate_jobs WHERE lock = :l AND status = 'todo'"
        assert db_rows(server.data_dir, waiting, l=f"run:{run_id}")[0][0] == 0
    status = db_rows(server.data_dir, "SELECT status, name FROM run WHERE id = :r", r=run_id)
    assert [tuple(r) for r in status] == [("deleted", f"deleted/{run_id}")]  # the tombstone


def _rows() -> object:
    import torch

    return torch.zeros(1, 8)


def _info() -> dict[str, object]:
    return {"steps": [1], "sketch": {"dim": 8, "seed": 0}}


def test_concurrent_writes_to_one_run_and_concurrent_deletes(
    server: ServerProcess, api: httpx.Client
) -> None:
    """From a scale-out audit: the liveness check once took a share lock and then updated the
    run row, so two overlapping writes to one run deadlocked (503). Writes now queue; of two
    concurrent DELETEs of a run, one deletes and the other answers 404."""
    from concurrent.futures import ThreadPoolExecutor

    run_id = api.post("/runs", json={"project": "race", "name": "busy"}).json()["id"]

    def write(i: int) -> int:
        with httpx.Client(base_url=f"{server.url}/api/v1", timeout=60) as c:
            if i % 3 == 0:
                return c.patch(f"/runs/{run_id}", json={"summary": {"i": i}}).status_code
            if i % 3 == 1:
                stats = {"sent_frames": i}
                return c.post(f"/runs/{run_id}/client-stats", json=stats).status_code
            rows = [{"step": i, "name": "loss", "value": 1.0}]
            return c.post(f"/runs/{run_id}/scalars", json=rows).status_code

    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(write, range(60)))
    assert sorted(set(codes)) == [200, 202], codes
    (loss,) = api.get(f"/runs/{run_id}/scalars", params={"name": "loss"}).json()
    assert loss["points"] == 20

    def delete(_: int) -> int:
        with httpx.Client(base_url=f"{server.url}/api/v1", timeout=60) as c:
            return c.delete(f"/runs/{run_id}").status_code

    with ThreadPoolExecutor(3) as pool:
        assert sorted(pool.map(delete, range(3))) == [200, 404, 404]


@pytest.mark.skipif(POSTGRES_MODE, reason="compact is the SQLite file's VACUUM")
def test_compact_gives_a_deleted_runs_pages_back_once_the_server_stopped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = tmp_path / "srv" / "spectrawatch.db"
    database.parent.mkdir()
    with contextlib.closing(sqlite3.connect(database)) as db:  # made by an earlier version:
        db.execute("PRAGMA auto_vacuum=NONE")  # no incremental auto-vacuum (fixed by a table)
        db.execute("CREATE TABLE made_by_an_older_version (x)")
        db.execute("DROP TABLE made_by_an_older_version")
    srv = ServerProcess(tmp_path / "srv").start()
    try:
        keep, gone = _stream(srv, tmp_path, "keep"), _stream(srv, tmp_path, "gone")
        wait_until(lambda: all_analysed(srv.url, gone), 120)
        httpx.delete(f"{srv.url}/api/v1/runs/{gone}", timeout=30).raise_for_status()
        assert main(["compact", "--data-dir", str(srv.data_dir)]) == 2  # the server holds it
        assert "is in use by another spectrawatch server" in capsys.readouterr().err
    finally:
        srv.stop()
    [(free,)] = db_rows(srv.data_dir, "PRAGMA freelist_count")
    assert free > 0  # the deleted run's pages, kept inside the file
    before = database.stat().st_size
    assert main(["compact", "--data-dir", str(srv.data_dir)]) == 0
    assert f"compacted {database}: " in capsys.readouterr().out
    assert db_rows(srv.data_dir, "PRAGMA freelist_count") == [(0,)]
    assert db_rows(srv.data_dir, "PRAGMA auto_vacuum") == [(2,)]  # incremental from now on
    assert database.stat().st_size <= before - free * 4096 + 4096
    assert db_rows(srv.data_dir, "SELECT count(*) FROM frame WHERE run_id = :r", r=keep)[0][0] > 0
