"""Line figures: lines over steps (:class:`Line`) with vertical markers (:class:`Marker`),
shaded x-bands (:class:`Band`) and a shaded y-range, as SVG traces for small series and
``scattergl`` once a figure holds more than :data:`WEBGL_POINTS` points; many lines thinned to
a min/max envelope and a few drawn; and the long-format CSV of line traces.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from spectrawatch_server.figures.base import Figure, _layout, plot_text

WEBGL_POINTS = 20_000  # above this many points in one figure, line traces switch to WebGL


def series_csv(traces: Sequence[tuple[str, Sequence[int], Sequence[float | None]]]) -> str:
    """Long-format CSV ``series,step,value`` of line traces (the server-side twin of the
    browser's CSV button, used by tests and exports)."""
    lines = ["series,step,value"]
    for name, xs, ys in traces:
        quoted = '"' + name.replace('"', '""') + '"' if re.search(r'[",\n]', name) else name
        lines.extend(
            f"{quoted},{x},{'' if y is None else repr(float(y))}"
            for x, y in zip(xs, ys, strict=True)
        )
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Line:
    """One line trace: ``name`` with ``x`` steps and ``y`` values (None = gap, e.g. NaN)."""

    name: str
    x: Sequence[int]
    y: Sequence[float | None]
    group: str = ""
    dash: str = "solid"
    color: str | None = None
    shown: bool = True  # False: listed in the legend (a click draws it), not drawn
    fill: str = ""  # Plotly ``fill`` (``tonexty``: shade down to the previous line)


@dataclass(frozen=True)
class Marker:
    """A vertical marker at ``step`` (alert, early warning, accuracy crossing); ``label`` and
    ``hover`` are plotly text, user names in them escaped by :func:`plot_text`."""

    step: int
    label: str
    color: str = "#d62728"
    dash: str = "dash"
    hover: str = ""


@dataclass(frozen=True)
class Band:
    """A shaded x-range (``start``..``end``) labelled ``label`` (phase bands)."""

    start: int
    end: int
    label: str
    color: str


def line_figure(
    title: str,
    lines: Sequence[Line],
    *,
    y_title: str = "",
    log_y: bool = False,
    markers: Sequence[Marker] = (),
    bands: Sequence[Band] = (),
    y_band: tuple[float, float] | None = None,
    y_band_label: str = "",
) -> Figure:
    """Lines over steps with optional vertical markers, shaded x-bands and a shaded y-range
    (labelled ``y_band_label`` at its top left: a healthy range)."""
    total = sum(len(line.x) for line in lines if line.shown)  # hidden lines are not drawn
    trace_type = "scattergl" if total > WEBGL_POINTS else "scatter"
    data = []
    for line in lines:
        trace: dict[str, Any] = {
            "type": trace_type,
            "mode": "lines+markers" if len(line.x) <= 30 else "lines",
            "name": plot_text(line.name),
            "meta": line.name,  # as stored: the CSV download
            "x": list(line.x),
            "y": list(line.y),
            "line": {"dash": line.dash, "width": 1.6},
            "connectgaps": False,
        }
        if line.color:
            trace["line"]["color"] = line.color
        if line.group:
            trace["legendgroup"] = line.group
        if not line.shown:
            trace["visible"] = "legendonly"
        if line.fill:
            trace["fill"] = line.fill
            trace["line"]["width"] = 0.8
        data.append(trace)
    if log_y and _has_non_positive(lines):
        # a log axis would drop them without a word (losses go negative: NLL of densities, ELBO)
        log_y = False
        title += " · linear axis: values ≤ 0"
    layout = _layout(title, y_title=y_title, log_y=log_y)
    for band in bands:
        layout["shapes"].append(
            {
                "type": "rect",
                "xref": "x",
                "yref": "paper",
                "x0": band.start,
                "x1": band.end,
                "y0": 0,
                "y1": 1,
                "fillcolor": band.color,
                "line": {"width": 0},
                "layer": "below",
            }
        )
    seen_bands: set[str] = set()
    for band in bands:  # one legend-like label per phase kind, at its first span
        if band.label in seen_bands:
            continue
        seen_bands.add(band.label)
        layout["annotations"].append(
            {
                "x": band.start,
                "y": 1,
                "xref": "x",
                "yref": "paper",
                "text": band.label,
                "showarrow": False,
                "xanchor": "left",
                "yanchor": "top",
                "font": {"size": 10, "color": "#555"},
            }
        )
    if y_band is not None:
        layout["shapes"].append(
            {
                "type": "rect",
                "xref": "paper",
                "yref": "y",
                "x0": 0,
                "x1": 1,
                "y0": y_band[0],
                "y1": y_band[1],
                "fillcolor": "rgba(31, 119, 180, 0.07)",
                "line": {"width": 0},
                "layer": "below",
            }
        )
        if y_band_label:  # a shape's label: it stays on the band when the axis turns log
            layout["shapes"][-1]["label"] = {
                "text": plot_text(y_band_label),
                "textposition": "top left",
                "font": {"size": 10, "color": "#1f77b4"},
            }
    labelled = 0
    for m in markers:
        layout["shapes"].append(
            {
                "type": "line",
                "xref": "x",
                "yref": "paper",
                "x0": m.step,
                "x1": m.step,
                "y0": 0,
                "y1": 1,
                "line": {"color": m.color, "dash": m.dash, "width": 1.5},
            }
        )
        if not m.label:
            continue
        labelled += 1
        layout["annotations"].append(
            {
                "x": m.step,
                "y": 1 - 0.07 * ((labelled - 1) % 4),
                "xref": "x",
                "yref": "paper",
                "text": m.label,
                "hovertext": m.hover or m.label,
                "showarrow": False,
                "xanchor": "left",
                "yanchor": "top",
                "font": {"size": 10, "color": m.color},
                "bgcolor": "rgba(255,255,255,0.7)",
            }
        )
    return {"data": data, "layout": layout}


ENVELOPE_COLOR = "rgba(120, 120, 120, 0.55)"


def envelope_lines(lines: Sequence[Line], label: str) -> list[Line]:
    """The lowest and the highest value of ``lines`` at each step where any has one (lower
    first; the upper one shades down to it): two lines that keep every line's extremes, drawn
    where the lines themselves are too many to draw. Lines bucketed together share their steps
    (a bucket's first and last), so each bucket's min and max over all lines are on them."""
    lows: dict[int, float] = {}
    highs: dict[int, float] = {}
    for line in lines:
        for x, y in zip(line.x, line.y, strict=True):
            if y is None:
                continue
            if x not in lows or y < lows[x]:
                lows[x] = y
            if x not in highs or y > highs[x]:
                highs[x] = y
    steps = sorted(lows)
    return [
        Line(
            f"{label} min", steps, [lows[x] for x in steps], group="envelope", color=ENVELOPE_COLOR
        ),
        Line(
            f"{label} max",
            steps,
            [highs[x] for x in steps],
            group="envelope",
            color=ENVELOPE_COLOR,
            fill="tonexty",
        ),
    ]


def thin_lines(lines: Sequence[Line], drawn: int) -> list[Line]:
    """``lines`` as they are if at most ``drawn``; else :func:`envelope_lines` of all of them,
    then every line, the first ``drawn`` and those reaching the lowest or highest value drawn,
    the others only listed in the legend (a click draws one).

    Plotly's cost grows with the traces drawn, more than with their points (plotly.js #3227,
    #3826): 150 lines of a module each took 1.4-2.2 s to draw in Chromium."""
    if len(lines) <= drawn:
        return list(lines)
    finite = [
        (y, i) for i, line in enumerate(lines) for y in line.y if y is not None and math.isfinite(y)
    ]
    extremes = {min(finite)[1], max(finite)[1]} if finite else set()
    marked = [replace(line, shown=i < drawn or i in extremes) for i, line in enumerate(lines)]
    return envelope_lines(lines, f"all {len(lines)}:") + marked


def _has_non_positive(lines: Sequence[Line]) -> bool:
    """Whether a drawn line has a finite value <= 0 (which a log axis cannot show)."""
    return any(
        y is not None and math.isfinite(y) and y <= 0
        for line in lines
        if line.shown and not line.fill
        for y in line.y
    )
