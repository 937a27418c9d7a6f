"""Layer x step heatmaps: ``(layer, step, value)`` rows pivoted into a :class:`Grid` (layers in
the model's order, or natural order), drawn with the first layer at the top, coloured by log10
where positive values span decades, and a click on a cell going to that layer's drilldown
(:func:`heatmap_click_target`).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from spectrawatch_server.figures.base import (
    Figure,
    LayerKey,
    _layout,
    natural_key,
    plot_text,
    rounded,
)
from spectrawatch_server.figures.lines import Marker
from spectrawatch_server.figures.metric_help import HEALTHY_RANGES

FEW_STEP_TICKS = 10  # a heatmap of at most this many columns has a tick at each step
LOG_COLOR_SPAN = 1e3  # a heatmap of positive values spanning this factor is coloured by log10
LOG_NON_POSITIVE_SHARE = 0.05  # ... with at most this share of its values <= 0
# ratios and other scale-free metrics: coloured by log10 whenever they have a positive value
LOG_COLOR_METRICS = ("*update_ratio*", "conditioning.*")


@dataclass(frozen=True)
class Grid:
    """A layer x step matrix: ``z[i][j]`` is ``layers[i]`` at ``steps[j]`` (None = missing;
    rounded to 6 significant digits by :func:`grid_from_rows`)."""

    layers: list[str]
    steps: list[int]
    z: list[list[float | None]]


def grid_from_rows(
    rows: Iterable[tuple[str, int, float | None]], order: LayerKey = natural_key
) -> Grid:
    """Pivot ``(layer, step, value)`` rows into a :class:`Grid`, layers sorted by ``order``
    (:func:`~spectrawatch_server.figures.base.model_order_key`: the model's; natural order by
    default), values rounded by :func:`rounded` (vectorised over the whole grid: heatmaps hold
    ~10^4-10^5 cells)."""
    cells = list(rows)
    lay = sorted({c[0] for c in cells}, key=order)
    st = sorted({int(c[1]) for c in cells})
    row_of = {la: i for i, la in enumerate(lay)}
    col_of = {s: j for j, s in enumerate(st)}
    z: list[float | None] = [None] * (len(lay) * len(st))
    for layer, step, value in cells:
        z[row_of[layer] * len(st) + col_of[int(step)]] = value
    flat = rounded(z)
    return Grid(lay, st, [flat[i * len(st) : (i + 1) * len(st)] for i in range(len(lay))])


TOP_AXIS_LAYERS = 30  # from this many layers (480 px of rows) the heatmap has a top step axis


def heatmap_figure(
    metric: str, grid: Grid, *, sampled: bool = False, marker: Marker | None = None
) -> Figure:
    """Layer x step heatmap of ``metric``; a click on a cell opens that layer's drilldown.

    ``sampled``: ``grid.steps`` is a sample of the stored steps (one per column, said in the
    title so a reader knows the columns are decimated, not averaged). ``marker``: a vertical
    line (the first non-finite step: the columns stop before it), labelled above the plot.
    """
    title = f"{metric} by layer and step"
    if sampled:
        title += f" (sampled at {len(grid.steps)} steps)"
    values = [v for row in grid.z for v in row if v is not None and math.isfinite(v)]
    log_color = uses_log_color(metric, values)
    band = HEALTHY_RANGES.get(metric)
    if log_color:
        title += " · log colour scale"
    elif band is not None:
        title += f" · green: healthy {band[0]:g}-{band[1]:g}"
    # Category y-axis in layer order, first layer at the top.
    # y holds the escaped names (tick labels and hover render HTML), meta the names as stored
    # (for the click-through and the CSV); the metric enters the hover as data, not template
    rows = [plot_text(la, 10_000) for la in grid.layers]
    heat: dict[str, Any] = {
        "type": "heatmap",
        "name": plot_text(metric),
        "x": grid.steps,
        "y": rows,
        "meta": list(grid.layers),
        "z": grid.z,
        "colorscale": "Viridis",
        "colorbar": {"title": {"text": plot_text(metric)}, "thickness": 12},
        "hovertemplate": "layer %{y}<br>step %{x}<br>%{fullData.name} %{z:.4g}<extra></extra>",
        "hoverongaps": False,
    }
    if log_color:  # decades apart (update ratios, condition numbers): colour by log10, while
        # hover and CSV keep the values (customdata); values <= 0 take the lowest colour
        positive = [v for v in values if v > 0]
        lo, hi = math.floor(math.log10(min(positive))), math.ceil(math.log10(max(positive)))
        decades = list(range(lo, hi + 1))
        heat["z"] = [[_log10(v, lo) for v in row] for row in grid.z]
        heat["zmin"], heat["zmax"] = lo, max(hi, lo + 1)
        heat["customdata"] = grid.z
        heat["hovertemplate"] = heat["hovertemplate"].replace("%{z:.4g}", "%{customdata:.4g}")
        heat["colorbar"].update({"tickvals": decades, "ticktext": [_power(k) for k in decades]})
    elif band is not None:  # anchored to the healthy range: the same colours whatever the run
        heat.update(band_colorscale(band[0], band[1]))
    data: list[dict[str, Any]] = [heat]
    layout = _layout(title, y_title="layer")
    layout["hovermode"] = "closest"
    # A fixed margin sized to the longest name: automargin costs a second layout pass.
    # every layer labelled (the page gives each row 16 px; Plotly would skip every other one)
    layout["yaxis"].update({"type": "category", "autorange": "reversed", "dtick": 1})
    longest = max((len(la) for la in grid.layers), default=8)
    layout["margin"]["l"] = min(320, 30 + 7 * longest)
    if 0 < len(grid.steps) <= FEW_STEP_TICKS:  # ticks at the steps, not at 499.6, 499.8...
        layout["xaxis"]["tickvals"] = list(grid.steps)
    top_axis = len(grid.layers) > TOP_AXIS_LAYERS and bool(grid.steps)
    if top_axis:  # a tall heatmap (16 px a layer) has its steps above the rows too
        layout["xaxis2"] = {"overlaying": "x", "side": "top", "matches": "x", "showgrid": False}
        layout["margin"]["t"] = 70
        data.append(  # an axis shows only with a trace: two invisible points, no hover/CSV
            {
                "type": "scatter",
                "mode": "markers",
                "x": [grid.steps[0], grid.steps[-1]],
                "y": rows[:1] * 2,
                "xaxis": "x2",
                "marker": {"opacity": 0},
                "hoverinfo": "skip",
                "showlegend": False,
            }
        )
    if marker is not None:
        layout["shapes"].append(
            {
                "type": "line",
                "xref": "x",
                "yref": "paper",
                "x0": marker.step,
                "x1": marker.step,
                "y0": 0,
                "y1": 1,
                "line": {"color": marker.color, "dash": marker.dash, "width": 2},
            }
        )
        layout["annotations"].append(
            {
                "x": marker.step,
                "y": 1,
                "xref": "x",
                "yref": "paper",
                "text": marker.label,
                "hovertext": marker.hover or marker.label,
                "showarrow": False,
                "xanchor": "right",
                "yanchor": "bottom",
                "yshift": 18 if top_axis else 0,  # above the top axis's tick labels
                "font": {"size": 11, "color": marker.color},
            }
        )
    return {"data": data, "layout": layout}


def uses_log_color(metric: str, values: list[float]) -> bool:
    """Whether a heatmap of ``metric`` (finite ``values``) is coloured by log10: a scale-free
    metric (:data:`LOG_COLOR_METRICS`) with a positive value, or positive values spanning
    :data:`LOG_COLOR_SPAN` with at most :data:`LOG_NON_POSITIVE_SHARE` of them <= 0 (an update
    ratio of 0 at the first step kept 0.06 .. 1e-9 on a linear scale: one colour)."""
    positive = [v for v in values if v > 0]
    if not positive:
        return False
    if any(fnmatch.fnmatchcase(metric, p) for p in LOG_COLOR_METRICS):
        return True
    few_others = len(values) - len(positive) <= LOG_NON_POSITIVE_SHARE * len(values)
    return few_others and max(positive) >= LOG_COLOR_SPAN * min(positive)


BAND_COLORS = ("#b2182b", "#f4a582", "#d9f0d3", "#1b7837", "#d9f0d3", "#92c5de", "#2166ac")


def band_colorscale(low: float, high: float) -> dict[str, Any]:
    """A diverging colour scale anchored to a healthy range ``low``..``high``: greens inside,
    darkest at its middle; reds below it, blues above, to half the range's width past either
    end (``zmin``/``zmax``, beyond them the end colours). An alpha heatmap of 2.5-4.2 stretched
    over Viridis looked alarming; in 2-6 it is green."""
    width = high - low
    zmin, zmax = low - width / 2, high + width / 2
    at_low, at_high = 0.25, 0.75  # low and high on the scale from zmin to zmax
    eps = 1e-3
    stops = (0.0, at_low - eps, at_low, 0.5, at_high, at_high + eps, 1.0)
    return {
        "zmin": zmin,
        "zmax": zmax,
        "colorscale": [[s, c] for s, c in zip(stops, BAND_COLORS, strict=True)],
    }


def _power(k: int) -> str:
    """``10^k`` as a tick label in the values' own units (``10⁻³``, as the line charts)."""
    return f"10<sup>{k}</sup>".replace("-", "\u2212")  # a minus sign, as plotly's


def _log10(value: float | None, floor: int) -> float | None:
    """log10 of a finite ``value``; ``floor`` for one <= 0 (the scale's lowest colour)."""
    if value is None or not math.isfinite(value):
        return None
    return math.log10(value) if value > 0 else float(floor)


def heatmap_click_target(run_id: int, layer: str, metric: str, step: int | None) -> str:
    """The drilldown URL a heatmap cell click goes to (the browser builds the same one)."""
    query = {"metric": metric}
    if step is not None:
        query["step"] = str(step)
    return f"/runs/{run_id}/layers/{quote(layer, safe='')}?{urlencode(query)}"
