"""The charts of one dashboard page read alike: a run, module or metric keeps one colour in
every chart, step axes share one range, marks (alerts, NaN) have colours no data line has,
ratio heatmaps are coloured by log10, log axes tick at decades in powers of ten."""

from __future__ import annotations

from pathlib import Path

import pytest

from spectrawatch_server import figures as fig
from spectrawatch_server.api.routes import dashboard_figures as routes


def _colors(figure: fig.Figure) -> dict[str, str]:
    return {t["name"]: t["line"]["color"] for t in figure["data"] if "line" in t}


def test_a_nan_point_shifts_no_later_line_colour() -> None:
    """A red "nan from step" point between two lines took the second line's place in
    plotly's colorway: the lines after it changed colour."""
    a, b = fig.Line("a", [0, 1], [1.0, 2.0]), fig.Line("b", [0, 1], [3.0, 4.0])
    onset = fig.scalar_onset_line(a, 2, "nan")
    colors = _colors(fig.line_figure("t", [a, onset, b]))
    assert colors["b"] == fig.series_style(1)[0] == _colors(fig.line_figure("t", [a, b]))["b"]
    assert colors[onset.name] == fig.NONFINITE_COLOR


def test_marks_use_colours_no_data_line_has() -> None:
    alerts = [{"step": 5, "rule": r, "severity": s} for r, s in (("a", "warning"), ("b", "info"))]
    marks = fig.overview_markers(3, 9, "val_acc", [*alerts, {"step": 6, "severity": "critical"}])
    bad = fig.nonfinite_marker({"fc1": (7, "weights")})
    assert bad is not None
    colors = {m.color for m in [*marks, bad]} | set(fig.SEVERITY_COLORS.values())
    assert not colors & set(fig.DATA_COLORS)
    assert fig.NONFINITE_COLOR not in fig.DATA_COLORS
    # past the palette, the colours come back dotted: 30 lines, 30 styles
    assert len({fig.series_style(i) for i in range(30)}) == 30


def test_compare_gives_each_run_one_colour_and_the_charts_one_step_range(
    tmp_path: Path,
) -> None:
    """Run #3 was red in train/loss and green in val_acc (colours followed the line order, and
    a run without a metric shifted the next); loss was on a linear axis (log on the overview);
    each chart had its own step range."""
    from fastapi.testclient import TestClient

    from spectrawatch_server.app import create_app
    from spectrawatch_server.config import ServerSettings

    settings = ServerSettings(data_dir=tmp_path, run_worker=False)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        ids = [
            client.post("/api/v1/runs", json={"project": "p", "name": f"r{i}"}).json()["id"]
            for i in range(3)
        ]
        for i, rid in enumerate(ids):
            names = ["loss"] if i == 0 else ["loss", "acc"]
            steps = range(10 * i, 50 + 30 * i)  # runs of different lengths
            rows = [{"step": s, "name": n, "value": 1.0 + s} for s in steps for n in names]
            client.post(f"/api/v1/runs/{rid}/scalars", json=rows).raise_for_status()
        body = client.get(
            "/api/v1/dashboards/compare",
            params={"runs": ",".join(map(str, ids)), "names": ["loss", "acc"]},
        ).json()
    loss, acc = (p["figure"] for p in body["panels"])
    label = f"#{ids[2]} r2"
    assert _colors(loss)[label] == _colors(acc)[label] == fig.series_style(2)[0]
    assert loss["layout"]["yaxis"]["type"] == "log"
    assert acc["layout"]["yaxis"]["type"] == "linear"
    assert loss["layout"]["xaxis"]["range"] == acc["layout"]["xaxis"]["range"]
    lo, hi = loss["layout"]["xaxis"]["range"]
    assert lo < 0 < 109 < hi  # the union of the runs' steps
    assert all(p["shared_x"] for p in body["panels"])


def test_a_module_keeps_its_colour_in_every_chart() -> None:
    """blocks.1.fc1 was green in the EigenTrack charts and orange in the manifold ones (which
    hook fewer modules): its colour is its index among all the page's modules."""
    series = {
        ("manifold.rank", "blocks.1.fc1"): ([1, 2], [1.0, 2.0]),
        ("manifold.rank", "blocks.3.fc1"): ([1, 2], [1.0, 2.0]),
    }
    styles = {m: i for i, m in enumerate(["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1"])}
    lines = routes.lines_of(series, "manifold.rank", styles=styles)
    assert [(ln.name, ln.color) for ln in lines] == [
        ("blocks.1.fc1", fig.series_style(2)[0]),
        ("blocks.3.fc1", None),  # not in the list: line_figure's own order
    ]


def test_step_charts_of_a_page_share_one_range() -> None:
    loss = fig.line_figure("loss", [fig.Line("loss", [1, 255], [1.0, 0.5])])
    late = fig.line_figure(
        "gap", [fig.Line("w16", [4, 289], [2.0, 3.0])], markers=[fig.Marker(300, "x")]
    )
    esd = fig.esd_figure(
        {"bins": [0.1, 1.0, 10.0], "density": [1.0, 0.5], "alpha": 3.0, "xmin": 1.0}, "esd"
    )
    panels = [fig.Panel("a", "a", loss), fig.Panel("b", "b", late), fig.Panel("c", "c", esd)]
    lo, hi = fig.share_step_range(panels, [400])
    assert lo < 1
    assert hi > 400
    assert loss["layout"]["xaxis"]["range"] == late["layout"]["xaxis"]["range"] == [lo, hi]
    assert esd is None or "range" not in esd["layout"]["xaxis"]  # eigenvalues, not steps
    assert [p.extra.get("shared_x", False) for p in panels] == [True, True, False]


def test_value_axes_tick_in_powers_of_ten_at_decades_and_hover_says_the_step() -> None:
    """Log axes mixed SI prefixes (100µ, 10n) with decimals and labelled 2 and 5 between
    decades; the hover showed 815.905μ under a bare step number and cut run names."""
    layout = fig.line_figure("t", [fig.Line("r", [1, 2], [1e-4, 1e-2])], log_y=True)["layout"]
    assert layout["yaxis"]["type"] == "log"
    assert layout["yaxis"]["exponentformat"] == "power"
    assert layout["yaxis"]["minorloglabels"] == "none"
    assert layout["yaxis"]["hoverformat"] == ".3~g"
    assert layout["xaxis"]["unifiedhovertitle"]["text"] == "step %{x}"
    assert layout["hoverlabel"]["namelength"] == -1


def test_tiny_relative_ranges_are_padded_and_all_zero_lines_get_a_plain_axis() -> None:
    """An effective rank of 9.910-9.916 filled the axis (a 0.06 % change read as a big dip);
    two lines of zeros had a -1..1 axis."""
    rank = fig.line_figure("r", [fig.Line("rank", [1, 2, 3], [9.910, 9.916, 9.912])])
    lo, hi = rank["layout"]["yaxis"]["range"]
    assert hi - lo == pytest.approx(fig.lines.MIN_RELATIVE_SPAN * 9.913)
    zeros = fig.line_figure("w", [fig.Line(n, [1, 2], [0.0, 0.0]) for n in ("a", "b")])
    assert tuple(zeros["layout"]["yaxis"]["range"]) == fig.lines.ALL_ZERO_RANGE
    assert "all values 0" in zeros["layout"]["title"]["text"]
    wide = fig.line_figure("w", [fig.Line("loss", [1, 2], [0.5, 2.0])])
    assert "range" not in wide["layout"]["yaxis"]  # plotly's own


def test_metrics_of_very_different_sizes_get_their_own_charts() -> None:
    lines = [
        fig.Line("val_acc", [1, 2], [0.2, 0.9]),
        fig.Line("grad_norm", [1, 2], [3.0, 1.0]),
        fig.Line("lr", [1, 2], [3e-3, 1e-3]),
        fig.Line("never", [1], [None]),
    ]
    groups = fig.group_by_magnitude(lines)
    assert [[ln.name for ln in g] for g in groups] == [["val_acc", "grad_norm", "never"], ["lr"]]


def test_phase_bands_have_a_legend_key_and_no_label_in_the_plot() -> None:
    """Phase labels overlapped ("rise" over "plateau") and hid under alert labels."""
    bands = fig.phase_bands([0, 2, 3, 10], [1, 2, 3, 3])
    f = fig.line_figure("t", [fig.Line("w16", [0, 10], [1.0, 2.0])], bands=bands)
    keys = [t["name"] for t in f["data"] if t.get("legendgroup") == "phases"]
    assert keys == ["phase: rise", "phase: plateau", "phase: collapse"]
    assert f["layout"]["annotations"] == []


def test_ratio_heatmaps_are_coloured_by_log10_even_with_zeros() -> None:
    """norm.update_ratio of 0.06 down to 1e-9, with a 0 at the first step, was on a linear
    colour scale: every column after step ~100 the same colour."""
    rows = [("a", 0, 0.0), ("a", 5, 0.06), ("b", 0, 1e-9), ("b", 5, 1e-3)]
    trace = fig.heatmap_figure("norm.update_ratio", fig.grid_from_rows(rows))["data"][0]
    assert trace["customdata"][0][0] == 0.0  # hover and CSV keep the value
    assert trace["z"][0][0] == trace["zmin"] == -9  # a 0 takes the lowest colour
    assert trace["colorbar"]["ticktext"][-1] == "10<sup>\u22121</sup>"  # 10⁻¹ (0.06 rounds up)


def test_alpha_heatmap_colours_are_anchored_to_the_healthy_band() -> None:
    """An alpha heatmap of 2.5-4.2 stretched Viridis over that span: healthy layers looked
    alarming. Its colours now mean the same on every run: green in 2-6."""
    rows = [("a", 0, 2.5), ("a", 5, 4.2)]
    heat = fig.heatmap_figure("htsr.alpha", fig.grid_from_rows(rows))
    trace = heat["data"][0]
    assert (trace["zmin"], trace["zmax"]) == (0.0, 8.0)
    assert "customdata" not in trace
    assert "healthy 2-6" in heat["layout"]["title"]["text"]


def test_esd_eigenvalue_axis_ticks_at_decades_in_powers_of_ten() -> None:
    """The ESD's log eigenvalue axis read 10µ, 100µ, 0.001 with 2, 3, 5 between decades."""
    esd = fig.esd_figure(
        {"bins": [1e-5, 1e-3, 0.1, 10.0], "density": [1.0, 0.5, 0.2], "alpha": 3.0, "xmin": 1.0},
        "esd",
    )
    assert esd is not None
    assert esd["layout"]["xaxis"]["exponentformat"] == "power"
    assert esd["layout"]["xaxis"]["minorloglabels"] == "none"


def test_a_single_line_names_its_axis() -> None:
    """Plotly draws no legend for one trace: a panel of "other scalars" holding only val_acc
    named it nowhere but in the hover (its axis said "value")."""
    one = fig.line_figure("s", [fig.Line("val_acc", [1, 2], [0.1, 0.4])], y_title="value")
    assert one["layout"]["yaxis"]["title"]["text"] == "val_acc"
    two = [fig.Line(n, [1, 2], [0.1, 0.4]) for n in ("a", "b")]
    assert fig.line_figure("s", two, y_title="value")["layout"]["yaxis"]["title"]["text"] == "value"
    named = fig.line_figure("l", [fig.Line("train/loss", [1, 2], [2.0, 1.0])], y_title="loss")
    assert named["layout"]["yaxis"]["title"]["text"] == "loss"  # a panel's own title stays
