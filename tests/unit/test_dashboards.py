"""Dashboard figures (pure builders), page definitions, the index-friendly queries, and every
page/figure route through FastAPI's TestClient (browser rendering is in tests/e2e)."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sqlalchemy import event

from spectrawatch.spectral.htsr import analyze_weights, esd_payload
from spectrawatch_server import figures as fig
from spectrawatch_server.api.routes import dashboard_figures as routes
from spectrawatch_server.db.models import Metric, Scalar
from spectrawatch_server.storage import dashboard_reads as reads
from spectrawatch_server.storage import metric_reads, result_store, series
from spectrawatch_server.storage import repository as repo
from spectrawatch_server.storage.result_store import MetricRow
from tests.dashboard_seed import done_frame, migrated, new_run

# --- page definitions ------------------------------------------------------------------------


def test_shipped_pages_parse_and_cover_every_route() -> None:
    pages = routes.pages()
    assert set(pages) == {"overview", "layers", "layer", "activations", "compare", "alerts"}
    assert [p.id for p in pages["overview"].panels] == [
        "loss",
        "accuracy",
        "sed_gap",
        "sed_edge",
        "update_ratio",
        "warning",
        "output_rank",
        "probe",
        "defect",
        "system_util",
        "system_memory",
        "system_gpu",
    ]
    assert pages["layer"].panel("esd").kind == "esd"
    assert pages["layer"].panel("traps").kind == "traps"
    assert pages["activations"].panels[0].split


def test_scalars_claimed_by_specific_panels_before_catch_alls() -> None:
    overview = routes.pages()["overview"]
    names = [
        "loss",
        "val_acc",
        "lr",
        "probe.prediction_agreement",
        "probe.prediction_churn",
        "probe.prediction_positions",
        "probe.prediction_confidence",
        "grok.gradient_coherence",
        "grok.commutator_defect",
    ]
    got = fig.claim_scalars(overview.panels, names)
    assert got == {
        "loss": ["loss"],
        "accuracy": ["val_acc", "lr"],  # the catch-all comes second on the page, claims last
        "probe": [
            "probe.prediction_agreement",
            "probe.prediction_churn",
            "probe.prediction_confidence",
            "grok.gradient_coherence",
        ],
        "defect": ["grok.commutator_defect"],
        "system_util": [],
        "system_memory": [],
        "system_gpu": [],
    }  # the sample size is claimed by "probe" (hide) and drawn nowhere


def test_system_metrics_get_panels_of_their_own_after_the_training_scalars() -> None:
    """The client's ``system/...`` samples (CPU %, MiB, °C, W) go to three system panels at
    the end of the overview, by unit, never into the catch-all beside ``val_acc``."""
    overview = routes.pages()["overview"]
    names = [
        "loss",
        "val_acc",
        "system/cpu_percent",
        "system/rss_mib",
        "system/cuda0/gpu_util_percent",
        "system/cuda0/memory_allocated_mib",
        "system/cuda0/memory_reserved_mib",
        "system/cuda0/max_memory_allocated_mib",
        "system/cuda0/memory_used_mib",
        "system/cuda0/temperature_c",
        "system/cuda0/power_w",
        "system/cuda1/gpu_util_percent",
    ]
    got = fig.claim_scalars(overview.panels, names)
    assert got["loss"] == ["loss"]
    assert got["accuracy"] == ["val_acc"]
    assert got["system_util"] == [
        "system/cpu_percent",
        "system/cuda0/gpu_util_percent",
        "system/cuda1/gpu_util_percent",
    ]
    assert got["system_memory"] == [
        "system/rss_mib",
        "system/cuda0/max_memory_allocated_mib",
        "system/cuda0/memory_allocated_mib",
        "system/cuda0/memory_reserved_mib",
        "system/cuda0/memory_used_mib",
    ]
    assert got["system_gpu"] == ["system/cuda0/power_w", "system/cuda0/temperature_c"]
    ids = [p.id for p in overview.panels]
    assert ids.index("system_util") > ids.index("defect")  # after every training panel


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"id": "p", "title": "t", "panels": [{"id": "a", "title": "A", "kind": "pie"}]},
            "kind 'pie'",
        ),
        (
            {"id": "p", "title": "t", "panels": [{"id": "a", "title": "A", "kind": "lines"}] * 2},
            "unique",
        ),
        ({"id": "p", "title": 3}, "'id' and 'title'"),
        (
            {
                "id": "p",
                "title": "t",
                "panels": [{"id": "a", "title": "A", "kind": "lines", "match": 4}],
            },
            "'match'",
        ),
    ],
)
def test_bad_page_definitions_name_the_problem(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(fig.PageSpecError, match=message):
        fig.parse_page(raw)


def test_bundled_plotly_is_the_installed_plotly_js() -> None:
    import plotly

    installed = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    bundled = routes.package_dir() / "static" / "plotly.min.js"
    assert (
        hashlib.sha256(bundled.read_bytes()).hexdigest()
        == hashlib.sha256(installed.read_bytes()).hexdigest()
    )


SHARED_JS = ("$", "el", "token", "askToken", "tokenForm", "showError", "clearError", "formatTime")


def test_page_scripts_share_their_helpers_from_common_js() -> None:
    """The token, DOM, banner and time helpers are written once, in ``common.js``; the page
    scripts take them from ``window.SWCommon`` (two copies drift: a fix lands in one page)."""
    static = routes.package_dir() / "static"
    for name in ("spectrawatch.js", "rules.js", "runs.js"):
        text = (static / name).read_text(encoding="utf-8")
        for helper in SHARED_JS:
            assert f"function {helper}(" not in text, f"{name} defines {helper} again"
        assert "localStorage.getItem" not in text, f"{name} reads the token itself"
        assert "window.SWCommon" in text, name
    common = (static / "common.js").read_text(encoding="utf-8")
    for helper in SHARED_JS:
        assert f"function {helper}(" in common, helper


# --- small helpers ---------------------------------------------------------------------------


def test_match_names_orders_windows_numerically_and_dedupes() -> None:
    names = ["sed.gap_ratio.w128", "sed.gap_ratio.w16", "sed.gap_ratio", "sed.edge.w16", "loss"]
    got = fig.match_names(names, ["sed.gap_ratio.w*", "sed.gap_ratio", "sed.*"])
    assert got == ["sed.gap_ratio.w16", "sed.gap_ratio.w128", "sed.gap_ratio", "sed.edge.w16"]
    assert fig.window_of("sed.gap_ratio.w32") == "w32"
    assert fig.window_of("sed.gap_ratio") == ""


def test_natural_key_takes_only_ascii_digit_runs_as_numbers() -> None:
    """``²`` is a digit to ``str.isdigit`` but not to ``int``: it stays text (every figure
    sorting a name ``grad_L2²`` answered 500)."""
    assert fig.natural_key("grad_L2²") == ("grad_L", 2, "²")
    assert fig.natural_key("1²") == ("", 1, "²")
    names = ["fc2²", "fc10", "fc2", "x²", "grad_L2²"]
    assert sorted(names, key=fig.natural_key) == ["fc2", "fc2²", "fc10", "grad_L2²", "x²"]


def test_pages_of_names_with_superscript_digits_load(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings

    settings = ServerSettings(data_dir=tmp_path, run_worker=False)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        rid = client.post("/api/v1/runs", json={"project": "p", "name": "r"}).json()["id"]
        scalars = [{"step": s, "name": n, "value": 1.0} for s in range(3) for n in ("loss", "L2²")]
        client.post(f"/api/v1/runs/{rid}/scalars", json=scalars).raise_for_status()
        rows = [
            {"step": s, "layer": la, "name": "htsr.alpha", "value": 3.0}
            for s in range(3)
            for la in ("fc1", "fc2²")
        ]
        client.post(
            f"/api/v1/runs/{rid}/metrics", json={"source": "import", "rows": rows}
        ).raise_for_status()
        for path in ("overview", "layers", "layer?layer=fc1"):
            assert client.get(f"/api/v1/dashboards/runs/{rid}/{path}").status_code == 200, path
        compare = client.get("/api/v1/dashboards/compare", params={"runs": rid})
        assert compare.status_code == 200
        assert compare.json()["controls"]["names"]["options"] == ["L2²", "htsr.alpha", "loss"]


def test_first_at_least_skips_missing_values() -> None:
    assert fig.first_at_least([0, 5, 10, 15], [0.1, None, 0.95, 0.99], 0.9) == 10
    assert fig.first_at_least([0, 5], [0.1, 0.2], 0.9) is None


def test_phase_spans_tile_the_axis_and_break_on_unknown() -> None:
    steps = [0, 1, 2, 3, 4, 5, 6, 7]
    codes: list[float | None] = [1, 1, 2, 2, 0, 3, 3, None]
    assert fig.phase_spans(steps, codes) == [(0, 2, 1), (2, 4, 2), (5, 7, 3)]
    bands = fig.phase_bands(steps, codes)
    assert [b.label for b in bands] == ["rise", "plateau", "collapse"]


def test_val_acc_pattern() -> None:
    assert all(
        fig.VAL_ACC_PATTERN.match(n) for n in ("val_acc", "val/accuracy", "test_acc", "eval.acc")
    )
    assert not any(fig.VAL_ACC_PATTERN.match(n) for n in ("train_acc", "val_loss", "accuracy"))


def test_accuracy_logged_in_percent_crosses_90_not_0_9(tmp_path: Path) -> None:
    """A val_acc from 10 to 95 (percent, as torchvision's scripts print it) was past 0.9 at
    step 0: its crossing is where it reaches 90."""
    from fastapi.testclient import TestClient

    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings

    assert fig.val_acc_threshold(None) == fig.val_acc_threshold(1.0) == 0.9
    assert fig.val_acc_threshold(95.0) == 90.0
    settings = ServerSettings(data_dir=tmp_path, run_worker=False)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        summaries = {}
        for scale, threshold in ((1.0, 0.9), (100.0, 90.0)):
            rid = client.post("/api/v1/runs", json={"project": "p", "name": f"x{scale}"}).json()
            values = [
                {"step": s, "name": "val_acc", "value": scale * (0.1 + 0.85 * s / 1000)}
                for s in range(0, 1001, 50)
            ]
            client.post(f"/api/v1/runs/{rid['id']}/scalars", json=values).raise_for_status()
            body = client.get(f"/api/v1/dashboards/runs/{rid['id']}/overview").json()
            summaries[threshold] = body["summary"]
            accuracy = next(p for p in body["panels"] if p["id"] == "accuracy")
            texts = [a["text"] for a in accuracy["figure"]["layout"]["annotations"]]
            assert f"val_acc ≥ {threshold:g}" in texts
    for threshold, summary in summaries.items():
        assert summary["val_acc_crossing_step"] == 950, threshold
        assert summary["val_acc_threshold"] == threshold


def test_series_csv_quotes_names() -> None:
    csv = fig.series_csv([("a,b", [1, 2], [0.5, None])])
    assert csv == 'series,step,value\n"a,b",1,0.5\n"a,b",2,\n'


def test_click_target_encodes_layer_names() -> None:
    url = fig.heatmap_click_target(3, "blocks/0.attn", "htsr.alpha", 40)
    assert url == "/runs/3/layers/blocks%2F0.attn?metric=htsr.alpha&step=40"


# --- figure builders -------------------------------------------------------------------------


def test_a_log_axis_with_values_at_or_below_zero_turns_linear_and_says_so() -> None:
    """A loss panel is log-scaled, but a negative loss (NLL of a density, an ELBO) would vanish
    from a log axis without a word: the figure is linear then, and its title says why."""
    positive = fig.Line("loss", [0, 1, 2], [2.0, 1.0, 0.5])
    negative = fig.Line("val_loss", [0, 1, 2], [1.0, None, -0.5])
    kept = fig.line_figure("Loss", [positive], log_y=True)["layout"]
    assert (kept["yaxis"]["type"], kept["title"]["text"]) == ("log", "Loss")
    for lines in ([positive, negative], [positive, fig.Line("zero", [3], [0.0])]):
        layout = fig.line_figure("Loss", lines, log_y=True)["layout"]
        assert layout["yaxis"]["type"] == "linear"
        assert layout["title"]["text"] == "Loss · linear axis: values ≤ 0"
    hidden = fig.Line("val_loss", [0], [-1.0], shown=False)  # not drawn: no reason to switch
    assert fig.line_figure("Loss", [positive, hidden], log_y=True)["layout"]["yaxis"]["type"] == (
        "log"
    )


def test_line_figure_markers_bands_and_webgl_switch() -> None:
    small = fig.line_figure(
        "t",
        [fig.Line("loss", [0, 1, 2], [1.0, None, 0.5])],
        markers=fig.overview_markers(
            10, 25, "val_acc", [{"step": 30, "rule": "nan", "severity": "critical"}]
        ),
        bands=fig.phase_bands([0, 10, 20], [1, 2, 2]),
        y_band=(2.0, 6.0),
    )
    assert small["data"][0]["type"] == "scatter"
    assert small["data"][0]["y"] == [1.0, None, 0.5]
    lines = [
        (s["x0"], s["line"]["color"]) for s in small["layout"]["shapes"] if s["type"] == "line"
    ]
    assert lines == [(10, fig.EARLY_WARNING_COLOR), (25, fig.CROSSING_COLOR), (30, "#d62728")]
    assert not {c for _, c in lines} & set(fig.DATA_COLORS)  # marks are no data colour
    labels = [a["text"] for a in small["layout"]["annotations"]]
    assert "early warning (lead +15 steps)" in labels
    rects = [(s["x0"], s["x1"]) for s in small["layout"]["shapes"] if s["type"] == "rect"]
    assert rects == [(0, 10), (10, 20), (0, 1)]  # two phase bands, then the y band (paper x)
    n = fig.WEBGL_POINTS // 2 + 1
    big = fig.line_figure("t", [fig.Line(str(i), list(range(n)), [0.0] * n) for i in range(2)])
    assert {t["type"] for t in big["data"]} == {"scattergl"}
    json.dumps(big, allow_nan=False)  # strict JSON


def test_grid_and_heatmap() -> None:
    rows = [("l10", 5, 1.0), ("l2", 5, 2.0), ("l2", 0, None), ("l10", 0, 3.0)]
    grid = fig.grid_from_rows(rows)
    assert grid.layers == ["l2", "l10"]
    assert grid.steps == [0, 5]
    assert grid.z == [[None, 2.0], [3.0, 1.0]]
    heat = fig.heatmap_figure("htsr.alpha", grid, sampled=True)
    assert heat["data"][0]["type"] == "heatmap"
    assert heat["layout"]["yaxis"]["type"] == "category"
    assert heat["layout"]["yaxis"]["dtick"] == 1  # every layer labelled
    assert "sampled at 2 steps" in heat["layout"]["title"]["text"]
    missing = fig.grid_from_rows([("a", 0, 1.0), ("b", 1, 2.0)])
    assert missing.z == [[1.0, None], [None, 2.0]]
    assert heat["layout"]["xaxis"]["tickvals"] == [0, 5]  # few columns: a tick at each step
    one = fig.heatmap_figure("x", fig.grid_from_rows([("a", 500, 1.0)]))
    assert one["layout"]["xaxis"]["tickvals"] == [500]  # not 499.6, 499.8, ... 500.4
    many = fig.grid_from_rows([("a", s, 1.0) for s in range(0, 200, 10)])
    assert "tickvals" not in fig.heatmap_figure("x", many)["layout"]["xaxis"]


def test_model_order_key_puts_the_model_first_then_the_frames_order_then_the_rest() -> None:
    order = ["embed.weight", "blocks.0.weight", "blocks.10.weight", "blocks.2.weight", "head.w"]
    key = fig.model_order_key(order)
    names = ["head.w", "blocks.2.weight", "zz.new", "__model__", "blocks.10.weight", "a.new"]
    names += ["embed.weight", "blocks.0.weight"]
    assert sorted(names, key=key) == ["__model__", *order, "a.new", "zz.new"]
    rows = [(la, 0, 1.0) for la in reversed(order)]
    assert fig.grid_from_rows(rows, key).layers == order
    assert fig.grid_from_rows(rows).layers[-2:] == ["embed.weight", "head.w"]  # natural order
    onsets = {"blocks.2.weight": (5, "weights"), "blocks.10.weight": (5, "weights")}
    assert "in blocks.10.weight, blocks.2.weight:" in fig.nonfinite_note(onsets, order=key)


def test_merge_order_places_a_sketchs_other_tensors_among_a_snapshots() -> None:
    """A weight snapshot lists the matrices (frozen ones too), a sketch the trained tensors
    (biases, norms): the merge keeps both walks' order; modules share no name: appended."""
    snapshot = ["embed.weight", "blocks.0.attn.weight", "blocks.0.mlp.weight", "head.weight"]
    sketch = ["blocks.0.attn.weight", "blocks.0.attn.bias", "blocks.0.ln.weight"]
    sketch += ["blocks.0.mlp.weight", "head.weight", "head.bias", "__model__"]
    assert reads.merge_order(snapshot, sketch) == [
        "embed.weight",
        "blocks.0.attn.weight",
        "blocks.0.attn.bias",
        "blocks.0.ln.weight",
        "blocks.0.mlp.weight",
        "head.weight",
        "head.bias",
        "__model__",
    ]
    assert reads.merge_order(["b.weight"], ["a.bias", "b.weight"]) == ["a.bias", "b.weight"]
    assert reads.merge_order(snapshot, ["embed", "head"]) == [*snapshot, "embed", "head"]
    assert reads.merge_order([], sketch) == sketch
    assert reads.merge_order(sketch, []) == sketch


def test_heatmap_of_values_decades_apart_is_coloured_by_their_log() -> None:
    """Per-layer update ratios or condition numbers span decades: on a linear colour scale all
    but the largest layer read as one colour. Coloured by log10, with decade ticks; hover and
    CSV (``customdata``) keep the values."""
    rows = [("a", 0, 1e-4), ("a", 5, 2e-3), ("b", 0, 0.5), ("b", 5, None)]
    heat = fig.heatmap_figure("norm.update_ratio", fig.grid_from_rows(rows))
    trace = heat["data"][0]
    assert trace["customdata"] == [[1e-4, 2e-3], [0.5, None]]
    np.testing.assert_allclose(trace["z"][0], [-4.0, math.log10(2e-3)])
    assert trace["z"][1] == [pytest.approx(math.log10(0.5)), None]
    assert trace["colorbar"]["tickvals"] == [-4, -3, -2, -1, 0]
    assert trace["colorbar"]["ticktext"][0] == "10<sup>\u22124</sup>"  # 10⁻⁴: the values' units
    assert "%{customdata:.4g}" in trace["hovertemplate"]
    assert "log colour scale" in heat["layout"]["title"]["text"]
    for linear in ([("a", 0, 1.0), ("a", 5, 900.0)], [("a", 0, 0.0), ("a", 5, 1e6)]):
        plain = fig.heatmap_figure("x", fig.grid_from_rows(linear))["data"][0]
        assert "customdata" not in plain  # within 1,000x, or not all positive
        assert plain["z"] == [[v for _, _, v in linear]]


@pytest.fixture(scope="module")
def payload() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(200, 100, generator=gen, dtype=torch.float64)
    w[:, :3] *= 8.0  # three planted spikes above the MP bulk
    report = analyze_weights({"w": w})
    layer = report.layers[0]
    out = esd_payload(layer.evals, layer.plain)
    out["_evals"] = layer.evals.tolist()
    return out


def test_esd_figure_log_log_with_fit(payload: dict[str, Any]) -> None:
    f = fig.esd_figure(payload, "ESD")
    esd, line = f["data"][0], f["data"][1]
    edges = np.asarray(payload["hist"]["edges"])
    density = np.asarray(payload["hist"]["density"])
    keep = density > 0
    np.testing.assert_allclose(esd["x"], np.sqrt(edges[:-1] * edges[1:])[keep], rtol=1e-12)
    np.testing.assert_allclose(esd["y"], density[keep], rtol=1e-12)
    assert f["layout"]["xaxis"]["type"] == "log"
    assert f["layout"]["yaxis"]["type"] == "log"
    assert line["name"] == f"power law \u03b1={payload['fit']['alpha']:.3f}"
    xmin = [s["x0"] for s in f["layout"]["shapes"]]
    assert xmin == [pytest.approx(payload["fit"]["xmin"])]
    # The fitted line is the tail-scaled power-law pdf: check one point independently.
    fit = payload["fit"]
    k = payload["num_evals"]
    x0 = line["x"][0]
    expect = (
        (fit["num_tail"] / k)
        * (fit["alpha"] - 1)
        / fit["xmin"]
        * (x0 / fit["xmin"]) ** -fit["alpha"]
    )
    assert line["y"][0] == pytest.approx(expect, rel=1e-9)


def test_mp_figure_marks_spikes_beyond_lambda_plus(payload: dict[str, Any]) -> None:
    f = fig.mp_figure(payload, "MP")
    names = [t["name"] for t in f["data"]]
    assert names[0] == "ESD bulk"
    assert names[1] == "beyond \u03bb+ (spikes)"
    bulk_max = payload["mp"]["bulk_max"]
    # Independent count: eigenvalues in equal bins over [0, lambda_max] whose centre lies beyond
    # lambda+ (numpy histogram).
    evals = np.asarray(payload["_evals"])
    edges = np.linspace(0.0, evals.max(), 101)
    counts, _ = np.histogram(evals, bins=edges)
    centers = (edges[:-1] + edges[1:]) / 2
    beyond = counts[centers > bulk_max]
    # Red: the top bins holding the num_spikes largest eigenvalues (the label's count).
    red = f["data"][1]["customdata"]
    n_spikes = payload["mp"]["num_spikes"]
    assert n_spikes >= 3  # the planted spikes
    assert sum(red) >= n_spikes > sum(red[1:])
    assert red == [int(c) for c in beyond[beyond > 0][-len(red) :]]
    assert f"{n_spikes} spike(s)" in f["layout"]["annotations"][0]["text"]
    assert [s["x0"] for s in f["layout"]["shapes"]] == [pytest.approx(bulk_max)]


def test_mp_figure_bars_agree_with_the_spike_count(payload: dict[str, Any]) -> None:
    """An eigenvalue past lambda+ but within its Tracy-Widom pad is no spike: with
    ``num_spikes`` 0 no bar is red (it was: a red "spikes" bar under "0 spike(s)")."""
    calm = {**payload, "mp": {**payload["mp"], "num_spikes": 0}}
    f = fig.mp_figure(calm, "MP")
    assert [t["name"] for t in f["data"]] == ["ESD bulk", f["data"][1]["name"]]
    assert f["data"][1]["type"] == "scatter"  # the MP density, no spike bars
    assert "0 spike(s)" in f["layout"]["annotations"][0]["text"]
    hist = payload["linear_hist"]
    width = (hist["hi"] - hist["lo"]) / len(hist["counts"])
    centers = hist["lo"] + width * (np.arange(len(hist["counts"])) + 0.5)
    past = centers[(centers > payload["mp"]["bulk_max"]) & (np.asarray(hist["counts"]) > 0)]
    assert len(past) >= 1
    bulk = np.asarray(f["data"][0]["x"])
    assert all(np.isclose(bulk, c, rtol=1e-12).any() for c in past)  # within the pad: bulk
    legacy = {**payload, "mp": {k: v for k, v in payload["mp"].items() if k != "num_spikes"}}
    assert fig.mp_figure(legacy, "MP")["data"][1]["name"] == "beyond \u03bb+ (spikes)"


def test_mp_figure_bins_are_equal_and_the_axis_ignores_a_divergent_density() -> None:
    """A square weight (Q = 1): its MP density diverges at 0 and its smallest eigenvalues sit in
    log bins thousands of times narrower than the bulk's; the MP plot (equal bins, as
    WeightWatcher's) keeps the bars readable, its y axis a little above the tallest bar. A
    payload stored before ``linear_hist`` keeps the log bins."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(128, 128, generator=gen, dtype=torch.float64)
    layer = analyze_weights({"w": w}).layers[0]
    payload = esd_payload(layer.evals, layer.plain)
    f = fig.mp_figure(payload, "MP")
    bars = [t for t in f["data"] if t["type"] == "bar"]
    widths = {round(x, 12) for t in bars for x in t["width"]}
    assert len(widths) == 1
    assert widths == {round(float(layer.evals.max()) / 100, 12)}
    evals = layer.evals.numpy()
    counts, _ = np.histogram(evals, bins=np.linspace(0.0, evals.max(), 101))
    tallest = counts.max() / (len(evals) * evals.max() / 100)
    assert max(y for t in bars for y in t["y"]) == pytest.approx(tallest, rel=1e-12)
    curve = next(t for t in f["data"] if t["type"] == "scatter")
    assert max(curve["y"]) > 10 * tallest  # diverges at 0
    assert f["layout"]["yaxis"]["range"] == [0, pytest.approx(1.3 * tallest)]
    legacy = {k: v for k, v in payload.items() if k != "linear_hist"}
    old = fig.mp_figure(legacy, "MP")
    assert len({round(x, 12) for t in old["data"] if t["type"] == "bar" for x in t["width"]}) > 1


def test_payload_with_nulls_does_not_break_builders() -> None:
    broken = {
        "hist": {"edges": [1.0, None, 3.0], "density": [0.5, None], "counts": [1, 0]},
        "fit": {"alpha": None, "xmin": 1.0},
        "mp": {"bulk_max": None},
    }
    assert fig.esd_figure(broken, "x")["data"][0]["x"] == []
    assert len(fig.esd_figure(broken, "x")["data"]) == 1  # no fit line without alpha
    assert fig.mp_figure(broken, "x")["layout"]["shapes"] == []
    assert (
        fig.panel_from(
            fig.PanelSpec("e", "E", "esd", empty="none"), fig.esd_figure(broken, "x")
        ).empty
        == "none"
    )


def test_alerts_timeline_open_episode_runs_to_last_step() -> None:
    alerts = [
        {
            "rule": "nan",
            "layer": "fc",
            "severity": "critical",
            "status": "open",
            "step": 5,
            "resolved_step": None,
        },
        {
            "rule": "gap",
            "layer": "",
            "severity": "warning",
            "status": "resolved",
            "step": 2,
            "resolved_step": 4,
        },
    ]
    f = fig.alerts_timeline_figure(alerts, last_step=9)
    by_name = {t["name"]: t for t in f["data"]}
    assert by_name["critical"]["x"] == [5, 9, None]
    assert by_name["critical"]["y"] == ["nan fc", "nan fc", None]
    assert by_name["warning"]["x"] == [2, 4, None]
    # rows in natural order, top to bottom, each labelled (the page sizes the plot by them)
    many = [
        {"rule": "alpha", "layer": f"blocks.{i}", "severity": "warning", "step": 1}
        for i in (10, 2, 1)
    ]
    yaxis = fig.alerts_timeline_figure(many, last_step=3)["layout"]["yaxis"]
    assert yaxis["categoryarray"] == ["alpha blocks.10", "alpha blocks.2", "alpha blocks.1"]
    assert (yaxis["categoryorder"], yaxis["dtick"]) == ("array", 1)


# --- queries and routes on a real (temporary) SQLite database ---------------------------------


def test_alerts_timeline_carries_rule_and_layer_as_stored_for_its_csv() -> None:
    """The timeline's labels are HTML-escaped "rule layer" strings: its CSV (figureCsv) reads
    rule, layer and status as stored from each point's customdata, under ``meta.csv``."""
    alerts = [
        {
            "rule": "r&d",
            "layer": "<b>in&.weight",
            "severity": "warning",
            "status": "open",
            "step": 3,
        }
    ]
    trace = fig.alerts_timeline_figure(alerts, last_step=7)["data"][0]
    assert trace["y"][0] == "r&amp;d &lt;b&gt;in&amp;.weight"
    assert trace["customdata"] == [["r&d", "<b>in&.weight", "open"]] * 2 + [None]
    assert trace["meta"] == {"csv": ["severity", "rule", "layer", "status", "step"]}


@pytest.fixture
def db(tmp_path: Path) -> Any:
    engine, sessions = migrated(tmp_path)
    with sessions.begin() as s:
        run_id = new_run(s, "p", "r")
        frame = done_frame(s, run_id, 0, 0)
        rows = [
            MetricRow(f"l{i}", "htsr.alpha", step, i + step / 100)
            for i in range(4)
            for step in range(0, 97, 3)
        ]
        rows += [MetricRow("l9", "htsr.alpha", 200, 1.0)]  # a late layer
        rows += [MetricRow("lnan", "x.gappy", t, v) for t, v in ((0, 1.0), (1, math.nan), (2, 3.0))]
        rows += [MetricRow("lr", "l.regular", t, 1.0) for t in range(5, 3000, 3)]
        rows += [
            MetricRow("__model__", name, 1, 0.0)
            for name in ("sed.gap_ratio.w16", "grok.imminent", "a", "zz")
        ]
        # SED of a large model: the model every step, its layers every 16th (layer_stride)
        rows += [MetricRow("__model__", "sed.edge.w16", t, 1.0) for t in range(16, 500)]
        rows += [
            MetricRow(f"h{i}", "sed.edge.w16", t, 2.0) for i in range(3) for t in range(16, 500, 16)
        ]
        result_store.replace_results(s, run_id, frame.id, 0, "htsr", rows, [])
    yield sessions, run_id
    engine.dispose()


def test_metric_names_skip_scan_equals_distinct(db: Any) -> None:
    sessions, run_id = db
    with sessions() as s:
        assert reads.series_names(s, run_id) == [
            "a",
            "grok.imminent",
            "htsr.alpha",
            "l.regular",
            "sed.edge.w16",
            "sed.gap_ratio.w16",
            "x.gappy",
            "zz",
        ]
        assert reads.series_names(s, run_id + 1) == []
        assert sorted(metric_reads.metric_layers(s, run_id, "htsr.alpha")) == [
            "l0",
            "l1",
            "l2",
            "l3",
            "l9",
        ]
        assert reads.step_range(s, run_id, "htsr.alpha") == (0, 200)
        assert reads.step_range(s, run_id, "htsr.alpha", "l1") == (0, 96)


def test_heatmap_steps_come_from_the_layers_not_the_denser_model_row(db: Any) -> None:
    sessions, run_id = db
    with sessions() as s:
        steps, skipped = reads.sampled_steps(s, run_id, "sed.edge.w16", 10, skip_layer="__model__")
        # starts every 16 * ceil(481 / (10 * 16)) = 64 steps from 16, the layers' logging gap
        assert steps == list(range(16, 500, 64))
        assert skipped
        cells = reads.grid_cells(s, run_id, "sed.edge.w16", steps)
        assert {(layer, st) for layer, st, _ in cells if layer != "__model__"} == {
            (f"h{i}", st) for i in range(3) for st in steps
        }
        assert sorted(metric_reads.metric_layers(s, run_id, "sed.edge.w16")) == [
            "__model__",
            "h0",
            "h1",
            "h2",
        ]
        dense, _ = reads.sampled_steps(s, run_id, "sed.edge.w16", 10)  # with the model row
        assert [st % 16 for st in dense] != [0] * len(dense)
        only_model, _ = reads.sampled_steps(s, run_id, "grok.imminent", 10, skip_layer="__model__")
        assert only_model == [1]


def test_sampled_steps_pick_first_step_of_each_bucket(db: Any) -> None:
    sessions, run_id = db
    stored = sorted({*range(0, 97, 3), 200})
    with sessions() as s:
        steps, skipped = reads.sampled_steps(s, run_id, "htsr.alpha", 1000)
        assert steps == stored
        assert not skipped
        steps, skipped = reads.sampled_steps(s, run_id, "htsr.alpha", 4)
        # Starts every 3 * ceil(201 / (4 * 3)) = 51 steps (a multiple of the logging gap 3):
        # 0, 51, 102, 153; the first stored step at or after each: 0, 51, 200, 200. The
        # column left is spent on starts every 3 * ceil(201 / (5 * 3)) = 42 steps instead.
        assert steps == [0, 42, 84, 200]
        assert skipped
        regular, skipped = reads.sampled_steps(s, run_id, "l.regular", 10)
        assert regular == list(range(5, 3000, 300))  # logged every 3rd step: equal columns
        assert skipped
        rows = reads.grid_cells(s, run_id, "htsr.alpha", steps)
        assert sorted(rows) == sorted(
            [(f"l{i}", st, i + st / 100) for i in range(4) for st in (0, 42, 84)]
            + [("l9", 200, 1.0)]
        )


def test_sampled_steps_are_not_ruled_by_one_outlying_gap(tmp_path: Path) -> None:
    """The sample's spacing came from the gap between the first two stored steps: a step 0,
    then every 10 steps from 10,000 to 20,000, gave 3 heatmap columns (0, 10,000, 20,000) of
    300 asked for. Now the usual gap and the columns the empty stretch left: as many as
    without the step 0, equally spaced; likewise for a run resumed with a finer cadence."""
    engine, sessions = migrated(tmp_path)
    dense = list(range(10_000, 20_001, 10))
    series = {
        "lone": [0, *dense],
        "dense": dense,
        "resumed": [*range(0, 5000, 500), *range(5000, 20_001, 10)],
    }
    with sessions.begin() as s:
        run_id = new_run(s, "p", "r")
        frame = done_frame(s, run_id, 0, 0)
        rows = [
            MetricRow(f"l{i}", name, t, float(i))
            for name, steps in series.items()
            for t in steps
            for i in range(4)
        ]
        result_store.replace_results(s, run_id, frame.id, 0, "htsr", rows, [])
    with sessions() as s:
        without, skipped = reads.sampled_steps(s, run_id, "dense", 300)
        assert skipped
        assert len(without) == 251
        steps, skipped = reads.sampled_steps(s, run_id, "lone", 300)
        assert skipped
        assert steps == [0, *without]
        assert len({b - a for a, b in itertools.pairwise(steps[1:])}) == 1  # equal columns
        resumed, _ = reads.sampled_steps(s, run_id, "resumed", 300)
        assert 250 <= len(resumed) <= 300
        assert set(resumed) <= set(series["resumed"])
        every, skipped = reads.sampled_steps(s, run_id, "lone", 1002)
        assert (every, skipped) == (series["lone"], False)
    engine.dispose()


def test_routes_serve_pages_and_figures(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings

    settings = ServerSettings(data_dir=tmp_path, run_worker=False)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        run = client.post("/api/v1/runs", json={"project": "p", "name": "r"}).json()
        steps = list(range(120))
        client.post(
            "/api/v1/runs/{}/scalars".format(run["id"]),
            json=[{"step": s, "name": "loss", "value": 1 / (s + 1)} for s in steps],
        )
        for path in (
            "/",
            "/projects/p",
            f"/runs/{run['id']}",
            f"/runs/{run['id']}/layers",
            f"/runs/{run['id']}/layers/a.b",
            f"/runs/{run['id']}/activations",
            f"/runs/{run['id']}/alerts",
            f"/compare?runs={run['id']}",
            "/projects/p/alert-rules",
        ):
            page = client.get(path)
            assert page.status_code == 200, path
            assert "text/html" in page.headers["content-type"]
            # every page loads the shared helpers before its own script
            scripts = re.findall(r'<script src="([^"]+)"', page.text)
            assert scripts[0].startswith("/dashboards/static/common.js?v="), (path, scripts)
            assert len(scripts) > 1, (path, scripts)
        assert "/dashboards/static/plotly.min.js?v=" in client.get(f"/runs/{run['id']}").text
        assert client.get("/dashboards/static/common.js").status_code == 200
        assert client.get("/dashboards/static/plotly.min.js").status_code == 200
        assert client.get("/runs/999").status_code == 404
        assert client.get("/projects/nope").status_code == 404
        overview = client.get(
            f"/api/v1/dashboards/runs/{run['id']}/overview", params={"max_points": 60}
        ).json()
        loss = next(p for p in overview["panels"] if p["id"] == "loss")
        assert loss["figure"]["data"][0]["name"] == "loss"
        assert len(loss["figure"]["data"][0]["x"]) == 60  # LTTB-downsampled to the plot width
        assert loss["figure"]["data"][0]["x"][0] == 0
        assert loss["figure"]["data"][0]["x"][-1] == 119
        sed = next(p for p in overview["panels"] if p["id"] == "sed_gap")
        assert sed["figure"] is None
        assert "update sketches" in sed["empty"]
        layers = client.get(f"/api/v1/dashboards/runs/{run['id']}/layers").json()
        assert layers["panels"][0]["figure"] is None
        compare = client.get(
            "/api/v1/dashboards/compare", params={"runs": f"{run['id']},{run['id']}"}
        ).json()
        assert compare["controls"]["names"]["value"] == ["loss"]
        assert client.get("/api/v1/dashboards/compare", params={"runs": "1;2"}).status_code == 422
        assert client.get("/api/v1/dashboards/runs/999/overview").status_code == 404
        assert math.isfinite(overview["run"]["id"])


def test_bucketed_series_keep_each_bucket_min_and_max(db: Any) -> None:
    sessions, run_id = db
    with sessions() as s:
        got = reads.bucketed_series(s, run_id, ["htsr.alpha"], 4, layer="l1")
        assert list(got) == [("htsr.alpha", "l1")]
        steps = list(range(0, 97, 3))
        buckets: dict[int, list[int]] = {}
        for t in steps:  # 4 buckets over the layer's step range 0..96 (span 97)
            buckets.setdefault(t * 4 // 97, []).append(t)
        want_x = [x for b in sorted(buckets) for x in (buckets[b][0], buckets[b][-1])]
        want_y = [1 + x / 100 for x in want_x]  # rising series: min first, then max
        assert got["htsr.alpha", "l1"][0] == want_x
        assert got["htsr.alpha", "l1"][1] == pytest.approx(want_y)
        exact = reads.bucketed_series(s, run_id, ["htsr.alpha"], 500, layer="l1")
        assert exact["htsr.alpha", "l1"][0] == steps
        assert reads.bucketed_series(s, run_id, ["x.gappy"], 50) == {
            ("x.gappy", "lnan"): ([0, 1, 2], [1.0, None, 3.0])
        }
        # Several names, every layer: one query, one series per (name, layer).
        both = reads.bucketed_series(s, run_id, ["htsr.alpha", "x.gappy"], 500)
        assert sorted(both) == sorted(
            [("htsr.alpha", f"l{i}") for i in (0, 1, 2, 3, 9)] + [("x.gappy", "lnan")]
        )
        assert both["htsr.alpha", "l9"] == ([200], [1.0])
        assert reads.bucketed_series(s, run_id, ["nope"], 10) == {}
        assert reads.first_step_at_least(s, run_id, "htsr.alpha", 2.5, layer="l2") == 51
        assert reads.first_step_at_least(s, run_id, "htsr.alpha", 99.0) is None


def test_bucketed_series_match_a_numpy_reference(tmp_path: Path) -> None:
    """Min/max per bucket against numpy over the same random series (with NaN gaps), for a
    scalar, a metric of every layer and one layer's: each point is a stored (step, value) pair,
    in step order (a bucket's min and max were stamped on its first and last steps)."""
    gen = np.random.default_rng(7)
    steps = np.sort(gen.choice(5000, size=1200, replace=False)) + 100
    values = np.cumsum(gen.normal(size=steps.size))
    values[gen.choice(steps.size, size=25, replace=False)] = np.nan
    engine, sessions = migrated(tmp_path)
    with sessions.begin() as s:
        run_id = new_run(s, "p", "r")
        frame = done_frame(s, run_id, 0, 0)
        rows = [MetricRow("fc", "m", int(t), float(v)) for t, v in zip(steps, values, strict=True)]
        result_store.replace_results(s, run_id, frame.id, 0, "x", rows, [])
        result_store.upsert_scalars(
            s, run_id, [(int(t), "loss", float(v)) for t, v in zip(steps, values, strict=True)]
        )
    n = 37
    k = (steps - steps[0]) * n // (steps[-1] - steps[0] + 1)
    stored = dict(zip(steps.tolist(), values.tolist(), strict=True))
    with sessions() as s:
        for model, key, layer in (
            (Metric, ("m", "fc"), None),
            (Metric, ("m", "fc"), "fc"),
            (Scalar, ("loss", ""), None),
        ):
            got_x, got_y = reads.bucketed_series(s, run_id, [key[0]], n, model=model, layer=layer)[
                key
            ]
            assert len(got_x) <= 3 * n
            assert got_x == sorted(set(got_x))
            for x, y in zip(got_x, got_y, strict=True):
                assert math.isnan(stored[x]) if y is None else y == stored[x], x
            for b in range(n):
                inside = k == b
                finite = inside & np.isfinite(values)
                ys = {y for x, y in zip(got_x, got_y, strict=True) if k[steps == x][0] == b}
                want = {values[finite].min(), values[finite].max()} if finite.any() else set()
                assert ys - {None} == want, b
                assert (None in ys) == bool((inside & ~np.isfinite(values)).any()), b
    engine.dispose()


def test_buckets_of_steps_near_max_step_are_exact() -> None:
    """``(step - lo) * n // span`` overflowed int64 for steps near MAX_STEP (2**62): bucket
    indices went negative and out of order. Each bucket's min and max against Python's exact
    integers."""
    wide = 2**62 // 3000
    steps = [0, *range(2**62 - 2000, 2**62 + 1, 7), *range(wide, 2**62 - 2000, wide)]
    steps.sort()
    values = [float((t // 7) % 11) for t in steps]
    lo, span, n = 0, 2**62 + 1, 500
    buckets: dict[int, list[tuple[int, float]]] = {}
    for t, v in zip(steps, values, strict=True):
        buckets.setdefault((t - lo) * n // span, []).append((t, v))
    want = set()
    for points in buckets.values():
        ys = [v for _, v in points]
        want |= {next(p for p in points if p[1] == y) for y in (min(ys), max(ys))}
    got_x, got_y = reads._bucket_points(steps, values, lo, span, n)
    assert list(zip(got_x, got_y, strict=True)) == sorted(want)
    # buckets 0 and 4 side by side: (4 * span / n) * n wrapped once to bucket 0, one bucket
    wrap = 2**64 // n + 1
    got = reads._bucket_points([0, 5, wrap, wrap + 9], [1.0, 2.0, 3.0, 4.0], lo, span, n)
    assert got == ([0, 5, wrap, wrap + 9], [1.0, 2.0, 3.0, 4.0])
    k = reads.bucket_index(np.array(steps, dtype=np.int64), lo, span, n)
    assert k.tolist() == [(t - lo) * n // span for t in steps]
    assert reads.bucket_index(np.arange(1000, dtype=np.int64), 0, 1000, 37).tolist() == [
        t * 37 // 1000 for t in range(1000)
    ]


@contextlib.contextmanager
def statements(conn: Any) -> Iterator[list[tuple[str, Any]]]:
    """The SQL statements (and their parameters) ``conn``'s engine runs inside the block."""
    seen: list[tuple[str, Any]] = []

    def record(*args: Any) -> None:
        seen.append((args[2], args[3]))

    event.listen(conn.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(conn.engine, "before_cursor_execute", record)


def test_series_reads_touch_no_table_row(db: Any) -> None:
    """Every SQL statement of a metric series read (the dashboards' min/max buckets, one layer
    or all; ``GET /runs/{id}/metrics``) is an index-only search on SQLite: a frame stores all
    layers at one step, so a read that fetched each point's value from the table touched one
    table page per point (150 layers x 5,000 steps: 2.3 s a metric; 0.8 s index-only)."""
    sessions, run_id = db
    with sessions() as s:
        conn = s.connection()
        with statements(conn) as seen:
            reads.bucketed_series(s, run_id, ["htsr.alpha", "x.gappy"], 4)
            reads.bucketed_series(s, run_id, ["htsr.alpha"], 4, layer="l1")
            metric_reads.metric_points(s, run_id, "htsr.alpha", None, None, None)
            metric_reads.metric_points(s, run_id, "htsr.alpha", "l1", 3, 50)
            cells_from = len(seen)
            assert len(reads.grid_cells(s, run_id, "htsr.alpha", [0, 3, 96])) == 3 * 4
            assert reads.grid_cells(s, run_id, "htsr.alpha", []) == []

        def plan(query: str, params: Any) -> list[str]:
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + query, params)
            return [str(r[-1]) for r in rows if "metric" in str(r[-1])]

        reads_of_metric = [(q, p) for q, p in seen[:cells_from] if "FROM metric" in q]
        assert len(reads_of_metric) >= 4
        for query, params in reads_of_metric:
            searches = plan(query, params)
            assert searches, query
            assert all("COVERING INDEX" in line for line in searches), (query, searches)
        # the heatmap's cells: a seek per step, not a scan of the metric's every row
        query, params = seen[cells_from]
        assert plan(query, params) == [
            "SEARCH metric USING INDEX ix_metric_run_name_step (run_id=? AND name=? AND step=?)"
        ]


def test_metrics_at_reads_by_name_not_every_row(db: Any) -> None:
    """``metrics_at`` (the early-warning evidence under the overview, the alert engine) finds
    its names among the run's names and seeks each: ``name LIKE 'prefix%'`` used no index and
    read every metric row of the run (0.4 s at 4.5M rows). The prefix is literal."""
    sessions, run_id = db
    with sessions() as s:
        conn = s.connection()
        with statements(conn) as seen:
            assert series.metrics_at(s, run_id, "__model__", "sed.", 1) == {
                "sed.gap_ratio.w16": 0.0
            }
            assert series.metrics_at(s, run_id, "lnan", "x.", 0) == {"x.gappy": 1.0}
            assert series.metrics_at(s, run_id, "lnan", "x.", 1) == {}  # NaN is no value
            assert series.metrics_at(s, run_id, "lnan", "x_", 0) == {}  # not a LIKE pattern
            assert series.metrics_at(s, run_id, "l1", "nope.", 3) == {}
        assert seen
        for query, params in seen:
            assert " LIKE " not in query.upper(), query
            if "metric.value" not in query:
                continue  # the names' skip-scan: a min() seek per name
            plan = [str(r[-1]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + query, params)]
            assert not [line for line in plan if line.endswith("(run_id=?)")], (query, plan)


def test_layer_values_at_seeks_each_name_not_every_row(db: Any) -> None:
    """What the worker summarises after each weight frame: filtered on step and analysis only,
    the read walked every metric row of the run (0.42 s at 4.5 M rows, once per frame)."""
    sessions, run_id = db
    with sessions() as s:
        conn = s.connection()
        with statements(conn) as seen:
            got = result_store.layer_values_at(s, run_id, 3, "htsr", "__model__")
            assert result_store.layer_values_at(s, run_id, 3, "conditioning", "__model__") == {}
        assert got == {f"l{i}": {"htsr.alpha": i + 0.03} for i in range(4)}
        queries = [(q, p) for q, p in seen if "metric.value" in q]
        assert len(queries) == 2
        for query, params in queries:
            plan = [str(r[-1]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + query, params)]
            assert any("(run_id=? AND name=? AND step=?)" in line for line in plan), plan
            assert not [line for line in plan if line.startswith("SCAN metric")], plan


def test_rounded_keeps_six_significant_digits() -> None:
    got = fig.rounded([0.123456789, 123456.789, None, math.nan, 0.0, -2.5e-7, 1e300])
    assert got == [0.123457, 123457.0, None, None, 0.0, -2.5e-07, 1e300]


def test_repeated_alert_rules_are_labelled_once_where_their_labels_would_overlap() -> None:
    """Only a rule's first alert was labelled; now each is, above the plot area, and a rule's
    alerts whose labels would overlap share one label that counts them."""
    alerts = [{"step": s, "rule": "gap_collapse", "severity": "warning"} for s in (3, 5, 90)]
    markers = fig.overview_markers(None, None, "", alerts)
    assert [m.step for m in markers] == [3, 5, 90]
    f = fig.line_figure("t", [fig.Line("loss", [0, 100], [1.0, 0.5])], markers=markers)
    assert len([s for s in f["layout"]["shapes"] if s["type"] == "line"]) == 3
    labels = f["layout"]["annotations"]
    assert [a["text"] for a in labels] == ["\u26a0 gap_collapse \u00d72", "\u26a0 gap_collapse"]
    assert {(a["y"], a["yanchor"], a["yref"]) for a in labels} == {(1, "bottom", "paper")}


def test_marker_texts_escape_user_names() -> None:
    """Alert rule/layer/message, a scalar's name and non-finite layer names reach plotly's
    label and hover text, which render ``<a href>``: they are shown as written, not as markup."""
    evil = '<a href="https://example.com">x</a>'
    alerts = [{"step": 4, "rule": evil, "layer": evil, "message": evil, "severity": "warning"}]
    markers = fig.overview_markers(7, 9, evil, alerts, warning_hover=evil)
    bad = fig.nonfinite_marker({evil: (5, "weights")})
    assert bad is not None
    f = fig.line_figure("t", [fig.Line("loss", [0, 10], [1.0, 0.5])], markers=[*markers, bad])
    texts = [a[k] for a in f["layout"]["annotations"] for k in ("text", "hovertext")]
    assert len(texts) == 8
    assert not [t for t in texts if "<a" in t], texts
    assert sum("&lt;a href=" in t for t in texts) == 6  # 2 labels hold no name


def test_runs_page_filters_and_sorts(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings

    with TestClient(
        create_app(ServerSettings(data_dir=tmp_path, run_worker=False)), base_url="http://127.0.0.1"
    ) as client:
        for project, name in (("a", "alpha"), ("a", "beta"), ("b", "gamma")):
            client.post("/api/v1/runs", json={"project": project, "name": name})

        def names(**params: str) -> list[str]:
            html = client.get("/", params={"fragment": "true", **params}).text
            return re.findall(r'<a href="/runs/\d+">([^<]+)</a>', html)

        assert names() == ["gamma", "beta", "alpha"]  # newest first
        assert names(desc="false") == ["alpha", "beta", "gamma"]
        assert names(project="a", sort="name") == ["beta", "alpha"]
        assert names(q="MM") == ["gamma"]
        assert names(status="finished") == []
        assert client.get("/projects/a", params={"fragment": "true"}).text.count("<tr ") == 2


def test_runs_page_search_matches_tags_as_well_as_names(tmp_path: Path) -> None:
    """The runs list's search matched names only: a run tagged ``baseline`` was not found by
    it. It matches a tag too now (case-insensitive, a wildcard a character), in SQL."""
    from fastapi.testclient import TestClient

    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings

    with TestClient(
        create_app(ServerSettings(data_dir=tmp_path, run_worker=False)), base_url="http://127.0.0.1"
    ) as client:
        for name, tags in (("lr1e-3", ["Baseline", "mlp"]), ("lr1e-1", ["50%"]), ("base", [])):
            client.post("/api/v1/runs", json={"project": "p", "name": name, "tags": tags})

        def names(q: str) -> list[str]:
            html = client.get("/", params={"fragment": "true", "q": q}).text
            return re.findall(r'<a href="/runs/\d+">([^<]+)</a>', html)

        assert names("baseline") == ["lr1e-3"]
        assert names("BASE") == ["base", "lr1e-3"]  # a name or a tag
        assert names("0%") == ["lr1e-1"]
        assert names("%") == ["lr1e-1"]  # a wildcard is a character
        assert names("1e") == ["lr1e-1", "lr1e-3"]
        assert names("gpt") == []
        empty = client.get("/", params={"fragment": "true", "q": "gpt"}).text
        assert "name or tag contains “gpt”" in empty


def test_runs_page_filters_and_sorts_every_run_and_says_when_cut(tmp_path: Path) -> None:
    """The runs list read the newest 1,000 runs, then filtered and sorted those: an older run
    was never listed, not by its name nor by its status, and nothing said the list was cut.
    Filtered and sorted in SQL now, the page saying how many runs match past the first 1,000.
    """
    from fastapi.testclient import TestClient

    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings
    from spectrawatch_server.db.models import Alert

    engine, sessions = migrated(tmp_path)
    with sessions.begin() as s:
        needle = new_run(s, "p", "needle-Old", status="crashed")
        repo.get_run(s, needle).last_step = 10**6  # type: ignore[union-attr]
        runs = [new_run(s, "p", f"r{i:04d}") for i in range(1000)]
        s.add_all([Alert(run_id=needle, rule="x", step=1), Alert(run_id=runs[5], rule="x", step=1)])
        s.add(Alert(run_id=runs[5], rule="y", step=1))
        s.add(Alert(run_id=runs[6], rule="x", step=1, status="resolved"))
        # acknowledged: not counted in the column, so not in the sort either
        s.add_all(
            [
                Alert(run_id=runs[7], rule=r, step=1, acknowledged_at=datetime.now(UTC))
                for r in "xyz"
            ]
        )
    engine.dispose()
    with TestClient(
        create_app(ServerSettings(data_dir=tmp_path, run_worker=False)), base_url="http://127.0.0.1"
    ) as client:

        def names(**params: str) -> tuple[list[str], str]:
            html = client.get("/projects/p", params={"fragment": "true", **params}).text
            return re.findall(r'<a href="/runs/\d+">([^<]+)</a>', html), html

        assert names(q="OLD")[0] == ["needle-Old"]
        assert names(q="%")[0] == []  # a wildcard is a character
        assert names(status="crashed")[0] == ["needle-Old"]
        shown, html = names()
        assert len(shown) == 1000
        assert shown[0] == "r0999"
        assert "needle-Old" not in shown
        assert "Showing the first 1,000 of 1,001 matching runs" in html
        assert names(sort="step")[0][0] == "needle-Old"  # over every run, not the shown ones
        assert names(sort="alerts")[0][:2] == ["r0005", "needle-Old"]
        # ascending: 999 runs without open alerts (ties newest first), then the needle; the
        # run with 2 is the 1,001st
        assert names(sort="alerts", desc="false")[0][-2:] == ["r0000", "needle-Old"]
        assert names(sort="name", desc="false")[0][0] == "needle-Old"
        shown, html = names(q="r0")
        assert len(shown) == 1000
        assert "Showing" not in html


def test_user_names_cannot_add_markup_to_plots() -> None:
    """plotly.js renders ``<a href>``, ``<b>``, ``<br>`` in labels: names are shown escaped,
    the names as stored travel in ``meta`` (click-through, CSV), and a metric name is data in
    the hover template, never template syntax. From a dashboard audit (session 6)."""
    link = '<a href="https://evil.example">x</a>'
    line = fig.line_figure(f"loss · {link}", [fig.Line(f"<b>{link}</b>", [1, 2], [0.5, 0.4])])
    trace = line["data"][0]
    assert "<" not in trace["name"]
    assert trace["meta"] == f"<b>{link}</b>"
    assert "<a" not in line["layout"]["title"]["text"]
    grid = fig.Grid(steps=[1, 2], layers=[link, "ok"], z=[[1.0, 2.0], [3.0, 4.0]])
    heat = fig.heatmap_figure("%{z}<b>m", grid)["data"][0]
    assert heat["y"] == ['&lt;a href="https://evil.example"&gt;x&lt;/a&gt;', "ok"]
    assert heat["meta"] == [link, "ok"]
    assert "%{z}<b>m" not in heat["hovertemplate"]
    assert heat["name"] == "%{z}&lt;b&gt;m"
    assert fig.plot_text("x" * 200).endswith("…")


def test_drilldown_of_a_layer_htsr_skips_says_why(tmp_path: Path) -> None:
    """A 50k-token embedding is outside WeightWatcher's size filter: its drilldown said "No ESD
    for this layer yet", as if the analysis had not run."""
    from fastapi.testclient import TestClient

    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings
    from spectrawatch_server.db.models import Frame
    from spectrawatch_server.storage import repository as repo

    with TestClient(
        create_app(ServerSettings(data_dir=tmp_path, run_worker=False)), base_url="http://127.0.0.1"
    ) as client:
        run = client.post("/api/v1/runs", json={"project": "p", "name": "r"}).json()
        with client.app.state.spectrawatch.sessions.begin() as session:  # type: ignore[attr-defined]
            frame = Frame(
                run_id=run["id"], kind="weights", step=5, seq=0, idempotency_key="k",
                blob_key="", bytes=1, layers=["wte.weight"], status="done",
            )  # fmt: skip
            repo.insert_frame(session, frame)
            skipped = {"analysis": "htsr", "shape": [50257, 768], "skipped": "outside the filter"}
            row = result_store.SpectrumRow("wte.weight", skipped)
            result_store.replace_results(session, run["id"], frame.id, 5, "htsr", [], [row])
        url = f"/api/v1/dashboards/runs/{run['id']}/layer"
        page = client.get(url, params={"layer": "wte.weight"}).json()
        # the page of /runs/1/layers/ (no layer) said "query.layer: String should have..."
        missing = client.get(url, params={"layer": ""})
    esd = next(p for p in page["panels"] if p["id"] == "esd")
    assert esd["figure"] is None
    assert esd["empty"] == "Layer skipped: outside the filter"
    alpha = next(p for p in page["panels"] if p["id"] == "alpha")  # said "No alpha series yet"
    assert (alpha["figure"], alpha["empty"]) == (None, "Layer skipped: outside the filter")
    assert missing.status_code == 422
    assert missing.json()["error"]["code"] == "layer_missing"
    assert missing.json()["error"]["message"].startswith("layer: none given; pick a layer on")


def test_layer_drilldown_loads_the_shown_spectrum_only(tmp_path: Path) -> None:
    """The drill-down listed a layer's steps by loading every spectrum of it (histograms and
    fits, ~10 KB each: tens of MB a page on a long run); now their keys and the one shown. A
    step before the first ESD shows the first one (it showed the last)."""
    import torch
    from fastapi.testclient import TestClient
    from sqlalchemy import event

    from spectrawatch.spectral.htsr import analyze_weights, esd_payload
    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings
    from spectrawatch_server.db.models import Frame, Spectrum
    from spectrawatch_server.storage import repository as repo

    (layer,) = analyze_weights({"a.weight": torch.randn(64, 32)}).layers
    payload = {"analysis": "htsr", "plain": esd_payload(layer.evals, layer.plain)}
    steps = list(range(10, 300, 10))
    with TestClient(
        create_app(ServerSettings(data_dir=tmp_path, run_worker=False)), base_url="http://127.0.0.1"
    ) as client:
        run = client.post("/api/v1/runs", json={"project": "p", "name": "r"}).json()
        with client.app.state.spectrawatch.sessions.begin() as session:  # type: ignore[attr-defined]
            for step in steps:
                frame = Frame(
                    run_id=run["id"], kind="weights", step=step, seq=step,
                    idempotency_key=f"k{step}", blob_key="", bytes=1,
                    layers=["a.weight", "b.weight"], status="done",
                )  # fmt: skip
                repo.insert_frame(session, frame)
                rows = [
                    result_store.SpectrumRow(name, payload) for name in ("a.weight", "b.weight")
                ]
                result_store.replace_results(session, run["id"], frame.id, step, "htsr", [], rows)
        loaded: list[tuple[str, int]] = []

        def on_load(target: Spectrum, _context: Any) -> None:
            loaded.append((target.layer, target.step))

        event.listen(Spectrum, "load", on_load)
        try:
            url = f"/api/v1/dashboards/runs/{run['id']}/layer"
            page = client.get(url, params={"layer": "a.weight", "step": 125}).json()
            latest = client.get(url, params={"layer": "a.weight"}).json()
            early = client.get(url, params={"layer": "a.weight", "step": 3}).json()
        finally:
            event.remove(Spectrum, "load", on_load)
    assert loaded == [("a.weight", 120), ("a.weight", 290), ("a.weight", 10)]
    assert early["controls"]["step"]["value"] == "10"
    assert page["controls"]["step"] == {
        "label": "ESD at step",
        "options": [str(s) for s in steps],
        "labels": [str(s) for s in steps],  # none non-finite
        "value": "120",
    }
    assert latest["controls"]["step"]["value"] == "290"
    esd = next(p for p in page["panels"] if p["id"] == "esd")
    assert esd["figure"] is not None
    assert esd["figure"]["layout"]["title"]["text"].endswith("@ step 120")


def test_runs_list_says_when_filters_hide_every_run(tmp_path: Path) -> None:
    """A filter that matches nothing says so (it said "No runs yet. Start one with ...")."""
    from fastapi.testclient import TestClient

    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings

    settings = ServerSettings(data_dir=tmp_path, run_worker=False)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        assert "No runs yet" in client.get("/").text
        client.post("/api/v1/runs", json={"project": "p", "name": "r"})
        for path in ("/?q=zzz", "/projects/p?status=crashed", "/?q=zzz&fragment=true"):
            page = client.get(path).text
            assert "No runs match these filters" in page, path
            assert "No runs yet" not in page, path
        assert "No runs match" not in client.get("/projects/p").text


def test_runs_list_status_filter_offers_the_run_statuses(tmp_path: Path) -> None:
    """The status filter offers exactly the statuses a run can have (it offered ``failed``,
    which no run has: picking it always showed nothing)."""
    import re
    import typing

    from fastapi.testclient import TestClient

    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings
    from spectrawatch_server.schemas import RunStatus

    with TestClient(
        create_app(ServerSettings(data_dir=tmp_path, run_worker=False)), base_url="http://127.0.0.1"
    ) as client:
        select = client.get("/").text.split('name="status"')[1].split("</select>")[0]
    assert re.findall(r'<option value="([^"]*)"', select) == ["", *typing.get_args(RunStatus)]


def test_compare_picks_names_repeated_or_comma_separated() -> None:
    """A name holding a comma (``a,b``) can be picked: repeated ``names`` parameters, each a
    name, or a comma-separated list (``names=loss,acc``) where a value is no name."""
    available = ["a", "a,b", "acc", "b", "loss"]
    assert routes.picked_names(["a,b"], available) == ["a,b"]
    assert routes.picked_names(["loss", "a,b", "loss"], available) == ["loss", "a,b"]
    assert routes.picked_names(["loss,acc,nope"], available) == ["loss", "acc"]
    assert routes.picked_names(["", "x"], available) == []


def test_compare_draws_a_name_with_a_comma(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings

    settings = ServerSettings(data_dir=tmp_path, run_worker=False)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        rid = client.post("/api/v1/runs", json={"project": "p", "name": "r"}).json()["id"]
        rows = [
            {"step": s, "name": n, "value": 1.0 + s} for s in range(10) for n in ("loss", "a,b")
        ]
        client.post(f"/api/v1/runs/{rid}/scalars", json=rows).raise_for_status()
        for names in (["a,b"], ["a,b", "loss"], ["loss,a,b"]):
            body = client.get("/api/v1/dashboards/compare", params={"runs": rid, "names": names})
            value = body.json()["controls"]["names"]["value"]
            panels = [p["id"] for p in body.json()["panels"]]
            assert panels == ["compare-" + n for n in value], names
            if names != ["loss,a,b"]:  # no name "loss,a,b": the comma form, "loss" only
                assert value == names
            else:
                assert value == ["loss"]


def test_compare_names_the_runs_past_its_cap(tmp_path: Path) -> None:
    """A 9th run was dropped without a word: the answer names the runs left out."""
    from fastapi.testclient import TestClient

    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings

    settings = ServerSettings(data_dir=tmp_path, run_worker=False)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        ids = [
            client.post("/api/v1/runs", json={"project": "p", "name": f"r{i}"}).json()["id"]
            for i in range(routes.MAX_COMPARE_RUNS + 2)
        ]
        asked = ",".join(map(str, ids))
        body = client.get("/api/v1/dashboards/compare", params={"runs": asked}).json()
        assert [r["id"] for r in body["runs"]] == ids[: routes.MAX_COMPARE_RUNS]
        assert body["left_out"] == ids[routes.MAX_COMPARE_RUNS :]
        assert body["notice"].startswith(f"2 runs left out (#{ids[-2]}, #{ids[-1]})")
        few = client.get("/api/v1/dashboards/compare", params={"runs": ids[0]}).json()
        assert (few["left_out"], few["notice"]) == ([], "")


def test_compare_heading_names_the_page_once(tmp_path: Path) -> None:
    """The compare page's heading is "Compare runs" (it read "Compare runs compare runs":
    the run pages' run-name slot filled with the page's title), and so is its tab's title (it
    read "Compare runs · compare runs · spectrawatch")."""
    from fastapi.testclient import TestClient

    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings

    with TestClient(
        create_app(ServerSettings(data_dir=tmp_path, run_worker=False)), base_url="http://127.0.0.1"
    ) as client:
        page = client.get("/compare?runs=1,2").text
    heading = page.split("<h1>")[1].split("</h1>")[0]
    assert heading == '<span id="page-title">Compare runs</span> ', heading
    assert page.split("<title>")[1].split("</title>")[0] == "Compare runs · spectrawatch"


def test_nan_weights_are_said_on_heatmap_drilldown_and_overview(tmp_path: Path) -> None:
    """A run whose weights went NaN at step 61 of 120: its heatmap and drill-down stopped at
    step 60 without saying why (HT-SR skips non-finite layers); now a note, a marker at the
    first non-finite step, and the overview's summary say it."""
    from fastapi.testclient import TestClient

    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings
    from spectrawatch_server.db.models import Frame

    layers = ["fc1.weight", "fc2.weight"]
    with TestClient(
        create_app(ServerSettings(data_dir=tmp_path, run_worker=False)), base_url="http://127.0.0.1"
    ) as client:
        run = client.post("/api/v1/runs", json={"project": "p", "name": "nan"}).json()
        with client.app.state.spectrawatch.sessions.begin() as session:  # type: ignore[attr-defined]
            for step in range(0, 121, 10):
                bad = step > 60
                frame = Frame(
                    run_id=run["id"], kind="weights", step=step, seq=step,
                    idempotency_key=f"k{step}", blob_key="", bytes=1, layers=layers,
                    nonfinite=dict.fromkeys(layers, 4) if bad else {}, status="done",
                )  # fmt: skip
                repo.insert_frame(session, frame)
                if not bad:
                    rows = [MetricRow(la, "htsr.alpha", step, 3.0) for la in layers]
                    result_store.replace_results(
                        session, run["id"], frame.id, step, "htsr", rows, []
                    )
            # a finite run beside it says nothing
            other = new_run(session, "p", "fine")
            frame = done_frame(session, other, 0, 0, layers=layers)
            rows = [MetricRow(la, "htsr.alpha", 0, 3.0) for la in layers]
            result_store.replace_results(session, other, frame.id, 0, "htsr", rows, [])
        api = f"/api/v1/dashboards/runs/{run['id']}"
        heat = client.get(f"{api}/layers").json()["panels"][0]
        drill = client.get(f"{api}/layer", params={"layer": "fc1.weight"}).json()
        overview = client.get(f"{api}/overview").json()
        fine = client.get(f"/api/v1/dashboards/runs/{other}/layers").json()["panels"][0]
    assert heat["figure"]["data"][0]["x"][-1] == 60
    assert "weights non-finite (NaN/Inf) from step 70 in fc1.weight, fc2.weight" in heat["note"]
    assert "HT-SR" in heat["note"]
    (shape,) = heat["figure"]["layout"]["shapes"]
    assert shape["x0"] == 70
    assert heat["figure"]["layout"]["annotations"][0]["text"] == "non-finite from step 70"
    assert "from step 70 in fc1.weight:" in drill["nonfinite_note"]
    assert drill["note"] == drill["nonfinite_note"]  # said once, above the panels
    assert all("note" not in panel for panel in drill["panels"])
    alpha = next(p for p in drill["panels"] if p["figure"] and p["id"] != "esd")
    assert any(s["x0"] == 70 for s in alpha["figure"]["layout"]["shapes"])
    assert overview["summary"]["nonfinite_step"] == 70
    assert "from step 70" in overview["summary"]["nonfinite_note"]
    assert fine["note"] == ""
    assert fine["figure"]["layout"]["shapes"] == []


def test_drilldown_of_a_layer_gone_nan_opens_at_its_last_finite_esd(tmp_path: Path) -> None:
    """A layer NaN from step 70 has ESDs that say "Layer skipped: empty or non-finite ESD"
    from there: its drill-down opened at the last one, every spectrum chart empty. It opens at
    step 60 now and says so; the later steps stay in the menu, labelled non-finite."""
    from fastapi.testclient import TestClient

    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings
    from spectrawatch_server.db.models import Frame

    skipped = {"analysis": "htsr", "shape": [96, 64], "skipped": "empty or non-finite ESD"}
    weights = {"w": torch.randn(96, 64, generator=torch.Generator().manual_seed(0))}
    plain = {"analysis": "htsr", "plain": esd_payload(*_first_layer(weights))}
    with TestClient(
        create_app(ServerSettings(data_dir=tmp_path, run_worker=False)), base_url="http://127.0.0.1"
    ) as client:
        run = client.post("/api/v1/runs", json={"project": "p", "name": "nan"}).json()
        with client.app.state.spectrawatch.sessions.begin() as session:  # type: ignore[attr-defined]
            for step in range(0, 101, 10):
                bad = step >= 70
                frame = Frame(
                    run_id=run["id"], kind="weights", step=step, seq=step,
                    idempotency_key=f"k{step}", blob_key="", bytes=1, layers=["w"],
                    nonfinite={"w": 4} if bad else {}, status="done",
                )  # fmt: skip
                repo.insert_frame(session, frame)
                row = result_store.SpectrumRow("w", skipped if bad else plain)
                result_store.replace_results(session, run["id"], frame.id, step, "htsr", [], [row])
        url = f"/api/v1/dashboards/runs/{run['id']}/layer"
        page = client.get(url, params={"layer": "w"}).json()
        picked = client.get(url, params={"layer": "w", "step": 100}).json()
    control = page["controls"]["step"]
    assert control["value"] == "60"
    assert control["options"][-1] == "100"
    assert control["labels"][-1] == "100 (non-finite)"
    assert control["labels"][6] == "60"
    assert "Showing step 60, the last snapshot before this layer went non-finite" in page["note"]
    esd = next(p for p in page["panels"] if p["id"] == "esd")
    assert esd["figure"] is not None
    assert picked["controls"]["step"]["value"] == "100"  # still there when asked for
    assert "Showing step" not in picked["note"]


def _first_layer(weights: dict[str, Any]) -> tuple[Any, Any]:
    layer = analyze_weights(weights).layers[0]
    return layer.evals, layer.plain


def test_activations_say_their_caption_and_nan_note_once(tmp_path: Path) -> None:
    """The activations page repeated its caption and NaN/Inf note on each of its figures (19
    times, 8,000 px): the page says each once, the figures their own help only."""
    from fastapi.testclient import TestClient

    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings

    with TestClient(
        create_app(ServerSettings(data_dir=tmp_path, run_worker=False)), base_url="http://127.0.0.1"
    ) as client:
        run = client.post("/api/v1/runs", json={"project": "p", "name": "nan"}).json()
        with client.app.state.spectrawatch.sessions.begin() as session:  # type: ignore[attr-defined]
            for step in range(0, 50, 10):
                frame = done_frame(session, run["id"], step, step, kind="activations",
                                   layers=["m0", "m1"])  # fmt: skip
                frame.nonfinite = {"m1": 8} if step >= 30 else {}
                rows = [
                    MetricRow(m, name, step, 1.0 + step)
                    for m in ("m0", "m1")
                    for name in ("eigentrack.entropy", "eigentrack.mp_ks", "eigentrack.outliers")
                    if not (m == "m1" and step >= 30)
                ]
                result_store.replace_results(
                    session, run["id"], frame.id, step, "activations", rows, []
                )
        page = client.get(f"/api/v1/dashboards/runs/{run['id']}/activations").json()
    assert len(page["panels"]) == 3
    assert "activations non-finite (NaN/Inf) from step 30 in m1" in page["note"]
    assert page["help"].startswith("One plot per descriptor")
    for panel in page["panels"]:
        assert "note" not in panel
        assert panel["help"] == ""


def test_pages_name_the_model_level_and_table_columns_in_words(tmp_path: Path) -> None:
    """``__model__`` (an internal key) showed in the SED layer menu, chart titles, the alert
    timeline and table; table headers were field names (``resolved_step``); activations
    charts titled by raw keys had no "what this is" help. URLs and the API keep the keys."""
    from fastapi.testclient import TestClient

    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings
    from spectrawatch_server.db.models import Alert

    with TestClient(
        create_app(ServerSettings(data_dir=tmp_path, run_worker=False)), base_url="http://127.0.0.1"
    ) as client:
        run = client.post("/api/v1/runs", json={"project": "p", "name": "r"}).json()
        with client.app.state.spectrawatch.sessions.begin() as session:  # type: ignore[attr-defined]
            frame = done_frame(session, run["id"], 10, 0, "update_sketch", ["__model__", "fc"])
            rows = [
                MetricRow(layer, "sed.gap_ratio.w16", step, 2.0)
                for layer in ("__model__", "fc")
                for step in range(10)
            ]
            result_store.replace_results(session, run["id"], frame.id, 10, "sed", rows, [])
            frame = done_frame(session, run["id"], 10, 1, "activations", ["fc"])
            rows = [MetricRow("fc", "eigentrack.mp_sigma2", 10, 0.5)]
            result_store.replace_results(session, run["id"], frame.id, 10, "activations", rows, [])
            session.add(
                Alert(run_id=run["id"], rule="gap_collapse", layer="__model__", severity="warning",
                      status="open", step=5, message="gap ratio fell")
            )  # fmt: skip
        api = f"/api/v1/dashboards/runs/{run['id']}"
        overview = client.get(f"{api}/overview").json()
        alerts = client.get(f"{api}/alerts").json()
        activations = client.get(f"{api}/activations").json()
    control = overview["controls"]["sed_layer"]
    assert control["value"] == "__model__"
    assert dict(zip(control["options"], control["labels"], strict=True)) == {
        "__model__": "whole model",
        "fc": "fc",
    }
    gap = next(p for p in overview["panels"] if p["id"] == "sed_gap")
    assert gap["figure"]["layout"]["title"]["text"].endswith(" · whole model")
    timeline = alerts["panels"][0]["figure"]
    assert "gap_collapse whole model" in timeline["layout"]["yaxis"]["categoryarray"]
    table = alerts["tables"][0]
    assert table["columns"][5:7] == ["resolved_step", "acknowledged_by"]
    assert table["labels"][5:7] == ["resolved at step", "acknowledged by"]
    assert table["rows"][0][2] == "whole model"
    (panel,) = activations["panels"]
    assert [h["key"] for h in panel["metrics_help"]] == ["eigentrack.mp_sigma2"]


def test_frozen_layers_left_out_of_later_snapshots_are_said_on_heatmap_and_drilldown(
    tmp_path: Path,
) -> None:
    """A frozen layer sent at step 0 only (the client leaves it out while unchanged) showed one
    heatmap column and a drill-down ending at step 0 as if data were missing; now both say
    "frozen: unchanged since step 0", from the latest snapshot's ``info["unchanged"]``."""
    from fastapi.testclient import TestClient

    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings

    with TestClient(
        create_app(ServerSettings(data_dir=tmp_path, run_worker=False)), base_url="http://127.0.0.1"
    ) as client:
        run = client.post("/api/v1/runs", json={"project": "p", "name": "lora"}).json()["id"]
        with client.app.state.spectrawatch.sessions.begin() as session:  # type: ignore[attr-defined]
            for step in (0, 10, 20):
                sent = ["base.weight", "lora.weight"] if step == 0 else ["lora.weight"]
                frame = done_frame(session, run, step, step, layers=sent)
                if step:
                    frame.info = {"unchanged": {"base.weight": 0}}
                rows = [MetricRow(la, "htsr.alpha", step, 3.0) for la in sent]
                result_store.replace_results(session, run, frame.id, step, "htsr", rows, [])
        api = f"/api/v1/dashboards/runs/{run}"
        heat = client.get(f"{api}/layers").json()["panels"][0]
        base = client.get(f"{api}/layer", params={"layer": "base.weight"}).json()
        lora = client.get(f"{api}/layer", params={"layer": "lora.weight"}).json()
    assert "frozen: unchanged since step 0 (base.weight)" in heat["note"]
    assert base["frozen_note"].startswith("frozen: unchanged since step 0 (base.weight):")
    assert base["note"] == base["frozen_note"]  # said once, above the panels
    assert lora["frozen_note"] == lora["note"] == ""


def test_sed_layer_menu_keeps_the_model_after_a_nan(tmp_path: Path) -> None:
    """After a NaN the model's SED stops (and a NaN layer's) while a finite layer's goes on: the
    overview's SED layer menu offered the layers at the last step only, lost ``__model__`` and
    defaulted to ``0.bias``; ``?sed_layer=__model__`` fell back to it too. Every layer with the
    metric is offered (the one that went NaN too), and the model is the default."""
    from fastapi.testclient import TestClient

    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings

    engine, sessions = migrated(tmp_path)
    with sessions.begin() as s:
        run_id = new_run(s, "p", "diverged")
        frame = done_frame(s, run_id, 0, 0)
        stops = {"__model__": 60, "0.weight": 60, "0.bias": 100}
        rows = [
            MetricRow(layer, "sed.gap_ratio.w16", step, 2.0)
            for layer, last in stops.items()
            for step in range(16, last + 1, 4)
        ]
        result_store.replace_results(s, run_id, frame.id, 0, "sed", rows, [])
    engine.dispose()
    with TestClient(
        create_app(ServerSettings(data_dir=tmp_path, run_worker=False)), base_url="http://127.0.0.1"
    ) as client:
        url = f"/api/v1/dashboards/runs/{run_id}/overview"
        control = client.get(url).json()["controls"]["sed_layer"]
        assert control["options"] == ["__model__", "0.bias", "0.weight"]  # the model first
        assert control["value"] == "__model__"
        asked = client.get(url, params={"sed_layer": "__model__"}).json()
        assert asked["controls"]["sed_layer"]["value"] == "__model__"
        gap = next(p for p in asked["panels"] if p["id"] == "sed_gap")
        assert gap["figure"]["layout"]["title"]["text"].endswith(" · whole model")
        bias = client.get(url, params={"sed_layer": "0.bias"}).json()
        assert bias["controls"]["sed_layer"]["value"] == "0.bias"


# registration order (named_parameters(), the forward pass), not natural order
MODEL_ORDER = ["embed.weight", "blocks.0.weight", "blocks.10.weight", "blocks.2.weight", "head.w"]


def test_pages_list_layers_in_the_models_order(tmp_path: Path) -> None:
    """Layer lists (heatmap rows, layer menus, legends, the activations' modules, NaN notes)
    were in natural order: ``embed`` and ``head`` among the blocks by name. They follow the
    model, as its client's frames list it: the first weight snapshot (both parts; the frozen
    embedding later ones leave out), the sketch's other tensors among those, the activations'
    modules in forward order; ``__model__`` first, a layer no frame names last."""
    from fastapi.testclient import TestClient

    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings

    sketched = ["blocks.0.weight", "blocks.0.bias", *MODEL_ORDER[2:], "head.bias", "__model__"]
    modules = ["embed", "blocks.0", "blocks.10", "blocks.2", "head"]
    with TestClient(
        create_app(ServerSettings(data_dir=tmp_path, run_worker=False)), base_url="http://127.0.0.1"
    ) as client:
        run = client.post("/api/v1/runs", json={"project": "p", "name": "gpt"}).json()["id"]
        with client.app.state.spectrawatch.sessions.begin() as session:  # type: ignore[attr-defined]
            done_frame(session, run, 0, 0, layers=MODEL_ORDER[:2])
            done_frame(session, run, 0, 1, layers=MODEL_ORDER[2:])
            later = done_frame(session, run, 10, 4, layers=MODEL_ORDER[1:])
            later.info = {"unchanged": {"embed.weight": 0}}
            later.nonfinite = {"blocks.2.weight": 3, "blocks.10.weight": 1}
            rows = [
                MetricRow(la, "htsr.alpha", step, 3.0)
                for la in [*MODEL_ORDER, "extra.weight"]
                for step in (0, 10)
            ]
            result_store.replace_results(session, run, later.id, 10, "htsr", rows, [])
            sketch = done_frame(session, run, 10, 3, "update_sketch", sketched)
            rows = [MetricRow(la, "sed.gap_ratio.w16", t, 2.0) for la in sketched for t in (16, 20)]
            result_store.replace_results(session, run, sketch.id, 10, "sed", rows, [])
            probe = done_frame(session, run, 10, 5, "activations", modules)
            rows = [MetricRow(m, "eigentrack.entropy", 10, 1.0) for m in reversed(modules)]
            result_store.replace_results(session, run, probe.id, 10, "activations", rows, [])
        api = f"/api/v1/dashboards/runs/{run}"
        heat = client.get(f"{api}/layers", params={"metric": "htsr.alpha"}).json()["panels"][0]
        menu = client.get(f"{api}/overview").json()["controls"]["sed_layer"]
        activations = client.get(f"{api}/activations").json()["panels"][0]["figure"]["data"]
        compare = client.get(
            "/api/v1/dashboards/compare", params={"runs": str(run), "names": "htsr.alpha"}
        ).json()
    assert heat["figure"]["data"][0]["meta"] == [*MODEL_ORDER, "extra.weight"]
    assert "from step 10 in blocks.10.weight, blocks.2.weight:" in heat["note"]
    assert menu["options"] == ["__model__", *sketched[:-1]]
    assert compare["controls"]["layer"]["options"] == [*MODEL_ORDER, "extra.weight"]
    lines = [t for t in activations if t.get("name") in modules]
    assert [t["name"] for t in lines] == modules
    assert lines[0]["line"]["color"] == fig.series_style(0)[0]  # the first module's colour


def test_model_order_reads_the_first_snapshots_parts_not_every_frame(db: Any) -> None:
    """The order is a few index seeks: the first snapshot's parts a growing page at a time
    (here 6 parts: pages of 1, 4, 16), the latest sketch and activations frame, each LIMITed;
    the run's other 300 snapshots are not read."""
    sessions, _ = db
    with sessions.begin() as s:
        run_id = new_run(s, "p", "many")
        names = [f"blocks.{i}.weight" for i in (0, 10, 2, 1, 11, 3)]
        for part, name in enumerate(names):
            done_frame(s, run_id, 0, part, layers=[name])
        for step in range(1, 301):
            done_frame(s, run_id, step, 100 + step, layers=list(reversed(names)))
    with sessions() as s, statements(s.connection()) as seen:
        assert reads.model_order(s, run_id) == names
    frame_reads = [q for q, _ in seen if "FROM frame" in q]
    assert len(frame_reads) == 6  # 3 pages of the snapshot, 2 sketch kinds, activations
    assert all("LIMIT" in q for q in frame_reads)


def test_nonfinite_onsets_take_the_first_row_step_of_sketch_frames(db: Any) -> None:
    """A sketch frame of steps 100..131 whose rows go NaN from step 117 starts at 117."""
    from spectrawatch_server.db.models import Frame

    sessions, _ = db
    with sessions.begin() as s:
        run_id = new_run(s, "p", "sketch")
        repo.insert_frame(
            s,
            Frame(
                run_id=run_id, kind="update_sketch", step=131, seq=0, idempotency_key="s0",
                blob_key="", bytes=1, layers=["a"], nonfinite={"a": 3},
                nonfinite_steps={"a": [117, 131]}, status="done",
            ),
        )  # fmt: skip
        onsets = reads.nonfinite_onsets(s, run_id)
    assert onsets == {"a": (117, "update_sketch")}
    note = fig.nonfinite_note(onsets)
    assert note.startswith("update sketches non-finite (NaN/Inf) from step 117")
    assert fig.nonfinite_note(onsets, ["b"]) == ""


def test_deliveries_table_names_its_time_columns(tmp_path: Path) -> None:
    """The deliveries table's times are UTC ISO values the page formats in the browser's zone
    (they were printed raw, with microseconds): the table names those columns."""
    from fastapi.testclient import TestClient

    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings

    with TestClient(
        create_app(ServerSettings(data_dir=tmp_path, run_worker=False)), base_url="http://127.0.0.1"
    ) as client:
        run = client.post("/api/v1/runs", json={"project": "p", "name": "r"}).json()
        page = client.get(f"/api/v1/dashboards/runs/{run['id']}/alerts").json()
    tables = {t["id"]: t for t in page["tables"]}
    assert tables["deliveries"]["times"] == ["created_at", "delivered_at"]
    assert set(tables["deliveries"]["times"]) <= set(tables["deliveries"]["columns"])
    assert page["run"]["created_at"].endswith("Z") or page["run"]["created_at"].endswith("+00:00")


def test_scalar_onsets_read_the_client_stats_and_skip_other_shapes() -> None:
    """The client's ``nonfinite_scalars`` (its JSON, so anything): well-formed entries only."""
    stats = {
        "nonfinite_scalars": {
            "loss": {"step": 20, "value": "nan"},
            "grad": {"step": 3, "value": "-inf"},
            "odd": {"step": 4, "value": "<b>"},
            "bad": {"step": "7"},
            "flag": {"step": True},
            "list": [1, 2],
        }
    }
    assert fig.scalar_onsets(stats) == {"loss": (20, "nan"), "grad": (3, "-inf"), "odd": (4, "nan")}
    for junk in (None, [], {"nonfinite_scalars": [1]}, {"nonfinite_scalars": "x"}):
        assert fig.scalar_onsets(junk) == {}
    line = fig.Line("loss", [0, 10, 19], [1.0, None, 0.25])
    mark = fig.scalar_onset_line(line, 20, "nan")
    assert (mark.name, list(mark.x), list(mark.y)) == ("loss: nan from step 20", [20], [0.25])
    note = fig.scalar_onsets_note(fig.scalar_onsets(stats), ["loss", "acc"])
    assert note.startswith("loss became nan at step 20: NaN/Inf values are gaps in a chart")


def test_scalar_onsets_note_names_scalars_never_finite_apart() -> None:
    """A scalar with a line "became" non-finite (a red point ends it); one without any finite
    value "was" non-finite from its first step (a red line marks it)."""
    onsets = {"loss": (20, "nan"), "aux_loss": (0, "inf")}
    assert fig.scalar_onsets_note(onsets, ["loss"]) == (
        "loss became nan at step 20: NaN/Inf values are gaps in a chart, so the line stops there"
        " (red point)."
    )
    both = fig.scalar_onsets_note(onsets, ["loss", "aux_loss"], drawn={"loss"})
    assert both.startswith("loss became nan at step 20; aux_loss was inf from its first")
    assert both.endswith("a line stops there (red point) or is not drawn at all (red line).")
    never = fig.scalar_onsets_note(onsets, ["aux_loss"], drawn=set())
    assert never.endswith("so there is no line to draw (red line at that step).")


def test_stored_nan_scalars_are_marked_where_they_began(tmp_path: Path) -> None:
    """The client sends NaN/Inf scalars now (stored as null) beside its ``nonfinite_scalars``:
    a loss that went NaN at step 20 gets its red point at its last finite value, and a scalar
    NaN from its first step (nulls only) its red line, not an empty line and a point at 0; on
    the overview and the compare page. An older run (no rows for the NaN) is marked as before."""
    from fastapi.testclient import TestClient

    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings

    settings = ServerSettings(data_dir=tmp_path, run_worker=False, run_webhooks=False)
    onsets = {"loss": {"step": 20, "value": "nan"}, "aux": {"step": 0, "value": "inf"}}
    headers = {"content-type": "application/json"}
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        runs = []
        for name, last in (("now", 30), ("older", 20)):
            run = client.post("/api/v1/runs", json={"project": "p", "name": name}).json()["id"]
            rows = [f'{{"step": {s}, "name": "loss", "value": {1 / (s + 1)}}}' for s in range(20)]
            rows += [f'{{"step": {s}, "name": "loss", "value": NaN}}' for s in range(20, last)]
            rows += [f'{{"step": {s}, "name": "aux", "value": Infinity}}' for s in range(last - 20)]
            body = "[" + ",".join(rows) + "]"
            assert client.post(f"/api/v1/runs/{run}/scalars", content=body, headers=headers)
            stats = {"nonfinite_scalars": onsets}
            assert client.post(f"/api/v1/runs/{run}/client-stats", json=stats).status_code == 200
            runs.append(run)
        for run in runs:
            overview = client.get(f"/api/v1/dashboards/runs/{run}/overview").json()
            drawn = [p for p in overview["panels"] if p["figure"]]
            traces = {t["meta"]: t for p in drawn for t in p["figure"]["data"]}
            assert "aux" not in traces  # nothing finite: no empty line
            point = traces["loss: nan from step 20"]
            assert (point["x"], point["y"]) == ([20], [pytest.approx(1 / 20)])
            (aux,) = [p for p in drawn if p.get("note", "").startswith("aux was inf from its")]
            (shape,) = aux["figure"]["layout"]["shapes"]
            assert (shape["x0"], shape["line"]["color"]) == (0, fig.NONFINITE_COLOR)
        params = {"runs": f"{runs[0]},{runs[1]}", "names": "aux"}
        (aux,) = client.get("/api/v1/dashboards/compare", params=params).json()["panels"]
        assert [t["meta"] for t in aux["figure"]["data"]] == []
        assert f"#{runs[0]} now: aux was inf from its first logged step, 0" in aux["note"]
        assert len(aux["figure"]["layout"]["shapes"]) == 2  # a red line per run


def test_scalar_onset_marker_is_a_red_line_with_the_name_escaped() -> None:
    marker = fig.scalar_onset_marker("<b>loss</b>", 0, "nan")
    assert (marker.step, marker.color, marker.dash) == (0, fig.NONFINITE_COLOR, "solid")
    assert marker.label == "&lt;b&gt;loss&lt;/b&gt;: nan from step 0"


def test_rule_condition_says_each_kind_in_words() -> None:
    cond = routes.rule_condition
    threshold = {"kind": "threshold", "metric": "htsr.alpha", "below": 2.0, "above": 6.0}
    assert cond({**threshold, "hysteresis": 0.1}) == "htsr.alpha < 2 or > 6 (hysteresis 0.1)"
    assert cond({"kind": "threshold", "metric": "m", "above": 0.5}) == "m > 0.5"
    growth = {"kind": "growth", "metric": "norm.spectral", "factor": 10.0, "window": 10}
    assert cond(growth) == "norm.spectral ≥ 10 times the minimum of the previous 10 points"
    assert cond({"kind": "silence", "minutes": 30.0}) == "a running run silent for 30 min"
    assert cond({"kind": "nonfinite"}) == "NaN/Inf in a frame"
    assert cond({"kind": "mystery"}) == ""
    scalar = {"kind": "threshold", "metric": None, "scalar": "val_loss", "above": 2.0}
    assert cond({**scalar, "fire_after": 3}) == "scalar val_loss > 2 for 3 points"
    assert cond({**growth, "metric": None, "scalar": "loss", "fire_after": 1}) == (
        "scalar loss ≥ 10 times the minimum of the previous 10 points"
    )
    low = {"kind": "threshold", "scalar": "val_acc", "below": 0.6, "fire_after": 5}
    assert cond({**low, "after_step": 500}) == "scalar val_acc < 0.6 for 5 points from step 500"
    assert cond({**low, "after_step": 0}) == "scalar val_acc < 0.6 for 5 points"
    assert cond({**growth, "after_step": 100}).endswith("previous 10 points from step 100")


def test_rules_page_lists_a_rule_on_a_logged_scalar(tmp_path: Path) -> None:
    """A custom rule on a scalar (``alerts set val_loss_high --scalar val_loss``) is listed with
    its condition, no layers, and the alert a scalar batch opened under it."""
    from fastapi.testclient import TestClient

    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings

    settings = ServerSettings(data_dir=tmp_path, run_worker=False, run_webhooks=False)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        run = client.post("/api/v1/runs", json={"project": "p", "name": "r"}).json()["id"]
        params = {"kind": "threshold", "scalar": "val_loss", "above": 2.0, "fire_after": 3}
        rule = client.patch("/api/v1/projects/p/alert-rules/val_loss_high", json={"params": params})
        assert rule.status_code == 200, rule.text
        points = [{"step": s, "name": "val_loss", "value": 2.0 + s} for s in range(1, 4)]
        assert client.post(f"/api/v1/runs/{run}/scalars", json=points).status_code == 202
        body = client.get("/api/v1/dashboards/projects/p/alert-rules").json()
        (row,) = [r for r in body["rules"] if r["name"] == "val_loss_high"]
        assert row["condition"] == "scalar val_loss > 2 for 3 points"
        assert (row["layers"], row["open_alerts"], row["builtin"]) == ("—", 1, False)
        assert row["params"]["scalar"] == "val_loss"
        assert row["params"]["metric"] is None


def test_rules_pages_of_every_project_name_and_a_missing_one(tmp_path: Path) -> None:
    """The rules page of a project, linked from its runs list; a project named ``.`` (stored
    before such names were refused) is reached by the query form, a missing one is a 404."""
    from fastapi.testclient import TestClient

    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings

    assert routes.rules_href("a b#c") == "/projects/a%20b%23c/alert-rules"
    assert routes.rules_href(".") == "/alert-rules?project=."
    settings = ServerSettings(data_dir=tmp_path, run_worker=False)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        client.post("/api/v1/runs", json={"project": "p q", "name": "r"}).raise_for_status()
        runs = client.get("/projects/p%20q")
        assert 'href="/projects/p%20q/alert-rules"' in runs.text
        page = client.get("/projects/p%20q/alert-rules")
        assert page.status_code == 200
        assert '"project": "p q"' in page.text
        assert client.get("/alert-rules", params={"project": "p q"}).status_code == 200
        missing = client.get("/projects/nope/alert-rules")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "project_not_found"
        body = client.get("/api/v1/dashboards/projects/p%20q/alert-rules").json()
        assert body["project"] == "p q"
        # the query form (the page's): "." and ".." in a URL path are resolved away
        assert (
            client.get("/api/v1/dashboards/alert-rules", params={"project": "p q"}).json() == body
        )
        with client.app.state.spectrawatch.sessions.begin() as session:  # type: ignore[attr-defined]
            repo.get_or_create_project(session, ".")  # stored before such names were refused
        dot = client.get("/api/v1/dashboards/alert-rules", params={"project": "."})
        assert dot.status_code == 200, dot.text
        assert dot.json()["project"] == "."
        assert dot.json()["runs_href"] == "/?project=."
        assert {r["name"] for r in body["rules"]} >= {"alpha_out_of_range", "nonfinite"}
        assert all(r["open_alerts"] == 0 for r in body["rules"])


def test_error_pages_fit_a_phone_and_lead_back_and_rules_without_a_project_offer_them(
    tmp_path: Path,
) -> None:
    """A browser's 404/422 page had no viewport (980 px wide on a phone) and no header; bare
    ``/alert-rules`` answered "422 query.project: Field required": it lists the projects now."""
    from fastapi.testclient import TestClient

    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings

    page = {"Accept": "text/html"}
    settings = ServerSettings(data_dir=tmp_path, run_worker=False)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        client.post("/api/v1/runs", json={"project": "p q", "name": "r"}).raise_for_status()
        for bad, status in (("/runs/999", 404), ("/?desc=x", 422), ("/no/such/page", 404)):
            answer = client.get(bad, headers=page)
            assert answer.status_code == status
            assert "<meta name='viewport' content='width=device-width" in answer.text
            assert "<header class='top'>" in answer.text
            assert "<nav><a href='/'>Runs</a></nav>" in answer.text
        rules = client.get("/alert-rules", headers=page)
        assert rules.status_code == 200, rules.text
        assert '<header class="top">' in rules.text
        assert 'href="/projects/p%20q/alert-rules"' in rules.text
    settings = ServerSettings(data_dir=tmp_path, run_worker=False, require_auth=True)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        rules = client.get("/alert-rules", headers=page)
        assert rules.status_code == 200
        assert "p q" not in rules.text  # a token's project is its own to see
        assert "requires an API token" in rules.text


def test_static_files_are_linked_by_content_version_and_cached_accordingly(
    tmp_path: Path,
) -> None:
    """Pages link every script and stylesheet as ``NAME?v=<first 12 hex of its SHA-256>``; that
    URL is cached for a year, immutable (no revalidation of plotly.min.js per page load); any
    other (an old version, none) is revalidated on every use, so an upgrade's page never runs
    with a stale script."""
    from fastapi.testclient import TestClient

    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings

    static = routes.package_dir() / "static"
    settings = ServerSettings(data_dir=tmp_path, run_worker=False, run_webhooks=False)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        assert client.post("/api/v1/projects", json={"name": "p"}).status_code == 201
        page = client.get("/").text + client.get("/projects/p/alert-rules").text
        links = re.findall(r'(?:src|href)="(/dashboards/static/[^"]+)"', page)
        assert {link.split("?")[0].rsplit("/", 1)[1] for link in links} >= {
            "common.js",
            "runs.js",
            "rules.js",
            "spectrawatch.css",
        }
        for link in links:
            name, _, query = link.removeprefix("/dashboards/static/").partition("?")
            digest = hashlib.sha256((static / name).read_bytes()).hexdigest()[:12]
            assert query == f"v={digest}", link
            resp = client.get(link)
            assert resp.status_code == 200
            assert resp.headers["cache-control"] == "public, max-age=31536000, immutable"
        for stale in ("/dashboards/static/common.js", "/dashboards/static/common.js?v=0"):
            resp = client.get(stale)
            assert resp.status_code == 200
            assert resp.headers["cache-control"] == "no-cache", stale


def test_static_scripts_go_gzipped_to_a_browser_that_accepts_it(tmp_path: Path) -> None:
    """plotly.min.js (4.8 MB) went uncompressed to every browser; one accepting gzip gets it
    gzipped now (about 1.5 MB), compressed once a process; another, or a range, the file."""
    from fastapi.testclient import TestClient

    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings

    raw = (routes.package_dir() / "static" / "plotly.min.js").read_bytes()
    settings = ServerSettings(data_dir=tmp_path, run_worker=False, run_webhooks=False)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        url = "/dashboards/static/plotly.min.js"
        packed = client.get(url, headers={"Accept-Encoding": "gzip, deflate, br"})
        assert packed.headers["content-encoding"] == "gzip"
        assert packed.headers["vary"] == "Accept-Encoding"
        assert int(packed.headers["content-length"]) < len(raw) / 2
        assert packed.content == raw  # httpx decodes it
        etag = packed.headers["etag"]
        assert etag.startswith("W/")
        again = client.get(url, headers={"Accept-Encoding": "gzip", "If-None-Match": etag})
        assert again.status_code == 304
        # the 304 carries the validators the 200 would (it had the uncompressed file's strong
        # ETag and no Vary: a cache could splice identity bytes into a gzip body)
        assert (again.headers["etag"], again.headers["vary"]) == (etag, "Accept-Encoding")
        plain = client.get(url, headers={"Accept-Encoding": "identity"})
        assert "content-encoding" not in plain.headers
        assert plain.content == raw
        refused = client.get(url, headers={"Accept-Encoding": "gzip;q=0"})
        assert "content-encoding" not in refused.headers
        ranged = client.get(url, headers={"Accept-Encoding": "gzip", "Range": "bytes=0-9"})
        assert ranged.status_code == 206
        assert ranged.content == raw[:10]


def test_config_rows_put_differing_keys_first() -> None:
    """The compare page showed the runs' names and states, never their configs: their rows are
    the flattened keys, those whose values differ (or that a run lacks) first."""
    rows = fig.config_rows(
        [
            {"lr": 0.001, "opt": {"name": "adam", "betas": [0.9, 0.99]}, "seed": 1, "d": {}},
            {"lr": 0.01, "opt": {"name": "adam", "betas": [0.9, 0.99]}, "seed": 1, "wd": 0.1},
        ]
    )
    assert [(r.key, r.values, r.differs) for r in rows] == [
        ("d", ("{}", None), True),
        ("lr", ("0.001", "0.01"), True),
        ("wd", (None, "0.1"), True),
        ("opt.betas", ("[0.9, 0.99]", "[0.9, 0.99]"), False),
        ("opt.name", ("adam", "adam"), False),
        ("seed", ("1", "1"), False),
    ]
    assert fig.flatten_config({"a": {"b": {"c": 1}}, "x": None}) == {"a.b.c": 1, "x": None}
    assert fig.config_text(True) == "true"
    assert fig.config_text("<b>") == "<b>"  # the page writes it as text


def test_compare_answers_the_runs_configs(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings

    settings = ServerSettings(data_dir=tmp_path, run_worker=False)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        ids = [
            client.post(
                "/api/v1/runs",
                json={"project": "p", "name": f"r{lr}", "config": {"lr": lr, "bs": 32}, "tags": t},
            ).json()["id"]
            for lr, t in ((0.1, ["a"]), (0.2, []))
        ]
        body = client.get("/api/v1/dashboards/compare", params={"runs": f"{ids[0]},{ids[1]}"})
        config = body.json()["config"]
    assert config == {
        "columns": [f"#{ids[0]} r0.1", f"#{ids[1]} r0.2"],
        "status": ["running", "running"],
        "tags": [["a"], []],
        "rows": [
            {"key": "lr", "values": ["0.1", "0.2"], "differs": True},
            {"key": "bs", "values": ["32", "32"], "differs": False},
        ],
    }


def test_metric_help_reads_the_docs_tables_and_finds_stored_keys() -> None:
    """The layers page's 60+ metric keys had no description and nothing linked to
    docs/metrics.md: each key's row is found by its stored name now."""
    docs = fig.parse_metric_docs(
        "## HT-SR (`htsr.*`)\n\n| key | definition | how to read it |\n|---|---|---|\n"
        "| `htsr.alpha` | tail `lambda` | **2-6**: fine |\n"
        "| `htsr.under_trained`, `htsr.over_trained` | flags | per layer |\n\n"
        "## SED\n\n| key | definition | how to read it |\n|---|---|---|\n"
        "| `sed.edge.w<W>` | k* | directions |\n"
    )
    assert sorted(docs) == [
        "htsr.alpha",
        "htsr.over_trained",
        "htsr.under_trained",
        "sed.edge.w<W>",
    ]
    alpha = docs["htsr.alpha"]
    assert (alpha.definition, alpha.reading) == ("tail lambda", "2-6: fine")
    assert (alpha.section, alpha.anchor) == ("HT-SR (htsr.*)", "ht-sr-htsr")
    assert fig.find_help(docs, "sed.edge.w32") == docs["sed.edge.w<W>"]
    assert fig.find_help(docs, "sed.edge.w32.x") is None
    farms = fig.find_help(docs, "farms.alpha")
    assert farms is not None
    assert farms.definition == "the FARMS twin of htsr.alpha: tail lambda"
    public = fig.help_public(docs, "htsr.alpha")
    assert public is not None
    assert public["healthy"] == {
        "low": 2.0,
        "high": 6.0,
        "text": fig.HEALTHY_RANGES["htsr.alpha"][2],
    }
    assert (
        fig.healthy_band(["norm.update_ratio", "norm.update"])
        == fig.HEALTHY_RANGES["norm.update_ratio"]
    )
    assert fig.healthy_band(["htsr.alpha", "norm.update_ratio"]) is None


def test_layers_and_overview_answer_metric_help_and_healthy_bands(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings

    engine, sessions = migrated(tmp_path)
    with sessions.begin() as s:
        rid = new_run(s, "p", "r")
        rows = [MetricRow(la, "htsr.alpha", st, 3.0) for la in ("a", "b") for st in (1, 2)]
        rows += [MetricRow(fig.MODEL_LAYER, "norm.update_ratio", st, 1e-3) for st in range(5)]
        rows += [MetricRow(fig.MODEL_LAYER, "sed.gap_ratio.w16", st, 2.0) for st in range(5)]
        rows += [MetricRow(fig.MODEL_LAYER, "sed.gap_ratio.w32", st, 2.0) for st in range(5)]
        result_store.replace_results(s, rid, done_frame(s, rid, 0, 0).id, 0, "htsr", rows, [])
    engine.dispose()
    with TestClient(
        create_app(ServerSettings(data_dir=tmp_path, run_worker=False)), base_url="http://127.0.0.1"
    ) as client:
        layers = client.get(f"/api/v1/dashboards/runs/{rid}/layers").json()
        (item,) = layers["panels"][0]["metrics_help"]
        assert item["name"] == "htsr.alpha"
        assert item["reading"].startswith("2-6: typical of well-trained layers")
        assert item["healthy"]["low"] == 2.0
        assert item["anchor"] == "ht-sr-heavy-tailed-self-regularisation-htsr"
        overview = client.get(f"/api/v1/dashboards/runs/{rid}/overview").json()
        by_id = {p["id"]: p for p in overview["panels"]}
        assert [h["key"] for h in by_id["sed_gap"]["metrics_help"]] == ["sed.gap_ratio.w<W>"]
        ratio = by_id["update_ratio"]
        (band,) = [s for s in ratio["figure"]["layout"]["shapes"] if s["type"] == "rect"]
        assert (band["y0"], band["y1"]) == fig.HEALTHY_RANGES["norm.update_ratio"][:2]
        assert band["label"]["text"].startswith("healthy: about 1e-3")
        assert ratio["metrics_help"][0]["healthy"] is not None
        page = client.get("/metrics-reference")
        assert page.status_code == 200
        assert '<tr id="htsr.alpha"><td><code>htsr.alpha</code></td>' in page.text
        assert '<tr id="sed.gap_ratio.w&lt;W&gt;">' in page.text


def test_runs_list_shows_and_sorts_by_config_columns(tmp_path: Path) -> None:
    """The runs list had no config columns: ``cols`` (repeated) adds one per config key (the
    picker offers the listed runs' flattened keys), and ``sort=config:<key>`` orders the listed
    runs by it, numbers by value, runs without the key last."""
    from fastapi.testclient import TestClient

    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings

    with TestClient(
        create_app(ServerSettings(data_dir=tmp_path, run_worker=False)), base_url="http://127.0.0.1"
    ) as client:
        for name, config in (
            ("a", {"opt": {"lr": 0.01}, "bs": 32}),
            ("b", {"opt": {"lr": 0.1}, "note": "<b>x</b>"}),
            ("c", {"opt": {"lr": 0.001}}),
            ("d", {}),
        ):
            client.post("/api/v1/runs", json={"project": "p", "name": name, "config": config})

        def table(**params: Any) -> tuple[list[str], str]:
            html = client.get("/", params={"fragment": "true", **params}).text
            return re.findall(r'<a href="/runs/\d+">([^<]+)</a>', html), html

        names, html = table(cols=["opt.lr", "note"], sort="config:opt.lr", desc="false")
        assert names == ["c", "a", "b", "d"]
        assert '<th class="config" title="config key opt.lr">opt.lr</th>' in html
        cells = re.findall(r'<td class="config">([^<]*)</td>', html)
        assert cells == ["0.001", "—", "0.01", "—", "0.1", "&lt;b&gt;x&lt;/b&gt;", "—", "—"]
        assert table(cols=["opt.lr"], sort="config:opt.lr")[0] == ["b", "a", "c", "d"]
        assert 'data-config-keys=\'["bs", "note", "opt.lr"]\'' in html
        page = client.get("/", params={"cols": "bs"}).text
        assert '<option value="bs" selected>bs</option>' in page
        assert '<option value="opt.lr" >opt.lr</option>' in page
        assert '<option value="config:bs" >config bs</option>' in page
        assert '<th class="config"' not in table()[1]  # no columns unless asked for


def test_runs_list_shows_last_scalar_values_and_a_nan_badge(tmp_path: Path) -> None:
    """The runs list showed a run that hit NaN as "finished" with an alert count and no
    results: it shows the last value of chosen scalars now (by default a loss and an accuracy
    the listed runs logged; ``summary`` repeated picks others, an empty one none), sorts every
    matching run by one (``sort=summary:<scalar>``, runs without a finite value last), and a
    NaN/Inf badge where the run's frames (its ``nonfinite`` alert episodes) or scalars (the
    client's ``nonfinite_scalars``) went non-finite, each read by one query for the page."""
    from fastapi.testclient import TestClient

    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings
    from spectrawatch_server.db.models import Alert

    engine, sessions = migrated(tmp_path)
    with sessions.begin() as s:
        ids = {name: new_run(s, "p", name) for name in ("a", "b", "nan", "empty")}
        for name, loss in (("a", 0.5), ("b", 0.25), ("nan", math.nan)):
            rows = [(t, "train/loss", 2.0 - t / 100) for t in range(0, 100, 10)]
            rows += [(100, "train/loss", loss), (100, "val_acc", 0.9), (5, "lr", 1e-3)]
            result_store.upsert_scalars(s, ids[name], rows)
        s.add(Alert(run_id=ids["nan"], rule="nonfinite", step=61, status="resolved"))
        s.add(Alert(run_id=ids["a"], rule="grad_spike", step=3))  # another rule: no badge
        repo.get_run(s, ids["b"]).client_stats = {  # type: ignore[union-attr]
            "nonfinite_scalars": {"val/loss": {"step": 70, "value": "inf"}}
        }
    engine.dispose()
    with TestClient(
        create_app(ServerSettings(data_dir=tmp_path, run_worker=False)), base_url="http://127.0.0.1"
    ) as client:

        def table(**params: Any) -> tuple[list[str], str]:
            html = client.get("/projects/p", params={"fragment": "true", **params}).text
            return re.findall(r'<a href="/runs/\d+">([^<]+)</a>', html), html

        _, html = table()
        heads = re.findall(r'<th class="num last-value" title="[^"]*">([^<]+)</th>', html)
        assert heads == ["train/loss", "val_acc"]  # defaults among the logged names
        assert 'data-scalar-names=\'["lr", "train/loss", "val_acc"]\'' in html
        cells = re.findall(r'<td class="num last-value">(.*?)</td>', html)
        assert cells[:2] == ["—", "—"]  # "empty" logged nothing
        assert cells[2] == '<span class="nonfinite-value" title="step 100">NaN/Inf</span>'
        assert cells[4:6] == [
            '<span title="step 100">0.25</span>',
            '<span title="step 100">0.9</span>',
        ]
        flag = r'data-run="(\d+)">(?:(?!</tr>).)*class="nonfinite-flag" title="([^"]*)"'
        flags = dict(re.findall(flag, html, re.S))
        assert flags[str(ids["nan"])] == "NaN/Inf: frames from step 61"
        assert flags[str(ids["b"])] == "NaN/Inf: val/loss (inf) from step 70"
        assert html.count('class="nonfinite-flag"') == 2
        # no finite last value: last either way, newest first
        assert table(sort="summary:train/loss", desc="false")[0] == ["b", "a", "empty", "nan"]
        assert table(sort="summary:train/loss")[0] == ["a", "b", "empty", "nan"]
        _, html = table(summary=["lr"])
        assert re.findall(r'<th class="num last-value" title="[^"]*">([^<]+)</th>', html) == ["lr"]
        assert "0.001" in html
        assert 'class="num last-value"' not in table(summary="")[1]  # none picked: none shown
        page = client.get("/projects/p").text
        assert '<option value="train/loss" selected>train/loss</option>' in page
        assert '<option value="lr" >lr</option>' in page
        assert '<option value="summary:val_acc" >last val_acc</option>' in page
