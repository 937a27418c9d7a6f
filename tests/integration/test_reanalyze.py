"""Re-analysis of a run's stored frames (``POST /runs/{id}/reanalyze``, ``spectrawatch runs
reanalyze``): a real streamed run analysed again equals its first analysis, restores results
that were corrupted or deleted, and fires no alert again."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import httpx
import pytest

import spectrawatch
from spectrawatch.cli import main as cli_main
from tests.factories import make_run, post_frame, weight_frame
from tests.servers import ServerProcess, db_rows, wait_until
from tests.training import Loop, all_analysed, client_settings, frames_of

pytestmark = pytest.mark.integration

PROJECT = "again"
# rules that surely fire on a small run, one of them flapping: episodes opened and resolved
RULES = {
    "gap_open": {"kind": "threshold", "metric": "sed.gap_ratio.w16", "above": 1.0},
    "edge_flap": {"kind": "threshold", "metric": "sed.edge.w16", "above": 1.5},
}
# NaN/Inf spelled as a string: a JSON payload's NaN compares unequal to itself
Snapshot = dict[str, Any]


@pytest.fixture
def alert_server(tmp_path: Path) -> Any:
    """A server whose webhooks may target loopback (their deliveries are only counted)."""
    proc = ServerProcess(
        tmp_path / "server", env={"SPECTRAWATCH_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1"}
    ).start()
    try:
        yield proc
    finally:
        proc.stop()


def stream_run(server: ServerProcess, tmp_path: Path, api: httpx.Client) -> int:
    """A real small training run (every frame kind), every frame analysed; alert rules that
    fire on it and a webhook, so that its alerts have deliveries."""
    assert api.post("/projects", json={"name": PROJECT}).status_code in (200, 201)
    for name, params in RULES.items():
        r = api.patch(f"/projects/{PROJECT}/alert-rules/{name}", json={"params": params})
        assert r.status_code == 200, r.text
    hook = {"project": PROJECT, "url": "http://127.0.0.1:18399/never-listening"}
    assert api.post("/webhooks", json=hook).status_code == 201
    m = spectrawatch.Monitor()
    # activations every 2 steps: 30 points, more than EigenTrack's change score reads back (21)
    m.init(**client_settings(tmp_path, server.url, "r", project=PROJECT, activations_every=2))
    Loop(m).run(60)
    assert m.finish(timeout=60)
    assert isinstance(m.run_id, int)
    wait_until(lambda: all_analysed(server.url, m.run_id or 0), timeout=180)
    return m.run_id


def snapshot(server: ServerProcess, api: httpx.Client, run_id: int) -> Snapshot:
    """Every derived result of the run: metric rows (by frame, analysis, layer, name, step),
    spectra, the catalog's point counts, alerts and webhook deliveries."""
    metrics = metric_rows(server, run_id)
    spectra = db_rows(
        server.data_dir,
        "SELECT frame_id, analysis, layer, step, payload FROM spectrum WHERE run_id = :r",
        r=run_id,
    )
    deliveries = db_rows(server.data_dir, "SELECT count(*) FROM delivery")[0][0]
    return {
        "metrics": metrics,
        "spectra": {tuple(row[:4]): _payload(row[4]) for row in spectra},
        "catalog": api.get(f"/runs/{run_id}/metrics/catalog").json(),
        "alerts": api.get(f"/runs/{run_id}/alerts").json(),
        "deliveries": deliveries,
    }


def metric_rows(server: ServerProcess, run_id: int) -> dict[tuple[Any, ...], Any]:
    """``{(frame id, analysis, layer, name, step): value}`` of the run's metric rows."""
    rows = db_rows(
        server.data_dir,
        "SELECT frame_id, analysis, layer, name, step, value FROM metric WHERE run_id = :r",
        r=run_id,
    )
    keys = [tuple(row[:5]) for row in rows]
    assert len(keys) == len(set(keys))  # one row per (frame, analysis, layer, name, step)
    return {tuple(row[:5]): row[5] for row in rows}


def _payload(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def assert_same(after: Snapshot, before: Snapshot) -> None:
    """Equal results: the same rows and counts, values equal to float64 rounding (a window's
    Gram is built incrementally or at once depending on what the worker holds in memory)."""
    assert after["metrics"].keys() == before["metrics"].keys()
    for key, value in before["metrics"].items():
        assert _close(after["metrics"][key], value), (key, after["metrics"][key], value)
    assert after["spectra"].keys() == before["spectra"].keys()
    for key, payload in before["spectra"].items():
        assert _close(after["spectra"][key], payload), key
    assert after["catalog"] == before["catalog"]
    assert after["alerts"] == before["alerts"]  # no episode opened, resolved or changed
    assert after["deliveries"] == before["deliveries"]  # no webhook event


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float):
        return _close(float(a), float(b))
    return bool(a == b)


def reanalyze(server: ServerProcess, api: httpx.Client, run_id: int, **body: Any) -> Any:
    r = api.post(f"/runs/{run_id}/reanalyze", json=body)
    assert r.status_code == 200, r.text
    wait_until(lambda: all_analysed(server.url, run_id), timeout=180)
    return r.json()


def test_a_reanalysed_run_equals_its_first_analysis_and_fires_no_alert(
    alert_server: ServerProcess, tmp_path: Path
) -> None:
    """The whole run analysed again, each frame reading only what the frames before it
    stored: the same metric rows and values, spectra, point counts; the alerts (opened and
    resolved episodes) and their webhook deliveries unchanged."""
    with httpx.Client(base_url=f"{alert_server.url}/api/v1", timeout=30) as api:
        run_id = stream_run(alert_server, tmp_path, api)
        before = snapshot(alert_server, api, run_id)
        assert {a["rule"] for a in before["alerts"]} >= set(RULES)
        assert any(a["status"] == "resolved" for a in before["alerts"])
        assert before["deliveries"] > 0
        frames = frames_of(alert_server.url, run_id)
        out = reanalyze(alert_server, api, run_id)
        assert out == {
            "run_id": run_id,
            "from_step": None,
            "queued": len(frames),
            "skipped_pruned": 0,
            "skipped_imported": 0,
        }
        assert_same(snapshot(alert_server, api, run_id), before)
        assert all(
            f["status"] == "done" and f["error"] is None
            for f in frames_of(alert_server.url, run_id)
        )


def test_reanalysis_restores_corrupted_and_deleted_results(
    alert_server: ServerProcess, tmp_path: Path
) -> None:
    """Results changed and deleted behind the server's back (the catalog's counts too) come
    back as the first analysis made them: the whole run, then those of the frames from a step
    on (the frames before it are not queued), by the CLI."""
    with httpx.Client(base_url=f"{alert_server.url}/api/v1", timeout=30) as api:
        run_id = stream_run(alert_server, tmp_path, api)
        before = snapshot(alert_server, api, run_id)
        data = alert_server.data_dir
        db_rows(data, "UPDATE metric SET value = value + 1 WHERE name LIKE 'sed.gap_ratio%'")
        db_rows(data, "DELETE FROM metric WHERE name LIKE 'eigentrack.%'")
        db_rows(data, "DELETE FROM spectrum WHERE analysis = 'htsr'")
        assert metric_rows(alert_server, run_id) != before["metrics"]
        reanalyze(alert_server, api, run_id)
        assert_same(snapshot(alert_server, api, run_id), before)

        frames = frames_of(alert_server.url, run_id)
        first = min(f["seq"] for f in frames if f["step"] >= 30)
        assert 0 < first < max(f["seq"] for f in frames)
        later = "SELECT id FROM frame WHERE run_id = :r AND seq >= :s"
        db_rows(data, f"DELETE FROM metric WHERE frame_id IN ({later})", r=run_id, s=first)
        db_rows(data, f"DELETE FROM spectrum WHERE frame_id IN ({later})", r=run_id, s=first)
        marked = "SELECT seq, requeued_at FROM frame WHERE run_id = :r ORDER BY seq"
        queued_before = dict(db_rows(data, marked, r=run_id))
        code = cli_main(
            ["runs", "reanalyze", str(run_id), "--from-step", "30", "--url", alert_server.url]
        )
        assert code == 0
        wait_until(lambda: all_analysed(alert_server.url, run_id), timeout=180)
        assert_same(snapshot(alert_server, api, run_id), before)
        queued_after = dict(db_rows(data, marked, r=run_id))
        again = [seq for seq, at in queued_after.items() if at != queued_before[seq]]
        assert again == [seq for seq in sorted(queued_after) if seq >= first]


def test_a_missing_blob_refuses_reanalysis_and_a_failed_frame_gets_its_first_alerts(
    server: ServerProcess, tmp_path: Path
) -> None:
    """A blob the store lost (a disk, an S3 object, a database restored without its blobs):
    the frame's results were deleted, then its analysis (and the next snapshot's, reading it as
    history) failed for good (71 metric kinds -> 23). Refused now (409), nothing changed. A
    frame whose first analysis failed never evaluated its alerts: it is queued without
    ``requeued_at``, so the worker evaluates them."""
    with httpx.Client(base_url=f"{server.url}/api/v1", timeout=30) as api:
        m = spectrawatch.Monitor()
        m.init(**client_settings(tmp_path, server.url, "lost", project=PROJECT))
        Loop(m).run(12)
        assert m.finish(timeout=60)
        run_id = m.run_id
        assert isinstance(run_id, int)
        wait_until(lambda: all_analysed(server.url, run_id), timeout=120)
        before = metric_rows(server, run_id)
        data = server.data_dir
        keys = "SELECT id, blob_key FROM frame WHERE run_id = :r AND kind = :k ORDER BY seq"
        ((lost, key), *_) = db_rows(data, keys, r=run_id, k="weights")
        (data / "blobs" / key).rename(tmp_path / "lost-blob")
        ((failed, _), *_) = db_rows(data, keys, r=run_id, k="update_sketch")
        db_rows(data, "UPDATE frame SET status = 'failed' WHERE id = :f", f=failed)
        refused = api.post(f"/runs/{run_id}/reanalyze")
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == "blobs_missing"
        assert metric_rows(server, run_id) == before  # nothing cleared
        (tmp_path / "lost-blob").rename(data / "blobs" / key)
        out = api.post(f"/runs/{run_id}/reanalyze").json()
        assert out["queued"] == len(frames_of(server.url, run_id))
        wait_until(lambda: all_analysed(server.url, run_id), timeout=120)
        assert metric_rows(server, run_id) == before
        marks = dict(db_rows(data, "SELECT id, requeued_at FROM frame WHERE run_id = :r", r=run_id))
        assert marks[failed] is None  # queued as a first analysis: its alerts evaluated
        assert marks[lost] is not None
        assert sum(at is not None for at in marks.values()) == len(marks) - 1


def test_reanalysis_is_refused_while_running_and_skips_pruned_and_imported_frames(
    server: ServerProcess, tmp_path: Path
) -> None:
    with httpx.Client(base_url=f"{server.url}/api/v1", timeout=30) as api:
        m = spectrawatch.Monitor()
        m.init(**client_settings(tmp_path, server.url, "live", project=PROJECT))
        Loop(m).run(12)
        assert m.wait_idle(30)
        run_id = m.run_id
        assert isinstance(run_id, int)
        r = api.post(f"/runs/{run_id}/reanalyze", json={})
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "run_running"
        assert m.finish(timeout=60)
        wait_until(lambda: all_analysed(server.url, run_id), timeout=120)
        rows = [{"step": 3, "layer": "x", "name": "imported.value", "value": 1.0}]
        r = api.post(f"/runs/{run_id}/metrics", json={"rows": rows})
        assert r.status_code == 202, r.text
        sent = frames_of(server.url, run_id)
        assert api.post("/blobs/prune", json={"older_than_days": 0}).json()["frames"] > 0
        before = metric_rows(server, run_id)
        out = api.post(f"/runs/{run_id}/reanalyze").json()
        assert out["queued"] == 0
        assert out["skipped_pruned"] == sum(1 for f in sent if f["seq"] >= 0)
        assert out["skipped_imported"] == 1
        assert metric_rows(server, run_id) == before  # nothing cleared
        bad = api.post(f"/runs/{run_id}/reanalyze", json={"from_step": -1})
        assert bad.status_code == 422
        assert api.post("/runs/999999/reanalyze").status_code == 404


def test_reanalysis_waits_for_the_frames_still_to_analyse(tmp_path: Path) -> None:
    """A finished run whose frames wait for the worker: 409 ``analysis_pending`` (its jobs
    would run twice, the second time on results it cleared)."""
    server = ServerProcess(tmp_path / "server", args=["--no-worker"]).start()
    try:
        with httpx.Client(base_url=f"{server.url}/api/v1", timeout=30) as api:
            run_id = make_run(api, project=PROJECT, name="backlog")
            assert post_frame(api, run_id, weight_frame(0, 0), seq=0).status_code == 202
            assert api.patch(f"/runs/{run_id}", json={"status": "finished"}).status_code == 200
            r = api.post(f"/runs/{run_id}/reanalyze")
            assert r.status_code == 409, r.text
            assert r.json()["error"]["code"] == "analysis_pending"
            assert "1 analysis job(s) waiting" in r.json()["error"]["message"]
    finally:
        server.stop()
