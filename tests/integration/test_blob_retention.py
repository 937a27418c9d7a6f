"""Blob retention against a real server: `spectrawatch runs prune` releases the stored frames of
ended runs and keeps every result; running runs and other projects keep their blobs; a blob
lost from the store is a gap in the history of later frames, as a pruned one (SQLite and
PostgreSQL modes)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

import spectrawatch
from spectrawatch.cli import main
from tests.servers import ServerProcess, db_rows, wait_until
from tests.training import Loop, all_analysed, client_settings, frames_of

pytestmark = pytest.mark.integration


def _stream(server: ServerProcess, tmp_path: Path, project: str, name: str) -> int:
    m = spectrawatch.Monitor()
    m.init(**client_settings(tmp_path / name, server.url, name, project=project))
    Loop(m).run(20)
    assert m.finish(timeout=60)
    assert isinstance(m.run_id, int)
    return m.run_id


def _blob_files(server: ServerProcess, run_id: int) -> list[Path]:
    return [p for p in (server.data_dir / "blobs" / "runs" / str(run_id)).rglob("*") if p.is_file()]


def _finished(server: ServerProcess, run_id: int) -> bool:
    """Whether every frame of the run is analysed or failed."""
    return all(f["status"] in {"done", "failed"} for f in frames_of(server.url, run_id))


def test_prune_releases_blobs_of_ended_runs_and_keeps_results(
    server: ServerProcess, api: httpx.Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ended = _stream(server, tmp_path, "retention", "ended")
    live = _stream(server, tmp_path, "retention", "live")
    other = _stream(server, tmp_path, "elsewhere", "other")
    runs = (ended, live, other)
    wait_until(
        lambda: all(f["status"] == "done" for r in runs for f in frames_of(server.url, r)), 180
    )
    assert api.patch(f"/runs/{live}", json={"status": "running"}).status_code == 200  # resumed
    before = {r: (len(_blob_files(server, r)), frames_of(server.url, r)) for r in runs}
    catalog = api.get(f"/runs/{ended}/metrics/catalog").json()
    name, layer = catalog[0]["name"], catalog[0]["layer"]
    series = api.get(f"/runs/{ended}/metrics", params={"name": name, "layer": layer}).json()
    assert all(f["has_blob"] for r in runs for f in before[r][1])

    url = ["--url", server.url]
    assert main(["runs", "prune", "--older-than", "0", "--project", "retention", *url]) == 1
    assert f"would delete {len(before[ended][1])} frame blob(s)" in capsys.readouterr().err
    assert len(_blob_files(server, ended)) == before[ended][0]  # a dry run deletes nothing
    # durations as runs delete takes them: nothing is 30 days old yet
    assert main(["runs", "prune", "--older-than", "30d", "--project", "retention", *url]) == 1
    assert "would delete 0 frame blob(s)" in capsys.readouterr().err

    assert (
        main(["runs", "prune", "--older-than", "0", "--project", "retention", "--yes", *url]) == 0
    )
    assert f"deleted {len(before[ended][1])} frame blob(s)" in capsys.readouterr().out
    assert not (server.data_dir / "blobs" / "runs" / str(ended)).exists()
    pruned = frames_of(server.url, ended)
    assert [f["id"] for f in pruned] == [f["id"] for f in before[ended][1]]
    assert not any(f["has_blob"] for f in pruned)
    assert api.get(f"/runs/{ended}/metrics/catalog").json() == catalog  # results stay
    again = api.get(f"/runs/{ended}/metrics", params={"name": name, "layer": layer}).json()
    assert again == series
    for run in (live, other):  # a running run and another project keep everything
        assert len(_blob_files(server, run)) == before[run][0]
        assert all(f["has_blob"] for f in frames_of(server.url, run))

    none_left = api.post("/blobs/prune", json={"older_than_days": 0, "project": "retention"})
    assert none_left.json()["frames"] == 0
    recent = api.post("/blobs/prune", json={"older_than_days": 1, "run_id": other})
    assert recent.json()["frames"] == 0  # stored minutes ago: younger than a day
    assert len(_blob_files(server, other)) == before[other][0]
    bad = api.post("/blobs/prune", json={"older_than_days": -1})
    assert bad.status_code == 422
    wrong = api.post(
        "/blobs/prune", json={"older_than_days": 0, "project": "elsewhere", "run_id": ended}
    )
    assert wrong.status_code == 404
    # deleting the pruned run frees no more blob bytes (it reported every frame's bytes again)
    body = {"older_than_days": 0, "project": "retention", "statuses": ["finished"]}
    dry = api.post("/runs/bulk-delete", json={**body, "dry_run": True}).json()
    assert [r["id"] for r in dry["runs"]] == [ended]
    assert (dry["frames"], dry["bytes"]) == (len(before[ended][1]), 0)
    gone = api.delete(f"/runs/{ended}").json()
    assert (gone["frames"], gone["bytes"]) == (len(before[ended][1]), 0)


def test_retention_setting_prunes_at_start_and_hourly(
    server: ServerProcess, tmp_path: Path
) -> None:
    """``SPECTRAWATCH_PRUNE_BLOBS_AFTER_DAYS``: the sweep runs when the server starts, then
    hourly."""
    ended = _stream(server, tmp_path, "sweep", "ended")
    wait_until(lambda: all_analysed(server.url, ended), 180)
    assert _blob_files(server, ended)
    server.stop()
    server.env["SPECTRAWATCH_PRUNE_BLOBS_AFTER_DAYS"] = "0.00001"  # 0.86 s
    server.start()
    wait_until(lambda: not any(f["has_blob"] for f in frames_of(server.url, ended)), 30)
    assert not _blob_files(server, ended)


def test_a_lost_history_blob_leaves_a_gap_in_later_frames_sed(
    server: ServerProcess, api: httpx.Client, tmp_path: Path
) -> None:
    """A blob gone from the store mid-run (deleted by hand, a lost file, a bucket rule) and a
    worker that no longer holds it decoded: every later update frame whose SED windows covered
    it failed (``sed: FileNotFoundError``), the run's SED stopping there. They are analysed on
    the frames that exist, their windows over the lost steps flagged incomplete; one warning
    names the frame. Re-analysis still refuses the run (409 ``blobs_missing``)."""
    m = spectrawatch.Monitor()
    m.init(**client_settings(tmp_path, server.url, "lost", project="retention"))
    loop = Loop(m)
    loop.run(24)
    assert m.wait_idle(60)
    run_id = m.run_id
    assert isinstance(run_id, int)
    wait_until(lambda: all_analysed(server.url, run_id), 180)
    updates = [f for f in frames_of(server.url, run_id) if f["kind"] == "update_sketch"]
    lost = updates[2]
    ((key,),) = db_rows(server.data_dir, "SELECT blob_key FROM frame WHERE id = :f", f=lost["id"])
    (server.data_dir / "blobs" / key).unlink()
    server.stop()  # a worker without the lost frame decoded (its cache, or another worker)
    server.start()
    loop.run(24)
    assert m.finish(timeout=60)
    wait_until(lambda: _finished(server, run_id), 180)
    assert [f["error"] for f in frames_of(server.url, run_id) if f["status"] != "done"] == []
    later = [f for f in frames_of(server.url, run_id) if f["seq"] > updates[-1]["seq"]]
    assert any(f["kind"] == "update_sketch" for f in later)
    params = {"name": "sed.incomplete.w16", "layer": "__model__"}
    (series,) = api.get(f"/runs/{run_id}/metrics", params=params).json()["series"]
    flags = dict(zip(series["steps"], series["values"], strict=True))
    assert max(flags) == 48  # SED to the run's last step
    # windows (t - 16, t] over the lost frame's 4 steps, of the steps analysed after the loss
    lost_steps = range(lost["step"], lost["step"] + 4)
    assert {s for s, v in flags.items() if v and s > 24} == set(range(25, lost_steps[-1] + 16))
    logs = server.log_path.read_text() + "".join(w.log_path.read_text() for w in server.workers)
    assert logs.count(f"blob {key!r} is missing from the blob store") == 1
    refused = api.post(f"/runs/{run_id}/reanalyze")
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "blobs_missing"
