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

from spectrawatch_server.figures.base import Figure, _layout, plot_text, series_style

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
    color: str = "#d62728"  # one of MARK_COLORS: no data line has it
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
    """Lines over steps with optional vertical markers (labelled above the plot area), shaded
    x-bands (a legend key each) and a shaded y-range (labelled ``y_band_label`` at its top
    left: a healthy range). A line without a colour takes :func:`series_style` of its index
    among those (a red NaN point added between them shifts none); a linear axis spans at least
    :data:`MIN_RELATIVE_SPAN` of the values' size (:func:`value_range`)."""
    total = sum(len(line.x) for line in lines if line.shown)  # hidden lines are not drawn
    trace_type = "scattergl" if total > WEBGL_POINTS else "scatter"
    data = []
    styled = 0
    for line in lines:
        color, dash = line.color, line.dash
        if color is None:
            color, default_dash = series_style(styled)
            dash = default_dash if dash == "solid" else dash
            styled += 1
        trace: dict[str, Any] = {
            "type": trace_type,
            "mode": "lines+markers" if len(line.x) <= 30 else "lines",
            "name": plot_text(line.name),
            "meta": line.name,  # as stored: the CSV download
            "x": list(line.x),
            "y": list(line.y),
            "line": {"dash": dash, "width": 1.6, "color": color},
            "connectgaps": False,
        }
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
    y_range = None if log_y else value_range(lines)
    if y_range is not None and y_range == ALL_ZERO_RANGE:
        title += " · all values 0"
    if len(data) == 1 and y_title in ("", "value"):  # one line has no legend: the axis names it
        y_title = lines[0].name
    layout = _layout(title, y_title=y_title, log_y=log_y)
    if y_range is not None:
        layout["yaxis"]["range"] = list(y_range)
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
    data += band_keys(bands)
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
    steps = [int(x) for line in lines for x in line.x] + [m.step for m in markers]
    rows = marker_labels(layout, markers, (min(steps), max(steps)) if steps else (0, 1))
    if rows:  # a strip above the plot area, one row of labels each; the title above it
        layout["margin"]["t"] += LABEL_ROW_PX * rows
        layout["title"].update(yref="container", y=1, yanchor="top", pad={"t": 10})
    return {"data": data, "layout": layout}


MIN_RELATIVE_SPAN = 0.02  # a linear axis spans at least 2 % of its values' size
ALL_ZERO_RANGE = (-0.05, 1.0)  # the axis of lines that are all 0: the 0 line at the bottom


def value_range(lines: Sequence[Line]) -> tuple[float, float] | None:
    """The y range of a linear axis over ``lines`` when plotly's own would mislead, else None:
    every value 0 gives :data:`ALL_ZERO_RANGE` (not -1..1); values spanning less than
    :data:`MIN_RELATIVE_SPAN` of their midpoint's size get an axis that spans that much
    centred on them (an effective rank of 9.910-9.916, a 0.06 % change, was a full-height
    dip)."""
    values = [
        y
        for line in lines
        if line.shown and not line.fill
        for y in line.y
        if y is not None and math.isfinite(y)
    ]
    if not values:
        return None
    lo, hi = min(values), max(values)
    if lo == hi == 0:
        return ALL_ZERO_RANGE
    mid = (lo + hi) / 2
    half = MIN_RELATIVE_SPAN / 2 * abs(mid)
    if hi - lo >= 2 * half:
        return None
    return (mid - half, mid + half)


LEGEND_SYMBOL_ALPHA = "0.45"  # a band's legend key: its fill, more opaque than the band


def band_keys(bands: Sequence[Band]) -> list[dict[str, Any]]:
    """One legend entry per band label (phase: rise, plateau, collapse) in the band's colour: a
    key for the shaded x-bands, whose labels in the plot overlapped where bands are short."""
    keys: dict[str, dict[str, Any]] = {}
    for band in bands:
        if band.label in keys:
            continue
        color = re.sub(r"[0-9.]+\)$", LEGEND_SYMBOL_ALPHA + ")", band.color)
        keys[band.label] = {
            "type": "scatter",
            "mode": "markers",
            "name": f"phase: {plot_text(band.label)}",
            "x": [None],
            "y": [None],
            "marker": {"symbol": "square", "size": 12, "color": color},
            "hoverinfo": "skip",  # no data: left out of hover and the CSV download
            "legendgroup": "phases",
        }
    return list(keys.values())


LABEL_ROW_PX = 14  # a row of marker labels above the plot area
LABEL_ROWS = 3  # rows at most; past them labels share the row that ends first
LABEL_CHAR_PX = 6.0  # a label's width per character (10 px font), for placing them in rows
PLOT_PX = 620  # a plot area's width assumed for that (a panel of the two-column layout)


def marker_labels(layout: dict[str, Any], markers: Sequence[Marker], span: tuple[int, int]) -> int:
    """Each labelled marker's label above the plot area (out of the data), in the first of
    :data:`LABEL_ROWS` rows where it overlaps no other; a label equal to the one it would
    overlap joins it (``⚠ gap_collapse x3``). Its ``hover`` shows on it. Returns the rows."""
    per_px = max(1, span[1] - span[0]) / PLOT_PX
    ends: list[float] = []  # each row's right end, in steps
    placed: list[dict[str, Any]] = []  # the annotations
    counts: list[int] = []
    texts: list[str] = []
    for m in sorted((m for m in markers if m.label), key=lambda m: m.step):
        width = (len(m.label) + 3) * LABEL_CHAR_PX * per_px
        same = [i for i, a in enumerate(placed) if texts[i] == m.label and m.step - a["x"] < width]
        if same:  # the same label again within a label's width: one label, counted
            i = same[-1]
            counts[i] += 1
            placed[i]["text"] = f"{texts[i]} \u00d7{counts[i]}"  # x3
            placed[i]["hovertext"] += "<br>" + (m.hover or m.label)
            continue
        right = m.step > span[0] + (span[1] - span[0]) * 0.7  # near the right edge: leftwards
        start, end = (m.step - width, m.step) if right else (m.step, m.step + width)
        free = [r for r, e in enumerate(ends) if e < start]
        if free:
            row = free[0]
        elif len(ends) < LABEL_ROWS:
            row = len(ends)
            ends.append(end)
        else:
            row = min(range(len(ends)), key=lambda r: ends[r])
        ends[row] = end
        placed.append(
            {
                "x": m.step,
                "y": 1,
                "xref": "x",
                "yref": "paper",
                "text": m.label,
                "hovertext": m.hover or m.label,
                "showarrow": False,
                "xanchor": "right" if right else "left",
                "yanchor": "bottom",
                "yshift": LABEL_ROW_PX * row,
                "font": {"size": 10, "color": m.color},
            }
        )
        counts.append(1)
        texts.append(m.label)
    layout["annotations"].extend(placed)
    return len(ends)


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


MAGNITUDE_FACTOR = 10.0  # lines whose largest values differ more share no chart


def group_by_magnitude(lines: Sequence[Line], factor: float = MAGNITUDE_FACTOR) -> list[list[Line]]:
    """``lines`` in groups of like size (largest |value| within ``factor`` of each other), each
    group in the lines' order, groups in the order of their first line: one chart per group,
    so a learning rate of 3e-3 is not a flat line at 0 under a grad norm of 3. A line of no
    finite value, or of zeros only, joins the first group."""
    sizes = [_size(line) for line in lines]
    order = sorted((i for i, s in enumerate(sizes) if s > 0), key=lambda i: sizes[i])
    group_of: dict[int, int] = {}
    groups = 0
    smallest = 0.0
    for i in order:
        if not groups or sizes[i] > factor * smallest:
            groups, smallest = groups + 1, sizes[i]
        group_of[i] = groups - 1
    first = group_of[min(group_of)] if group_of else 0  # the group shown first
    buckets: dict[int, list[int]] = {}
    for i in range(len(lines)):
        buckets.setdefault(group_of.get(i, first), []).append(i)
    return [[lines[i] for i in idx] for idx in sorted(buckets.values())]


def _size(line: Line) -> float:
    return max((abs(y) for y in line.y if y is not None and math.isfinite(y)), default=0.0)
