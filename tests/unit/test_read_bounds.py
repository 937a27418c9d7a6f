"""Reads of a big run stay bounded: spectra come in pages, a metric without a layer filter is
read and downsampled per layer, the activations figures keep a bounded number of points."""

from __future__ import annotations

import itertools
import math
import re
import sqlite3
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import Engine, Select, delete, event, func, select, update

import spectrawatch.api as client_api
from spectrawatch.wire import FrameLimits
from spectrawatch_server.api.routes import dashboard_figures
from spectrawatch_server.app import create_app
from spectrawatch_server.config import ServerSettings
from spectrawatch_server.db.base import utcnow
from spectrawatch_server.db.models import Frame, Metric, MetricSeries, Run, Spectrum
from spectrawatch_server.db.session import make_engine, make_session_factory
from spectrawatch_server.downsample import downsample, downsample_many
from spectrawatch_server.storage import dashboard_reads as reads
from spectrawatch_server.storage import metric_reads, result_store, series
from spectrawatch_server.storage import repository as repo
from spectrawatch_server.storage.blobs import LocalBlobStore
from spectrawatch_server.storage.result_store import MetricRow, SpectrumRow
from spectrawatch_server.worker import FrameLoader, RunHistory
from tests.dashboard_seed import done_frame, migrated, new_run
from tests.unit.test_dashboards import statements

LAYERS = ("l2", "l10", "l1")
SPECTRA_STEPS = 90  # x 3 layers = 270 spectra, pages of 100


@pytest.fixture
def spectra_app(tmp_path: Path) -> Iterator[tuple[TestClient, int]]:
    engine, sessions = migrated(tmp_path)
    with sessions.begin() as s:
        run_id = new_run(s, "p", "r")
        for step in range(SPECTRA_STEPS):
            frame = done_frame(s, run_id, step, step)
            spectra = [SpectrumRow(layer, {"step": step, "layer": layer}) for layer in LAYERS]
            result_store.replace_results(s, run_id, frame.id, step, "htsr", [], spectra)
    engine.dispose()
    with TestClient(
        create_app(ServerSettings(data_dir=tmp_path, run_worker=False)), base_url="http://127.0.0.1"
    ) as client:
        yield client, run_id


def api_over(client: TestClient) -> client_api.Api:
    """The read API (``spectrawatch.Api``) on an in-process app's ``TestClient``."""
    api = client_api.Api("http://127.0.0.1")
    api.close()
    api._http = client
    client.base_url = "http://127.0.0.1/api/v1"  # type: ignore[assignment]
    return api


def _keys(rows: list[dict[str, Any]]) -> list[tuple[int, str]]:
    return [(r["step"], r["layer"]) for r in rows]


def test_spectra_come_in_bounded_pages_with_a_next_link(
    spectra_app: tuple[TestClient, int],
) -> None:
    """Unfiltered, the endpoint returned every spectrum of the run (hundreds of MB on a big
    run); now 100 by default, at most 1000, the next page linked while more match."""
    client, run_id = spectra_app
    url = f"/api/v1/runs/{run_id}/spectra"
    every = sorted((t, la) for t in range(SPECTRA_STEPS) for la in LAYERS)
    first = client.get(url)
    assert first.status_code == 200
    assert _keys(first.json()) == every[:100]
    assert first.headers["x-next-offset"] == "100"
    got = first.json()
    nxt = first.links["next"]["url"]
    while nxt:
        page = client.get(nxt)
        got += page.json()
        nxt = page.links.get("next", {}).get("url")
        assert ("x-next-offset" in page.headers) == bool(nxt)
    assert _keys(got) == every
    assert client.get(url, params={"limit": 1000}).headers.get("link") is None
    assert client.get(url, params={"limit": 1001}).status_code == 422
    assert client.get(url, params={"limit": 0}).status_code == 422
    assert client.get(url, params={"from": 2**63}).status_code == 422
    # the filters still apply, with the page bound
    two = client.get(url, params={"layer": "l10", "from": 5, "to": 6}).json()
    assert _keys(two) == [(5, "l10"), (6, "l10")]
    assert len(client.get(url, params={"layer": "l1"}).json()) == SPECTRA_STEPS
    frame = two[0]["frame_id"]
    assert len(client.get(url, params={"frame": frame}).json()) == len(LAYERS)
    assert client.get(url, params={"analysis": "other"}).json() == []
    assert len(client.get(f"{url}/{frame}").json()) == len(LAYERS)


def test_spectra_pages_are_index_ranges_after_a_cursor(
    spectra_app: tuple[TestClient, int], tmp_path: Path
) -> None:
    """With no index in the page order every page read and sorted the keys of all of the
    run's spectra (0.04-0.08 s a page at 75,000, whichever page); the next link now carries a
    cursor (the page's last key) and the page is a range of ``ix_spectrum_run_step_layer``
    (0008) that stops after ``limit`` entries."""
    client, run_id = spectra_app
    url = f"/api/v1/runs/{run_id}/spectra"
    every = sorted((t, la) for t in range(SPECTRA_STEPS) for la in LAYERS)
    page = client.get(url, params={"limit": 50, "offset": 60})
    assert _keys(page.json()) == every[60:110]
    link = page.links["next"]["url"]
    assert "cursor=" in link
    assert "offset" not in link
    following = client.get(link)
    assert _keys(following.json()) == every[110:160]
    assert following.headers["x-next-offset"] == "160"
    with_offset = client.get(link + "&offset=5")  # skips 5 after the cursor's key
    assert _keys(with_offset.json())[0] == every[115]
    for bad in ("nope", "W10", "WzEsMiwzXQ", "WzAsLTEsImEiLCJiIiwxXQ", "x" * 2001):
        refused = client.get(url, params={"cursor": bad})
        assert refused.status_code == 422, bad[:20]
        assert refused.json()["error"]["code"] in ("invalid_cursor", "invalid_request"), bad[:20]
    engine = make_engine(f"sqlite:///{tmp_path / 'spectrawatch.db'}")
    with make_session_factory(engine)() as s:
        conn = s.connection()
        with statements(conn) as seen:
            metric_reads.spectra_for(
                s, run_id, None, None, None, limit=11, after=(40, "l10", "htsr", 9)
            )
            metric_reads.spectra_for(s, run_id, None, None, None, limit=11, offset=100)
        for query, params in seen[::2]:  # the keys of the page (then its rows, by id)
            plan = [str(r[-1]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + query, params)]
            assert plan[0].startswith(
                "SEARCH spectrum USING COVERING INDEX ix_spectrum_run_step_layer (run_id=?"
            ), plan
            assert not any("TEMP B-TREE" in step for step in plan), plan
    engine.dispose()


def test_client_reads_every_spectrum_page_by_page(
    spectra_app: tuple[TestClient, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Run.spectra()`` promised every stored spectrum: it follows the pages."""
    client, run_id = spectra_app
    monkeypatch.setattr(client_api, "_PAGE", 64)
    api = api_over(client)
    run = api.run(run_id)
    assert len(run.spectra()) == SPECTRA_STEPS * len(LAYERS)
    assert _keys(run.spectra(layer="l2")) == [(t, "l2") for t in range(SPECTRA_STEPS)]


# --- GET /runs/{id}/metrics without a layer ----------------------------------------------------

SERIES_STEPS = 2500
SPIKE = 1234  # one point far above the rest: downsampling must keep it


@pytest.fixture
def metrics_app(tmp_path: Path) -> Iterator[tuple[TestClient, int]]:
    engine, sessions = migrated(tmp_path)
    with sessions.begin() as s:
        run_id = new_run(s, "p", "r")
        frame = done_frame(s, run_id, 0, 0)
        rows = [
            result_store.MetricRow(layer, "m", t, 100.0 if t == SPIKE else math.sin(t / 40) + i)
            for i, layer in enumerate(LAYERS)
            for t in range(SERIES_STEPS)
        ]
        rows += [result_store.MetricRow("short", "m", t, float(t)) for t in range(10)]
        result_store.replace_results(s, run_id, frame.id, 0, "x", rows, [])
    engine.dispose()
    with TestClient(
        create_app(ServerSettings(data_dir=tmp_path, run_worker=False)), base_url="http://127.0.0.1"
    ) as client:
        yield client, run_id


def test_metric_of_every_layer_is_bounded_per_layer_and_says_so(
    metrics_app: tuple[TestClient, int],
) -> None:
    """Without ``layer`` the endpoint returned every point of every layer (750,000 points,
    17 MB and 4-5 s on a big run); now at most 1000 a layer unless ``max_points`` says
    otherwise, each series saying whether it was downsampled. One layer: every point."""
    client, run_id = metrics_app
    url = f"/api/v1/runs/{run_id}/metrics"
    body = client.get(url, params={"name": "m"}).json()
    by_layer = {s["layer"]: s for s in body["series"]}
    assert sorted(by_layer) == sorted([*LAYERS, "short"])
    for layer in LAYERS:
        series = by_layer[layer]
        assert len(series["steps"]) == 1000
        assert series["points"] == SERIES_STEPS
        assert series["downsampled"] is True
        assert SPIKE in series["steps"]  # LTTB keeps the extreme
        assert series["steps"][0] == 0
        assert series["steps"][-1] == SERIES_STEPS - 1
    assert by_layer["short"]["downsampled"] is False
    assert by_layer["short"]["steps"] == list(range(10))
    one = client.get(url, params={"name": "m", "layer": "l2"}).json()["series"]
    assert [(len(s["steps"]), s["downsampled"]) for s in one] == [(SERIES_STEPS, False)]
    every = client.get(url, params={"name": "m", "max_points": 100_000}).json()["series"]
    assert all(not s["downsampled"] and len(s["steps"]) == s["points"] for s in every)
    few = client.get(url, params={"name": "m", "max_points": 50, "from": 10, "to": 1999})
    assert {len(s["steps"]) for s in few.json()["series"] if s["layer"] != "short"} == {50}
    for bound in ("from", "to"):  # past the database's integers, also for an unknown metric
        assert client.get(url, params={"name": "nope", bound: 2**63}).status_code == 422
        assert client.get(url, params={"name": "m", bound: 2**63 - 1}).status_code == 200
    description = client.get("/openapi.json").json()["paths"]["/api/v1/runs/{run_id}/metrics"]
    assert "at most 1000 points" in description["get"]["description"]


def test_client_metric_keeps_full_resolution(
    metrics_app: tuple[TestClient, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Run.metric(name)`` promised every point: it asks for all, and reads a layer the
    server still cut short on its own."""
    client, run_id = metrics_app
    monkeypatch.setattr(client_api, "_MAX_POINTS", 1000)
    api = api_over(client)
    got = api.run(run_id).metric("m")
    assert {k: len(v.steps) for k, v in got.items()} == {
        **dict.fromkeys(LAYERS, SERIES_STEPS),
        "short": 10,
    }
    assert got["l1"].values[SPIKE] == 100.0


def test_metric_series_seeks_each_layer_in_the_covering_index(tmp_path: Path) -> None:
    """The read behind the endpoint and the activations figures: the layers by a skip-scan,
    then a covering-index search per layer returning steps and values only, up to 200 layers
    a statement (one statement a layer: 1,853 for the activations figure of a 150-module run).
    The same points as :func:`metric_points`, layers in its order, with a step range, at
    given steps (a layer met only in the second chunk of steps), and for one layer."""
    layers = [*LAYERS, "Blocks.0", "blocks_1", "blocks.1.a", *(f"m.{i:03d}" for i in range(250))]
    engine, sessions = migrated(tmp_path)
    with sessions.begin() as s:
        run_id = new_run(s, "p", "r")
        frame = done_frame(s, run_id, 0, 0)
        rows = [
            result_store.MetricRow(la, n, t, math.nan if t == i % 9 else t + i / 8)
            for i, la in enumerate(layers)
            for n in "ab"
            for t in range(2, 12)
        ]
        rows += [result_store.MetricRow("late", "a", t, 1.0) for t in range(1201, 1300)]
        result_store.replace_results(s, run_id, frame.id, 0, "x", rows, [])
    every = sorted({*layers, "late"})

    def reference(s: Any, start: int | None, end: int | None, at: set[int] | None) -> Any:
        out: dict[str, tuple[list[int], list[float | None]]] = {}
        for la, t, v in metric_reads.metric_points(s, run_id, "a", None, start, end):
            if at is None or t in at:
                steps, values = out.setdefault(la, ([], []))
                steps.append(t)
                values.append(v)
        return out

    at = {*range(0, 1300, 2), 1201}  # 651 steps, one statement
    wide = set(range(2600))  # three chunks of 1,000 steps: "late" only in the second
    with sessions() as s:
        conn = s.connection()
        with statements(conn) as seen:
            got = metric_reads.metric_series(s, run_id, "a", None, 3, 9)
        assert got == reference(s, 3, 9, None)
        assert list(got) == [la for la in every if la != "late"]  # the database's order
        assert len(seen) == 1 + 2  # the layers, then 254 layers in two statements
        for query, params in seen[1:]:
            plan = [str(r[-1]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + query, params)]
            assert plan[-1] == (
                "SEARCH m USING COVERING INDEX ix_metric_run_name_layer_step"
                " (run_id=? AND name=? AND layer=? AND step>? AND step<?)"
            ), plan
        for steps in (at, wide):
            got = metric_reads.metric_series(s, run_id, "a", None, None, None, at_steps=steps)
            assert got == reference(s, None, None, steps)
            assert list(got) == every
        assert metric_reads.metric_series(s, run_id, "a", None, None, None) == reference(
            s, None, None, None
        )
        one = metric_reads.metric_series(s, run_id, "b", "Blocks.0", None, None)
        points = metric_reads.metric_points(s, run_id, "b", "Blocks.0", None, None)
        assert one == {"Blocks.0": ([t for _, t, _ in points], [v for _, _, v in points])}
        assert metric_reads.metric_series(s, run_id, "zz", None, None, None) == {}
        assert metric_reads.metric_series(s, run_id, "a", "nope", None, None) == {}
    engine.dispose()


@pytest.mark.parametrize("max_points", [3, 4, 10, 999, 2000, 2001, None])
def test_downsample_many_equals_downsample_of_each(max_points: int | None) -> None:
    """The batched LTTB (series of one length together) keeps exactly the points LTTB keeps
    of each series alone, NaN/Inf (None) included."""
    rng = np.random.default_rng(7)
    series: list[tuple[list[int], list[float | None]]] = []
    for i in range(12):
        n = (2000, 1500, 2000, 37)[i % 4]
        values: list[float | None] = rng.standard_normal(n).cumsum().tolist()
        if i % 3 == 0:
            values[i] = None
        series.append((list(range(0, 3 * n, 3)), values))
    assert downsample_many(series, max_points) == [downsample(s, v, max_points) for s, v in series]


@pytest.mark.parametrize("scale", [0.001, 1.0, 1000.0])
def test_downsample_keeps_every_gap_whatever_the_values(scale: float) -> None:
    """LTTB read NaN as 0: a gap in a series around 0 spans no triangle and was dropped (around
    +-1 it survived). Each run of None keeps a point, LTTB picks the rest of ``max_points``."""
    steps = list(range(10_000))
    values: list[float | None] = [scale * ((t % 7) - 3) for t in steps]
    for t in (0, 5000, 5001, 5002, 7777, 9999):
        values[t] = None
    for got_steps, got_values in (
        downsample(steps, values, 100),
        downsample_many([(steps, values)], 100)[0],
    ):
        assert len(got_steps) <= 100
        assert got_steps == sorted(got_steps)
        assert [t for t, v in zip(got_steps, got_values, strict=True) if v is None] == [
            0,
            5000,
            7777,
            9999,
        ]
        assert got_steps[1] == 1  # and the first and last finite points
        assert got_steps[-2] == 9998
    few = downsample(steps, [None if t % 2 else 1.0 for t in steps], 10)  # 5,000 gaps
    assert [t for t, v in zip(*few, strict=True) if v is None] == list(range(1, 10_000, 2))


# --- the activations page ----------------------------------------------------------------------


def test_bucketed_layers_equal_the_sql_buckets(tmp_path: Path) -> None:
    """Every layer's min/max buckets from the all-layers read (each layer's covering-index
    search) are the points of that layer's own read with the same buckets: gaps (NaN stored as
    NULL), falling stretches, layers with other steps, a bucket of missing values only."""
    engine, sessions = migrated(tmp_path)
    rng = np.random.default_rng(3)
    with sessions.begin() as s:
        run_id = new_run(s, "p", "r")
        frame = done_frame(s, run_id, 0, 0)
        rows = []
        for i, layer in enumerate(("a", "b", "c.1", "c.10")):
            steps = range(i, 700 - 3 * i, 1 + i % 2)
            walk = rng.standard_normal(len(steps)).cumsum()
            for j, (t, v) in enumerate(zip(steps, walk, strict=True)):
                value = math.nan if (j % 97 == 5 or 300 <= t < 306) and layer == "b" else v
                rows.append(result_store.MetricRow(layer, "m", t, float(value)))
        rows += [result_store.MetricRow("a", "other", t, float(t % 7)) for t in range(0, 900, 4)]
        result_store.replace_results(s, run_id, frame.id, 0, "x", rows, [])
    with sessions() as s:
        for names, buckets in ((["m"], 50), (["m"], 3), (["m", "other"], 128), (["m"], 5000)):
            got = reads.bucketed_series(s, run_id, names, buckets)
            ranges = [r for n in names if (r := reads.step_range(s, run_id, n))]
            lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
            n = max(1, min(buckets, hi - lo + 1))
            want = {}
            for layer in ("a", "b", "c.1", "c.10"):
                want.update(
                    reads._bucketed_sql(s, run_id, names, layer, Metric, lo, hi - lo + 1, n)
                )
            assert got == want, (names, buckets)
            assert None in got[("m", "b")][1]
    engine.dispose()


def test_bucketed_layers_read_a_series_within_the_budget_in_full(tmp_path: Path) -> None:
    """A descriptor at step 0, then every 10 steps from 10,000 to 20,000 (1,002 steps), was
    read at the 3 steps of a sample spaced by its first gap (its line drew 152 points, none
    between 10,000 and 17,010), and one with fewer steps than its read budget but more than the
    budget's evenly spaced part was decimated too. Within the budget now: every point; past
    it: evenly spaced, not ruled by the first gap."""
    steps = [0, *range(10_000, 20_001, 10)]
    engine, sessions = migrated(tmp_path)
    with sessions.begin() as s:
        run_id = new_run(s, "p", "r")
        frame = done_frame(s, run_id, 0, 0)
        rows = [
            result_store.MetricRow(f"blocks.{i}", "eigentrack.entropy", t, i + t / 1e4)
            for t in steps
            for i in range(4)
        ]
        result_store.replace_results(s, run_id, frame.id, 0, "activations", rows, [])
    with sessions() as s:
        series, decimated = reads.bucketed_layers(s, run_id, ["eigentrack.entropy"], 5000, 1002)
        assert decimated == []
        assert series["eigentrack.entropy", "blocks.0"][0] == steps
        series, decimated = reads.bucketed_layers(s, run_id, ["eigentrack.entropy"], 5000, 600)
        assert decimated == ["eigentrack.entropy"]
        drawn = series["eigentrack.entropy", "blocks.0"][0]
        assert drawn[:2] == [0, 10_000]
        assert 400 <= len(drawn) <= 600
        assert max(b - a for a, b in itertools.pairwise(drawn[1:])) <= 40
    engine.dispose()


def test_activations_figures_draw_a_band_and_a_few_lines_of_many(tmp_path: Path) -> None:
    """With 150 modules the page drew 150 lines of 1,000 points per descriptor (1.4-2.2 s of
    Plotly in Chromium): now a min-max band over all of them, the first 12 lines and those
    holding the extremes drawn, every other line in the legend only, at most ~60k points per
    figure. A spike of a module not drawn is still on the band."""
    engine, sessions = migrated(tmp_path)
    layers = [f"blocks.{i}" for i in range(30)]
    with sessions.begin() as s:
        run_id = new_run(s, "p", "r")
        frame = done_frame(s, run_id, 0, 0)
        rows = [
            result_store.MetricRow(
                layer, "eigentrack.entropy", t, 50.0 if (i, t) == (20, 777) else i
            )
            for i, layer in enumerate(layers)
            for t in range(3000)
        ]
        result_store.replace_results(s, run_id, frame.id, 0, "activations", rows, [])
    engine.dispose()
    with TestClient(
        create_app(ServerSettings(data_dir=tmp_path, run_worker=False)), base_url="http://127.0.0.1"
    ) as client:
        body = client.get(f"/api/v1/dashboards/runs/{run_id}/activations").json()
    (panel,) = [p for p in body["panels"] if p["figure"]]
    data = panel["figure"]["data"]
    band, traces = data[:2], data[2:]
    assert [t["name"] for t in traces] == layers  # every module still there, in order
    drawn = [t["name"] for t in traces if t.get("visible") != "legendonly"]
    assert drawn == [*layers[:12], "blocks.20"]  # the first 12 and the one with the spike
    assert [t.get("fill") for t in band] == [None, "tonexty"]
    assert max(band[1]["y"]) == 50.0
    assert min(band[0]["y"]) == 0.0
    top = band[1]["x"][band[1]["y"].index(50.0)]
    assert abs(top - 777) < 6  # on its bucket (3,000 steps in 500 buckets): its first or last step
    assert sum(len(t["x"]) for t in traces) <= 60_000
    assert {t["type"] for t in data} == {"scatter"}  # few points drawn: SVG, not WebGL
    assert "grey band" in panel["help"]


def test_run_alerts_reads_every_page() -> None:
    """``Run.alerts()`` returned the server's first page only (1,000 of a run's episodes)."""
    import httpx

    stored = [{"id": i, "status": "open" if i % 3 else "resolved"} for i in range(2500, 0, -1)]
    asked: list[dict[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/runs/7"):
            return httpx.Response(
                200, json={"id": 7, "name": "r", "project": "p", "status": "running"}
            )
        q = dict(request.url.params)
        asked.append(q)
        rows = [a for a in stored if q.get("status") in (None, a["status"])]
        offset, limit = int(q["offset"]), min(int(q["limit"]), 1000)  # the server's cap
        return httpx.Response(200, json=rows[offset : offset + limit])

    api = client_api.Api("http://testserver")
    api.close()
    api._http = httpx.Client(
        base_url="http://testserver/api/v1", transport=httpx.MockTransport(handler)
    )
    run = api.run(7)
    assert run.alerts() == stored
    assert [q["offset"] for q in asked] == ["0", "1000", "2000"]
    assert run.alerts(status="resolved") == [a for a in stored if a["status"] == "resolved"]


def test_runs_list_reads_frame_counts_in_one_query(tmp_path: Path) -> None:
    """``GET /runs`` counted each run's frames by a query of its own (1,000 runs: 0.58 s);
    now the page's projects and frame counts by one query each."""
    engine, sessions = migrated(tmp_path)
    with sessions.begin() as s:
        runs = [new_run(s, "p" if i % 3 else "q", f"r{i}") for i in range(40)]
        for i, run_id in enumerate(runs[:5]):
            for seq in range(i + 1):
                done_frame(s, run_id, seq, seq).status = "done" if seq % 2 else "queued"
    engine.dispose()
    seen: list[str] = []

    def record(*args: Any) -> None:
        seen.append(args[2])

    with TestClient(
        create_app(ServerSettings(data_dir=tmp_path, run_worker=False)),
        base_url="http://127.0.0.1",
    ) as client:
        event.listen(Engine, "before_cursor_execute", record)
        try:
            listed = client.get("/api/v1/runs", params={"limit": 1000}).json()
        finally:
            event.remove(Engine, "before_cursor_execute", record)
    assert len(listed) == 40
    assert sum("FROM frame" in sql for sql in seen) == 1, seen
    assert sum("FROM project" in sql for sql in seen) == 1, seen
    by_id = {r["id"]: r for r in listed}
    assert by_id[runs[0]]["frames"] == {"queued": 1}
    assert by_id[runs[4]]["frames"] == {"queued": 3, "done": 2}
    assert by_id[runs[9]]["frames"] == {}
    assert {r["project"] for r in listed} == {"p", "q"}
    assert by_id[runs[3]]["project"] == "q"


def test_activations_of_a_long_run_read_a_bounded_number_of_points(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The figure API read every stored point of each descriptor (150 modules x 5,000 steps:
    750,000 points, ~0.7 s in SQLite) to draw 400 of each module. Past its read budget a
    descriptor is now read at evenly spaced stored steps (an index seek each), the figure
    saying so; a run within it is read in full (the test above: same points as before)."""
    layers = [f"blocks.{i}" for i in range(12)]
    steps = 2000
    engine, sessions = migrated(tmp_path)
    with sessions.begin() as s:
        run_id = new_run(s, "p", "r")
        frame = done_frame(s, run_id, 0, 0)
        rows = [
            result_store.MetricRow(layer, "eigentrack.entropy", t, math.sin(t / 100) + i)
            for i, layer in enumerate(layers)
            for t in range(0, 2 * steps, 2)  # every other step: the sample keeps to them
        ]
        result_store.replace_results(s, run_id, frame.id, 0, "activations", rows, [])
    engine.dispose()
    # 12 modules: 1,000 points drawn a line, and 6,000 / 12 -> 1,000 read of 2,000 stored
    # (875 evenly spaced, 125 kept for the values beyond their range)
    monkeypatch.setattr(dashboard_figures, "ACTIVATION_READ_POINTS", 6000)
    seen: list[tuple[str, Any]] = []

    def record(*args: Any) -> None:
        seen.append((args[2], args[3]))

    event.listen(Engine, "before_cursor_execute", record)
    try:
        with TestClient(
            create_app(ServerSettings(data_dir=tmp_path, run_worker=False)),
            base_url="http://127.0.0.1",
        ) as client:
            seen.clear()
            body = client.get(f"/api/v1/dashboards/runs/{run_id}/activations").json()
    finally:
        event.remove(Engine, "before_cursor_execute", record)
    # the rows the figure's statements returned, counted by running them again
    with sqlite3.connect(tmp_path / "spectrawatch.db") as db:
        returned = sum(
            len(db.execute(sql, params).fetchall())
            for sql, params in seen
            if sql.lstrip().upper().startswith(("SELECT", "WITH")) and "metric" in sql
        )
    assert returned <= len(layers) * 1000 + 2 * 1000 + 100, returned  # every point: 24,000+
    (panel,) = [p for p in body["panels"] if p["figure"]]
    traces = [t for t in panel["figure"]["data"] if t["name"] in layers]
    assert [t["name"] for t in traces] == layers
    for trace in traces:
        drawn = set(trace["x"])
        assert len(drawn) <= 1000
        assert min(drawn) == 0
        assert max(drawn) >= 2 * steps - 2 * 4  # to the end of the run
        assert all(t % 2 == 0 for t in drawn)  # stored steps
        # every third stored step (875 of 2,000), and up to 125 steps beyond their range
        assert len([t for t in drawn if t % 6]) <= 2 * 125
    assert "eigentrack.entropy is read at up to 875 evenly spaced" in panel["help"]


def test_decimated_activations_keep_a_one_step_burst_and_a_nan_between_sampled_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A descriptor read at evenly spaced steps lost a one-step outlier (an eigenvalue burst)
    or a NaN at a step between two sampled ones: the figure showed a calm series. The read
    now keeps, in the same budget, each layer's values beyond the range of those sampled and
    its non-finite ones."""
    layers = ["blocks.0", "blocks.1", "blocks.2"]
    steps = 4000
    burst, nan_at = 2001, 3003  # the sample takes every 5th step (875 of 4,000)
    engine, sessions = migrated(tmp_path)
    with sessions.begin() as s:
        run_id = new_run(s, "p", "r")
        frame = done_frame(s, run_id, 0, 0)
        rows = []
        for i, layer in enumerate(layers):
            for t in range(steps):
                value: float = math.sin(t / 100) + i
                if layer == "blocks.1" and t == burst:
                    value = 1e6
                if layer == "blocks.2" and t == nan_at:
                    value = math.nan
                rows.append(result_store.MetricRow(layer, "eigentrack.top_eigenvalue", t, value))
        result_store.replace_results(s, run_id, frame.id, 0, "activations", rows, [])
    engine.dispose()
    # 3 modules: 1,000 points a line, 3,000 / 3 -> 1,000 read a layer of 4,000 stored
    monkeypatch.setattr(dashboard_figures, "ACTIVATION_READ_POINTS", 3000)
    with TestClient(
        create_app(ServerSettings(data_dir=tmp_path, run_worker=False)),
        base_url="http://127.0.0.1",
    ) as client:
        body = client.get(f"/api/v1/dashboards/runs/{run_id}/activations").json()
    (panel,) = [p for p in body["panels"] if p["figure"]]
    assert "evenly spaced" in panel["help"], panel["help"]
    traces = {t["name"]: t for t in panel["figure"]["data"] if t["name"] in layers}
    assert len(traces["blocks.1"]["x"]) <= 1000
    high = [
        (x, y) for x, y in zip(traces["blocks.1"]["x"], traces["blocks.1"]["y"], strict=True) if y
    ]
    peak = max(high, key=lambda p: p[1])
    assert peak[1] == 1e6
    assert abs(peak[0] - burst) <= steps // 500, peak  # drawn in the burst's own bucket
    assert max(y for y in traces["blocks.0"]["y"] if y is not None) < 1.01  # no burst there
    gaps = [
        x
        for x, y in zip(traces["blocks.2"]["x"], traces["blocks.2"]["y"], strict=True)
        if y is None
    ]
    assert len(gaps) == 1, gaps
    assert abs(gaps[0] - nan_at) <= steps // 500, gaps
    assert [y for y in traces["blocks.1"]["y"] if y is None] == []


# --- GET /runs/{id}/metrics/catalog ------------------------------------------------------------


def _grouped_catalog(s: Any, run_id: int) -> list[tuple[str, str, int, int, int]]:
    """The catalog as the ``GROUP BY`` over every metric row of the run answered it."""
    stmt = (
        select(
            Metric.name, Metric.layer, func.count(), func.min(Metric.step), func.max(Metric.step)
        )
        .where(Metric.run_id == run_id)
        .group_by(Metric.name, Metric.layer)
        .order_by(Metric.name, Metric.layer)
    )
    return [(str(n), str(la), int(p), int(a), int(b)) for n, la, p, a, b in s.execute(stmt)]


def test_metric_catalog_is_kept_at_write_time_with_the_group_by_answer(tmp_path: Path) -> None:
    """The catalog was one ``GROUP BY name, layer`` over every metric row of the run (0.5-0.6 s
    on 2.3 M rows in SQLite, 0.4 s in PostgreSQL); now each series' points are counted by the
    writes (``metric_series``, 0008) and its first and last step are seeks. The answer equals
    the ``GROUP BY``'s after every kind of metric write: an analysis stored, stored again
    (re-analysis), whole-model values replaced and dropped, an imported batch, NaN stored as
    NULL, other frames' rows at the same steps, another run deleted; layers missing from some
    metrics, unicode names."""
    engine, sessions = migrated(tmp_path)
    with sessions.begin() as s:
        run_id = new_run(s, "p", "r")
        other = new_run(s, "p", "other")
        frame = done_frame(s, run_id, 0, 0)
        rows = [
            result_store.MetricRow(layer, name, t, math.nan if t % 7 == 3 else float(t))
            for i, layer in enumerate(("a", "b.10", "b.2", "ü", "__model__"))
            for j, name in enumerate(("htsr.alpha", "sed.gap_ratio.w16", "z", "a.b"))
            if (i + j) % 3
            for t in range(i, 40 + 5 * j, 1 + j)
        ]
        result_store.replace_results(s, run_id, frame.id, 0, "x", rows, [])
        frame2 = done_frame(s, other, 0, 0)
        result_store.replace_results(
            s, other, frame2.id, 0, "x", [result_store.MetricRow("q", "m", 5, 1.0)], []
        )
    steps: list[Any] = [
        # re-analysis: the frame's rows replaced by fewer (series shrink, one goes)
        lambda s: result_store.replace_results(
            s, run_id, frame.id, 0, "x", [r for r in rows if r.step % 2 and r.name != "z"], []
        ),
        lambda s: result_store.replace_model_values(
            s, run_id, frame.id, 9, "sed", "__model__", {"grok.score": 0.5, "z": 1.0}
        ),
        lambda s: result_store.replace_model_values(
            s, run_id, done_frame(s, run_id, 9, 1).id, 9, "sed", "__model__", {"grok.score": 0.7}
        ),
        # a resumed session's frame re-sends steps 0-9: its rows replace the older frame's there
        lambda s: result_store.replace_results(
            s, run_id, done_frame(s, run_id, 9, 2).id, 9, "x", [r for r in rows if r.step < 10], []
        ),
        # an older frame analysed after it: its rows where the newer frame's are go unstored
        lambda s: result_store.replace_results(
            s, run_id, done_frame(s, run_id, 5, -5).id, 5, "y", [r for r in rows if r.step > 5], []
        ),
        lambda s: result_store.insert_metric_batch(
            s,
            run_id,
            "k1",
            "import",
            [result_store.MetricRow("a", "imported", t, 1.0) for t in (4, 2)],
        ),
        lambda s: repo.delete_run(s, s.get(Run, other)),
    ]
    for i, step in enumerate([None, *steps]):
        with sessions.begin() as s:
            if step is not None:
                step(s)
        with sessions() as s:
            want = _grouped_catalog(s, run_id)
            assert len(want) > 4, i
            conn = s.connection()
            with statements(conn) as seen:
                got = list(metric_reads.metric_catalog(s, run_id))
            assert got == want, i
            assert list(metric_reads.metric_catalog(s, other)) == _grouped_catalog(s, other), i
            (query, params), *_ = seen
            plan = [str(r[-1]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + query, params)]
            assert "metric_series" in plan[0], plan
            # metric rows by seeks alone: one series' first and last step each
            metric = [p for p in plan if "SEARCH m " in p or "SCAN m " in p]
            assert len(metric) == 2, plan
            assert all("(run_id=? AND name=? AND layer=?)" in p for p in metric), plan
            assert metric_reads.metric_catalog(s, 10_000) == []
    with sessions.begin() as s:  # rows written around the repository: counted anew
        s.execute(delete(MetricSeries))
        result_store.rebuild_metric_series(s, run_id)
    with sessions() as s:
        assert list(metric_reads.metric_catalog(s, run_id)) == _grouped_catalog(s, run_id)
    engine.dispose()


def test_client_follows_next_links_and_sends_its_token_to_no_other_host() -> None:
    """``Api._every`` follows ``Link: rel="next"``, relative ones against the URL of the
    request they answered; a link naming another origin (a public URL this client does not
    use) is followed on the client's own server: the bearer token goes to no other host."""
    import httpx

    seen: list[str] = []
    hops = {
        "0": '</api/v1/runs/7/spectra?cursor=a&limit=1000>; rel="next"',  # relative
        "a": '<https://public.example/sw/api/v1/runs/7/spectra?cursor=b>; rel="next"',
        "b": "",  # the last page
    }

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        assert request.headers["authorization"] == "Bearer t"
        if request.url.path.endswith("/runs/7"):
            return httpx.Response(200, json={"id": 7, "name": "r", "project": "p", "status": "x"})
        at = request.url.params.get("cursor", "0")
        link = {"link": hops[at]} if hops[at] else {}
        return httpx.Response(200, json=[{"at": at}], headers=link)

    api = client_api.Api("http://internal:8000", token="t")
    api.close()
    api._http = httpx.Client(
        base_url="http://internal:8000/api/v1",
        headers={"Authorization": "Bearer t"},
        transport=httpx.MockTransport(handler),
    )
    assert api.run(7).spectra() == [{"at": "0"}, {"at": "a"}, {"at": "b"}]
    assert seen[1:] == [
        "http://internal:8000/api/v1/runs/7/spectra?limit=1000&offset=0",
        "http://internal:8000/api/v1/runs/7/spectra?cursor=a&limit=1000",
        "http://internal:8000/api/v1/runs/7/spectra?cursor=b",
    ]


def test_whole_model_rewrites_seek_the_run_metric_names(tmp_path: Path) -> None:
    """The worker's delete of a weight frame's whole-model summary seeks ``(run_id, name,
    ...)``: filtered on step, analysis and layer alone it walked every metric row of the run
    once per frame (10-17 ms on a 90,000-row run, growing with the run). It still deletes
    exactly the rows it did."""
    engine, sessions = migrated(tmp_path)
    with sessions.begin() as s:
        run_id = new_run(s, "p", "r")
        first, second = done_frame(s, run_id, 9, 0), done_frame(s, run_id, 9, 1)
        rows = [
            result_store.MetricRow(la, n, t, 1.0) for la in LAYERS for n in "ab" for t in range(12)
        ]
        result_store.replace_results(s, run_id, first.id, 0, "x", rows, [])
        model = {"grok.score": 0.5, "z": 1.0}
        result_store.replace_model_values(s, run_id, first.id, 9, "sed", "__model__", model)
    with sessions.begin() as s:
        conn = s.connection()
        with statements(conn) as seen:
            result_store.replace_model_values(
                s, run_id, second.id, 9, "sed", "__model__", {"z": 2.0}
            )
        deletes = [(q, p) for q, p in seen if q.lstrip().upper().startswith("DELETE")]
        assert len(deletes) == 1
        for query, params in deletes:
            plan = [str(r[-1]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + query, params)]
            assert "name=?" in plan[0], plan
        left = s.execute(
            select(Metric.frame_id, Metric.name, Metric.step).where(Metric.layer == "__model__")
        ).all()
        assert left == [(second.id, "z", 9)]
    with sessions() as s:
        kept = s.scalar(select(func.count()).select_from(Metric).where(Metric.run_id == run_id))
        assert kept == len(rows) + 1
    engine.dispose()


def test_a_resumed_run_keeps_one_point_per_step_the_latest_frames(tmp_path: Path) -> None:
    """A run resumed from a checkpoint re-sends steps under higher seqs (weights at 0, 500,
    1000, then 500, 1000 again, then 1500): every series (per layer and whole-model) kept both
    rows at each re-sent step (steps 0, 500, 500, 1000, 1000, 1500). Now one a step, the higher
    seq's, whatever order the frames are analysed in (seq 2 here after seq 4, seq 1 re-analysed
    last); the catalog counts those points. Two imported batches: the later one's. The layer
    drill-down's spectrum of a step is the higher seq's too."""
    engine, sessions = migrated(tmp_path)
    steps = [0, 500, 1000, 500, 1000, 1500]  # by seq
    with sessions.begin() as s:
        run_id = new_run(s, "p", "resumed")
        frames = [done_frame(s, run_id, step, seq).id for seq, step in enumerate(steps)]

    def analyse(seq: int) -> None:
        rows = [
            MetricRow(layer, name, steps[seq], float(seq))
            for layer in ("l0", "l1", "__model__")
            for name in ("htsr.alpha", "norm")
        ]
        spectra = [SpectrumRow("l0", {"seq": seq})]
        with sessions.begin() as s:
            result_store.replace_results(s, run_id, frames[seq], steps[seq], "htsr", rows, spectra)

    for seq in (0, 1, 3, 4, 2, 5, 1):
        analyse(seq)
    with sessions.begin() as s:  # frames sharing no step: a seek per stored row, index only
        frame = done_frame(s, run_id, 2000, 6)
        conn = s.connection()
        with statements(conn) as seen:
            result_store.replace_results(
                s, run_id, frame.id, 2000, "htsr", [MetricRow("l0", "norm", 2000, 6.0)], []
            )
        (query, params), *_ = [(q, p) for q, p in seen if "LIMIT" in q.upper()]
        plan = [str(r[-1]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + query, params)]
        assert "COVERING INDEX sqlite_autoindex_metric_1 (frame_id=? AND analysis=?)" in plan[0]
        assert "COVERING INDEX ix_metric_run_name_layer_step (run_id=? AND name=? AND" in plan[-1]
        s.execute(delete(Metric).where(Metric.frame_id == frame.id))
        result_store.rebuild_metric_series(s, run_id)
    with sessions.begin() as s:
        for key, value in (("k1", 1.0), ("k2", 2.0)):
            rows = [MetricRow("l0", "imported", t, value) for t in (7, 8)]
            result_store.insert_metric_batch(s, run_id, key, "import", rows)
    with sessions() as s:
        for layer in ("l0", "l1", "__model__"):
            for name in ("htsr.alpha", "norm"):
                got = metric_reads.metric_tail(s, run_id, name, layer, 100)
                assert got == [(0, 0.0), (500, 3.0), (1000, 4.0), (1500, 5.0)], (name, layer)
        assert metric_reads.metric_tail(s, run_id, "imported", "l0", 9) == [(7, 2.0), (8, 2.0)]
        assert list(metric_reads.metric_catalog(s, run_id)) == _grouped_catalog(s, run_id)
        assert ("norm", "l0", 4, 0, 1500) in _grouped_catalog(s, run_id)
        shown = metric_reads.spectrum_steps(s, run_id, "l0", "htsr")
        payloads = [s.get_one(Spectrum, sid).payload["seq"] for _, sid in shown]
        assert [step for step, _ in shown] == [0, 500, 1000, 1500]
        assert payloads == [0, 3, 4, 5]
    engine.dispose()


def test_a_scalar_batch_is_one_statement_compiled_once(tmp_path: Path) -> None:
    """A scalar batch is one upsert executed for every row (executemany), not a multi-row
    ``VALUES`` statement per 5,000 rows that SQLAlchemy compiled anew, ~0.5 s apiece inside the
    write transaction (100,000 scalars: SQLite's write lock held 11 s, other writers' 503s).
    Same rows stored: a (name, step) repeated, in the batch or from before, keeps the later."""
    engine, sessions = migrated(tmp_path)
    with sessions.begin() as s:
        run_id = new_run(s, "p", "r", status="running")
        result_store.upsert_scalars(s, run_id, [(3, "loss", 9.0)])
    rows = [(t, name, float(t)) for t in range(6_000) for name in ("loss", "acc")]
    rows += [(5, "loss", -1.0), (7, "acc", math.inf)]
    with sessions.begin() as s:
        conn = s.connection()
        with statements(conn) as seen:
            assert result_store.upsert_scalars(s, run_id, rows) == len(rows)
        inserts = [q for q, _ in seen if q.lstrip().upper().startswith("INSERT")]
        assert len(inserts) == 1
        assert inserts[0].count("?") == 4, inserts[0][:200]  # one row's values, not 5,000 rows'
    with sessions() as s:
        stored = {(n, t): v for n, t, v in metric_reads.scalar_points(s, run_id, None, None, None)}
    assert len(stored) == 12_000
    assert stored["loss", 3] == 3.0
    assert stored["loss", 5] == -1.0
    assert stored["acc", 7] is None
    assert stored["acc", 5_999] == 5_999.0
    engine.dispose()


def test_history_reads_run_prebuilt_statements(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's history reads (a frame reads dozens of tails) run statements built once
    with bound values: building each anew cost more than its index seek (~10% of a backlog of
    small frames). Same points as before: the last ``limit`` finite ones, oldest first."""
    engine, sessions = migrated(tmp_path)
    with sessions.begin() as s:
        run_id = new_run(s, "p", "r")
        frame = done_frame(s, run_id, 0, 0)
        rows = [
            result_store.MetricRow(la, "a", t, math.nan if t == 7 else float(t))
            for la in LAYERS
            for t in range(10)
            if la != "l1" or t < 3
        ]
        result_store.replace_results(s, run_id, frame.id, 0, "x", rows, [])
        result_store.upsert_scalars(s, run_id, [(t, "loss", float(t)) for t in range(6)])
    built: list[object] = []
    where = Select.where

    def counted(self: Select[Any], *args: Any) -> Select[Any]:
        built.append(args)
        return where(self, *args)

    monkeypatch.setattr(Select, "where", counted)
    with sessions() as s:
        tails = series.metric_tails(s, run_id, {("a", "l2"): 3, ("a", "l1"): 5, ("a", "l10"): 4})
        since = series.metric_tails(s, run_id, {("a", "l10"): 2, ("a", "l1"): 1})
        one = metric_reads.metric_tail(s, run_id, "a", "l2", 2)
        loss = metric_reads.scalar_tail(s, run_id, "loss", 4)
    assert tails == {
        ("a", "l2"): [(6, 6.0), (8, 8.0), (9, 9.0)],
        ("a", "l1"): [(0, 0.0), (1, 1.0), (2, 2.0)],
        ("a", "l10"): [(5, 5.0), (6, 6.0), (8, 8.0), (9, 9.0)],
    }
    assert since == {("a", "l10"): [(8, 8.0), (9, 9.0)], ("a", "l1"): [(2, 2.0)]}
    assert one == [(8, 8.0), (9, 9.0)]
    assert loss == [(2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0)]
    assert built == []
    engine.dispose()


def test_history_reads_stop_at_the_analysed_frames_steps(tmp_path: Path) -> None:
    """A frame's history is the run up to its steps: with later frames' results stored (a
    re-analysis, or a resumed run re-sending earlier steps), "the last N points" were theirs (an
    activations frame re-analysed found no earlier point for its change score). Metric tails,
    flagged steps and scalars stop at the frame's last step, a sketch frame's last row."""
    engine, sessions = migrated(tmp_path)
    with sessions.begin() as s:
        run_id = new_run(s, "p", "r")
        owner = done_frame(s, run_id, 30, 0)
        rows = [MetricRow("l", name, t, float(t)) for name in ("m", "f") for t in range(31)]
        result_store.replace_results(s, run_id, owner.id, 30, "x", rows, [])
        result_store.upsert_scalars(s, run_id, [(t, "loss", float(t)) for t in range(31)])
        weights = done_frame(s, run_id, 10, 1)
        sketch = done_frame(s, run_id, 11, 2, kind="update_sketch")
        sketch.info = {"steps": [11, 12, 13, 14]}
    loader = FrameLoader(
        LocalBlobStore(tmp_path / "blobs"), torch.device("cpu"), FrameLimits(), 1 << 20, 0
    )
    with sessions() as s:
        at = RunHistory(s, loader, s.get_one(Frame, weights.id))
        points = [(t, float(t)) for t in range(6, 11)]
        assert at.metric_series("m", "l", 5) == points
        assert at.metric_tails({("m", "l"): 5, ("f", "l"): 2}) == {
            ("m", "l"): points,
            ("f", "l"): points[-2:],
        }
        assert at.flagged_steps("f", 8) == {"l": {8, 9, 10}}
        assert at.scalar_series("loss", 3) == points[-3:]
        rows_end = RunHistory(s, loader, s.get_one(Frame, sketch.id))
        assert rows_end.metric_series("m", "l", 2) == [(13, 13.0), (14, 14.0)]
        assert rows_end.scalar_series("loss", 1) == [(14, 14.0)]
    engine.dispose()


def test_bulk_delete_reads_only_the_candidate_runs_projects(tmp_path: Path) -> None:
    """``POST /runs/bulk-delete`` names each candidate run's project: it read every project
    of the database for that (a statement without a WHERE clause); now the candidates' only.
    The answer (dry run and real) is unchanged."""
    settings = ServerSettings(data_dir=tmp_path, run_worker=False, run_webhooks=False)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        for i in range(30):  # projects with runs that are not stale
            assert client.post("/api/v1/runs", json={"project": f"p{i}", "name": "r"}).is_success
        old = client.post("/api/v1/runs", json={"project": "old", "name": "r"}).json()["id"]
        assert client.patch(f"/api/v1/runs/{old}", json={"status": "finished"}).is_success
        sessions = client.app.state.spectrawatch.sessions  # type: ignore[attr-defined]
        then = utcnow() - timedelta(days=40)
        with sessions.begin() as session:
            session.execute(
                update(Run).where(Run.id == old).values(updated_at=then, last_seen_at=then)
            )
        engine = client.app.state.spectrawatch.engine  # type: ignore[attr-defined]
        seen: list[tuple[str, Any]] = []

        def record(*args: Any) -> None:
            seen.append((args[2], args[3]))

        event.listen(engine, "before_cursor_execute", record)
        try:
            dry = client.post(
                "/api/v1/runs/bulk-delete", json={"older_than_days": 30, "dry_run": True}
            )
            done = client.post("/api/v1/runs/bulk-delete", json={"older_than_days": 30})
        finally:
            event.remove(engine, "before_cursor_execute", record)
        for resp in (dry, done):
            assert resp.status_code == 200, resp.text
            assert [(r["id"], r["project"]) for r in resp.json()["runs"]] == [(old, "old")]
        assert client.get(f"/api/v1/runs/{old}").status_code == 404
    # every statement reading the project table, run again: the rows each returned
    with sqlite3.connect(tmp_path / "spectrawatch.db") as db:
        project_rows = [
            len(db.execute(sql, params).fetchall())
            for sql, params in seen
            if sql.lstrip().upper().startswith("SELECT") and re.search(r"\bFROM project\b", sql)
        ]
    assert project_rows, "no statement read the project names"
    assert max(project_rows) <= 1, project_rows  # was 31: every project
