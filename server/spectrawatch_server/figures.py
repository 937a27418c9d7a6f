"""Dashboard figures: query rows in, Plotly figure JSON (plain dicts) out. Pure: no I/O, no SQL.

(Named ``figures`` because ``spectrawatch_server.dashboards`` is the package of page files,
templates and static assets shipped from the top-level ``dashboards/`` folder.)

Page definitions (``dashboards/pages/*.json``, shipped as ``spectrawatch_server.dashboards``)
are parsed by :func:`parse_page`; each panel names a plot ``kind`` and the metric keys it shows
(glob patterns, matched against the run's metric names). The route module
(``api/routes/dashboards.py``) runs the queries and calls the builders here; the browser only
hands the returned ``{"data", "layout"}`` to ``Plotly.react``.

Figures use plotly.js >= 3 conventions (titles as ``{"text": ...}``), SVG traces for small
series and ``scattergl`` once a figure holds more than :data:`WEBGL_POINTS` points.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote, urlencode

import numpy as np

Figure = dict[str, Any]

WEBGL_POINTS = 20_000  # above this many points in one figure, line traces switch to WebGL
VAL_ACC_THRESHOLD = 0.9  # "generalised" line of the grokking overview
VAL_ACC_PATTERN = re.compile(r"^(val|valid|validation|test|eval)[._/ -]?(acc|accuracy)$", re.I)
WARNING_KEY = "grok.imminent"  # 1.0 from the step the SED early-warning detector fires
PHASE_PREFIX = "sed.phase"
MODEL_LAYER = "__model__"
HTSR_GOOD_RANGE = (2.0, 6.0)  # Martin & Mahoney JMLR 2021 §5: well-trained layers

# Phase codes of ``sed.phase`` (spectrawatch.spectral.sed.Phase): paper §3 rise/plateau/collapse.
PHASES: dict[int, tuple[str, str]] = {
    1: ("rise", "rgba(46, 160, 67, 0.13)"),
    2: ("plateau", "rgba(130, 130, 130, 0.13)"),
    3: ("collapse", "rgba(214, 39, 40, 0.15)"),
}
SEVERITY_COLORS = {
    "critical": "#d62728",
    "error": "#d62728",
    "warning": "#ff7f0e",
    "info": "#1f77b4",
}
FEW_STEP_TICKS = 10  # a heatmap of at most this many columns has a tick at each step
LOG_COLOR_SPAN = 1e3  # a heatmap of positive values spanning this factor is coloured by log10
PANEL_KINDS = frozenset(
    {
        "scalars",
        "sed",
        "lines",
        "heatmap",
        "esd",
        "mp",
        "traps",
        "alpha_history",
        "layer_metrics",
        "alerts_timeline",
        "compare",
    }
)


class PageSpecError(ValueError):
    """A page definition file is malformed (names the page and the field)."""


@dataclass(frozen=True)
class PanelSpec:
    """One plot of a page: ``kind`` (a :data:`PANEL_KINDS` member) over metrics ``match``."""

    id: str
    title: str
    kind: str
    match: tuple[str, ...] = ()
    y_title: str = ""
    log_y: bool = False
    split: bool = False  # one figure per matched metric name instead of one for all
    hide: tuple[str, ...] = ()  # scalars panels: names claimed from later panels, not drawn
    empty: str = "No data for this panel yet."
    help: str = ""


@dataclass(frozen=True)
class PageSpec:
    """A dashboard page: its ``panels`` and the URL ``controls`` it offers."""

    id: str
    title: str
    panels: tuple[PanelSpec, ...]
    controls: tuple[str, ...] = ()
    preferred: tuple[str, ...] = ()  # default metric order for a ``metric`` control
    exclude: tuple[str, ...] = ()  # metric patterns a ``metric`` control never offers

    def panel(self, panel_id: str) -> PanelSpec:
        for p in self.panels:
            if p.id == panel_id:
                return p
        raise KeyError(panel_id)


def _strings(page: str, raw: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = raw.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PageSpecError(f"page {page!r}: {key!r} must be a string or a list of strings")
    return tuple(value)


def parse_page(raw: Mapping[str, Any]) -> PageSpec:
    """Validate one page definition (the parsed JSON of ``dashboards/pages/<id>.json``)."""
    page = str(raw.get("id", "?"))
    if not isinstance(raw.get("id"), str) or not isinstance(raw.get("title"), str):
        raise PageSpecError(f"page {page!r}: 'id' and 'title' must be strings")
    panels = []
    for i, p in enumerate(raw.get("panels", [])):
        if not isinstance(p, Mapping):
            raise PageSpecError(f"page {page!r}: panels[{i}] must be an object")
        kind = p.get("kind")
        if kind not in PANEL_KINDS:
            raise PageSpecError(
                f"page {page!r}: panels[{i}].kind {kind!r} is not one of {sorted(PANEL_KINDS)}"
            )
        for key in ("id", "title"):
            if not isinstance(p.get(key), str):
                raise PageSpecError(f"page {page!r}: panels[{i}].{key} must be a string")
        panels.append(
            PanelSpec(
                id=p["id"],
                title=p["title"],
                kind=kind,
                match=_strings(page, p, "match"),
                y_title=str(p.get("y_title", "")),
                log_y=bool(p.get("log_y", False)),
                split=bool(p.get("split", False)),
                hide=_strings(page, p, "hide"),
                empty=str(p.get("empty", PanelSpec.empty)),
                help=str(p.get("help", "")),
            )
        )
    ids = [p.id for p in panels]
    if len(set(ids)) != len(ids):
        raise PageSpecError(f"page {page!r}: panel ids must be unique, got {ids}")
    return PageSpec(
        id=raw["id"],
        title=raw["title"],
        panels=tuple(panels),
        controls=_strings(page, raw, "controls"),
        preferred=_strings(page, raw, "preferred"),
        exclude=_strings(page, raw, "exclude"),
    )


# --- small pure helpers --------------------------------------------------------------------


def claim_scalars(panels: Sequence[PanelSpec], names: Iterable[str]) -> dict[str, list[str]]:
    """Scalar names each ``scalars`` panel draws: a name goes to one panel only, panels with a
    catch-all ``*`` pattern claim last (so a specific panel anywhere on the page wins), and a
    panel's ``hide`` patterns claim names it does not draw (e.g. a sample size)."""
    pool = list(names)
    claimed: set[str] = set()
    out: dict[str, list[str]] = {}
    scalar_panels = [p for p in panels if p.kind == "scalars"]
    for spec in sorted(scalar_panels, key=lambda p: "*" in p.match):
        claimed.update(match_names(pool, spec.hide))
        out[spec.id] = [s for s in match_names(pool, spec.match) if s not in claimed]
        claimed.update(out[spec.id])
    return out


def match_names(names: Iterable[str], patterns: Sequence[str]) -> list[str]:
    """Names matching any glob in ``patterns``, in pattern order then natural (window) order."""
    out: list[str] = []
    pool = list(names)
    for pattern in patterns:
        hits = sorted((n for n in pool if fnmatch.fnmatchcase(n, pattern)), key=natural_key)
        out.extend(h for h in hits if h not in out)
    return out


def natural_key(text: str) -> tuple[Any, ...]:
    """Sort key that orders embedded integers numerically (``w16`` before ``w128``)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def window_of(name: str) -> str:
    """The window suffix of a windowed SED key (``sed.gap_ratio.w32`` -> ``w32``), or ``""``."""
    m = re.search(r"\.(w\d+)$", name)
    return m.group(1) if m else ""


def first_at_least(
    steps: Sequence[int], values: Sequence[float | None], threshold: float
) -> int | None:
    """First step whose value is >= ``threshold`` (None values skipped), or None."""
    for s, v in zip(steps, values, strict=True):
        if v is not None and v >= threshold:
            return int(s)
    return None


def phase_spans(steps: Sequence[int], codes: Sequence[float | None]) -> list[tuple[int, int, int]]:
    """Contiguous ``(start, end, code)`` runs of a phase series (unknown/None codes break runs).

    A span ends where the next one starts, so bands tile the axis without gaps.
    """
    spans: list[tuple[int, int, int]] = []
    cur: int | None = None
    start = 0
    for s, c in zip(steps, codes, strict=True):
        code = None if c is None or not math.isfinite(c) else round(c)
        if code not in PHASES:
            code = None
        if code != cur:
            if cur is not None:
                spans.append((start, int(s), cur))
            cur, start = code, int(s)
    if cur is not None and steps:
        spans.append((start, int(steps[-1]), cur))
    return spans


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


def rounded(values: Sequence[float | None], digits: int = 6) -> list[float | None]:
    """Values rounded to ``digits`` significant digits (smaller JSON; plots cannot show more).

    None and non-finite values come back as None. Vectorised: ``round(v * 10^k) / 10^k`` with
    ``k = digits - 1 - floor(log10 |v|)`` is the double nearest the rounded decimal, whose
    shortest repr is that decimal.
    """
    if not values:
        return []
    v = np.array([np.nan if x is None else x for x in values], dtype=np.float64)
    finite = np.isfinite(v) & (v != 0) & (np.abs(v) < 10.0**digits)  # big values stay as they are
    scale = np.ones_like(v)
    with np.errstate(divide="ignore", invalid="ignore"):
        exp = digits - 1 - np.floor(np.log10(np.abs(v[finite])))
    scale[finite] = 10.0**exp
    out = np.where(finite, np.round(v * scale) / scale, v)
    return [None if not math.isfinite(x) else x for x in out.tolist()]


# --- figure builders -----------------------------------------------------------------------


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


def plot_text(text: str, limit: int = 120) -> str:
    """User text (layer, metric, run and scalar names) for plotly.js labels, which render a
    subset of HTML (``<a href>``, ``<b>``, ``<br>``): ``& < >`` become entities, so a name shows
    as written and cannot add a link; cut to ``limit`` characters with an ellipsis."""
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _layout(
    title: str, *, x_title: str = "step", y_title: str = "", log_y: bool = False
) -> dict[str, Any]:
    return {
        "title": {"text": plot_text(title, 160), "x": 0.01, "font": {"size": 14}},
        "margin": {"l": 60, "r": 20, "t": 40, "b": 45},
        "xaxis": {"title": {"text": plot_text(x_title)}, "zeroline": False},
        "yaxis": {
            "title": {"text": plot_text(y_title)},
            "type": "log" if log_y else "linear",
            "zeroline": False,
        },
        "legend": {"orientation": "h", "y": -0.18, "font": {"size": 11}},
        "hovermode": "x unified",
        "uirevision": title,  # keep zoom/legend state across live refreshes
        "shapes": [],
        "annotations": [],
    }


def line_figure(
    title: str,
    lines: Sequence[Line],
    *,
    y_title: str = "",
    log_y: bool = False,
    markers: Sequence[Marker] = (),
    bands: Sequence[Band] = (),
    y_band: tuple[float, float] | None = None,
) -> Figure:
    """Lines over steps with optional vertical markers, shaded x-bands and a shaded y-range."""
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


def phase_bands(steps: Sequence[int], codes: Sequence[float | None]) -> list[Band]:
    """Shaded bands for the rise/plateau/collapse phases of a ``sed.phase`` series."""
    return [Band(a, b, PHASES[c][0], PHASES[c][1]) for a, b, c in phase_spans(steps, codes)]


def overview_markers(
    warning_step: int | None,
    crossing_step: int | None,
    crossing_name: str,
    alerts: Sequence[Mapping[str, Any]] = (),
    *,
    warning_hover: str = "",
) -> list[Marker]:
    """Early-warning and val-accuracy markers (with the lead time between them) plus alerts;
    ``warning_hover`` (the detector's evidence) is the early-warning marker's hover text."""
    out: list[Marker] = []
    if warning_step is not None:
        lead = ""
        if crossing_step is not None:
            lead = f" (lead {crossing_step - warning_step:+d} steps)"
        hover = plot_text(warning_hover, 400)
        out.append(Marker(warning_step, "early warning" + lead, "#9467bd", "dot", hover))
    if crossing_step is not None:
        out.append(
            Marker(
                crossing_step,
                f"{plot_text(crossing_name, 60)} ≥ {VAL_ACC_THRESHOLD:g}",
                "#2ca02c",
                "dash",
            )
        )
    labelled: set[str] = set()
    for a in alerts:
        color = SEVERITY_COLORS.get(str(a.get("severity", "warning")), "#ff7f0e")
        rule = str(a.get("rule", "alert"))
        label = "" if rule in labelled else f"⚠ {plot_text(rule, 60)}"  # one per rule
        labelled.add(rule)
        hover = f"{a.get('rule')} {a.get('layer') or ''}: {a.get('message') or ''}".strip()
        out.append(Marker(int(a["step"]), label, color, "dashdot", plot_text(hover, 400)))
    return out


NONFINITE_COLOR = "#a40e26"
NONFINITE_KINDS = {
    "weights": "weights",
    "activations": "activations",
    "update_sketch": "update sketches",
    "param_sketch": "parameter sketches",
}


def nonfinite_note(
    onsets: Mapping[str, tuple[int, str]], layers: Iterable[str] | None = None
) -> str:
    """Why a run's per-layer series stop early: ``onsets`` (``{layer: (first step, frame
    kind)}`` of NaN/Inf data, see ``dashboard_reads.nonfinite_onsets``) as one sentence per frame
    kind, e.g. "weights non-finite (NaN/Inf) from step 61 in fc1, fc2: HT-SR and the other
    analyses skip them, so their series end at the last finite frame". ``layers``: only those
    (all when None); "" when none of them went non-finite."""
    wanted = None if layers is None else set(layers)
    by_kind: dict[str, list[tuple[int, str]]] = {}
    for layer, (step, kind) in onsets.items():
        if wanted is None or layer in wanted:
            by_kind.setdefault(kind, []).append((step, layer))
    parts = []
    for kind, hits in sorted(by_kind.items(), key=lambda kv: min(kv[1])):
        first = min(step for step, _ in hits)
        names = sorted((layer for _, layer in hits), key=natural_key)
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        parts.append(
            f"{NONFINITE_KINDS.get(kind, kind)} non-finite (NaN/Inf) from step {first} in {shown}"
        )
    if not parts:
        return ""
    return (
        "; ".join(parts)
        + ": HT-SR and the other analyses skip non-finite layers, so their series end at the"
        " last finite frame."
    )


def scalar_onsets(client_stats: Any) -> dict[str, tuple[int, str]]:
    """``{scalar: (first step, "nan"|"inf"|"-inf")}`` from a run's client stats
    (``nonfinite_scalars``: the client sends no NaN/Inf value, only where each began); entries
    of another shape are skipped (the stats are the client's JSON)."""
    raw = client_stats.get("nonfinite_scalars") if isinstance(client_stats, Mapping) else None
    out: dict[str, tuple[int, str]] = {}
    for name, onset in raw.items() if isinstance(raw, Mapping) else ():
        step = onset.get("step") if isinstance(onset, Mapping) else None
        if isinstance(name, str) and isinstance(step, int) and not isinstance(step, bool):
            value = onset.get("value")
            out[name] = (step, value if value in ("nan", "inf", "-inf") else "nan")
    return out


def scalar_onset_line(line: Line, step: int, value: str) -> Line:
    """One red point where scalar ``line`` went non-finite (its line just ends there: the client
    does not send NaN/Inf), at its last finite value before ``step``; in the legend as
    "loss: nan from step 61" (TensorBoard marks non-finite points on its charts likewise)."""
    before = [y for x, y in zip(line.x, line.y, strict=True) if x <= step and y is not None]
    finite = [y for y in line.y if y is not None]
    y = before[-1] if before else (finite[0] if finite else 0.0)
    return Line(f"{line.name}: {value} from step {step}", [step], [y], color=NONFINITE_COLOR)


def scalar_onset_marker(name: str, step: int, value: str) -> Marker:
    """A red vertical line at ``step`` for scalar ``name`` that was non-finite from its first
    logged step: the client sent no value of it at all, so there is no line whose end a point
    could mark."""
    label = f"{name}: {value} from step {step}"
    return Marker(step, plot_text(label, 60), NONFINITE_COLOR, "solid", plot_text(label, 200))


def scalar_onsets_note(
    onsets: Mapping[str, tuple[int, str]],
    names: Iterable[str],
    drawn: Container[str] | None = None,
) -> str:
    """One sentence on the scalars of ``names`` that went non-finite, "" when none did.
    ``drawn``: the names with a line (finite values before their onset); the others (all when
    None: every name has one) were non-finite from their first logged step."""
    hits = sorted((onsets[n][0], n, onsets[n][1]) for n in names if n in onsets)
    if not hits:
        return ""
    ended = [h for h in hits if drawn is None or h[1] in drawn]
    never = [h for h in hits if h not in ended]
    parts = [f"{name} became {value} at step {step}" for step, name, value in ended]
    parts += [
        f"{name} was {value} from its first logged step, {step}" for step, name, value in never
    ]
    if not never:
        why = "the line ends there (red point)"
    elif not ended:
        why = "there is no line to draw (red line at that step)"
    else:
        why = "a line ends there (red point) or is not drawn at all (red line)"
    return "; ".join(parts) + f": the client sends no NaN/Inf value, so {why}."


def nonfinite_marker(
    onsets: Mapping[str, tuple[int, str]], layers: Iterable[str] | None = None
) -> Marker | None:
    """A marker at the first step where ``layers`` (all when None) went NaN/Inf, or None."""
    wanted = None if layers is None else set(layers)
    steps = [step for layer, (step, _) in onsets.items() if wanted is None or layer in wanted]
    if not steps:
        return None
    first = min(steps)
    return Marker(
        first,
        f"non-finite from step {first}",
        NONFINITE_COLOR,
        "solid",
        plot_text(nonfinite_note(onsets, layers), 400),
    )


@dataclass(frozen=True)
class Grid:
    """A layer x step matrix: ``z[i][j]`` is ``layers[i]`` at ``steps[j]`` (None = missing;
    rounded to 6 significant digits by :func:`grid_from_rows`)."""

    layers: list[str]
    steps: list[int]
    z: list[list[float | None]]


def grid_from_rows(rows: Iterable[tuple[str, int, float | None]]) -> Grid:
    """Pivot ``(layer, step, value)`` rows into a :class:`Grid` (layers in natural order),
    values rounded by :func:`rounded` (vectorised over the whole grid: heatmaps hold ~10^4-10^5
    cells)."""
    cells = list(rows)
    lay = sorted({c[0] for c in cells}, key=natural_key)
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
    log_color = bool(values) and min(values) > 0 and max(values) >= LOG_COLOR_SPAN * min(values)
    if log_color:
        title += " · log colour scale"
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
        # hover and CSV keep the values (customdata)
        lo, hi = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
        decades = list(range(lo, hi + 1))
        heat["z"] = [[_log10(v) for v in row] for row in grid.z]
        heat["customdata"] = grid.z
        heat["hovertemplate"] = heat["hovertemplate"].replace("%{z:.4g}", "%{customdata:.4g}")
        heat["colorbar"].update({"tickvals": decades, "ticktext": [f"1e{k}" for k in decades]})
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


def _log10(value: float | None) -> float | None:
    return math.log10(value) if value is not None and math.isfinite(value) and value > 0 else None


def _num(value: Any) -> float | None:
    """A finite float from a JSON payload value, else None (payloads store NaN/Inf as null)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _floats(values: Any) -> list[float | None]:
    return [_num(v) for v in values] if isinstance(values, list) else []


def _bins(payload: Mapping[str, Any]) -> tuple[list[float], list[float], list[float], list[int]]:
    """``(left edges, right edges, density, counts)`` of the valid bins of an ESD histogram."""
    hist = payload.get("hist") or {}
    edges = _floats(hist.get("edges"))
    density = _floats(hist.get("density"))
    counts = [int(c) if isinstance(c, (int, float)) else 0 for c in hist.get("counts", [])]
    lo, hi, d, c = [], [], [], []
    for i in range(min(len(edges) - 1, len(density))):
        a, b, y = edges[i], edges[i + 1], density[i]
        if a is None or b is None or y is None:
            continue
        lo.append(a)
        hi.append(b)
        d.append(y)
        c.append(counts[i] if i < len(counts) else 0)
    return lo, hi, d, c


def _xy(part: Mapping[str, Any], ykey: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for x, y in zip(_floats(part.get("x")), _floats(part.get(ykey)), strict=False):
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def esd_figure(payload: Mapping[str, Any], title: str) -> Figure:
    """ESD on log-log axes (``htsr.esd_payload``): histogram density, power-law fit, xmin line."""
    xs, ys = _density_points(payload)
    data: list[dict[str, Any]] = [
        {
            "type": "scatter",
            "mode": "lines+markers",
            "name": "ESD (density)",
            "x": xs,
            "y": ys,
            "line": {"shape": "hvh", "width": 1.4, "color": "#1f77b4"},
            "marker": {"size": 4},
        },
    ]
    layout = _layout(title, x_title="eigenvalue λ", y_title="density", log_y=True)
    layout["xaxis"]["type"] = "log"
    layout["hovermode"] = "closest"
    fit = payload.get("fit") or {}
    alpha, xmin = _num(fit.get("alpha")), _num(fit.get("xmin"))
    if alpha is not None and xmin is not None and xmin > 0:
        fx, fy = _xy(fit, "pdf")
        data.append(
            {
                "type": "scatter",
                "mode": "lines",
                "name": f"power law \u03b1={alpha:.3f}",
                "x": fx,
                "y": fy,
                "line": {"dash": "dash", "color": "#d62728", "width": 2},
            }
        )
        _vline(layout, xmin, f"xmin={xmin:.3g}", "#d62728", 1.0)
    lam = _num(payload.get("lambda_max"))
    if lam is not None and lam > 0:
        layout["annotations"].append(
            {
                "x": math.log10(lam),
                "y": 0.9,
                "xref": "x",
                "yref": "paper",
                "showarrow": False,
                "text": f"λmax={lam:.3g}",
                "xanchor": "right",
                "font": {"size": 10},
            }
        )
    return {"data": data, "layout": layout}


def _density_points(payload: Mapping[str, Any]) -> tuple[list[float], list[float]]:
    """Geometric bin centres and densities of an ESD histogram's non-empty bins (log-log)."""
    xs, ys = [], []
    for a, b, d in zip(*_bins(payload)[:3], strict=True):
        if d > 0 and a > 0:
            xs.append(math.sqrt(a * b))
            ys.append(d)
    return xs, ys


def _vline(layout: dict[str, Any], x: float, text: str, color: str, y: float) -> None:
    """A dotted vertical line at ``x`` on a log x axis, labelled at height ``y`` (paper)."""
    layout["shapes"].append(
        {
            "type": "line",
            "xref": "x",
            "yref": "paper",
            "x0": x,
            "x1": x,
            "y0": 0,
            "y1": 1,
            "line": {"color": color, "dash": "dot", "width": 1.2},
        }
    )
    layout["annotations"].append(  # annotation x on a log axis is in log10 units
        {
            "x": math.log10(x),
            "y": y,
            "xref": "x",
            "yref": "paper",
            "showarrow": False,
            "text": text,
            "xanchor": "left",
            "yanchor": "top",
            "font": {"size": 10, "color": color},
        }
    )


def traps_figure(payload: Mapping[str, Any], title: str) -> Figure:
    """The ESD against the ESD of the same weight with its entries shuffled (log-log), with the
    shuffled ESD's MP edge: shuffled eigenvalues past it are correlation traps."""
    traps = payload.get("traps") or {}
    if not isinstance(traps, Mapping) or not traps.get("hist"):
        return {}
    xs, ys = _density_points(payload)
    rx, ry = _density_points(traps)
    data: list[dict[str, Any]] = [
        {
            "type": "scatter",
            "mode": "lines",
            "name": "ESD",
            "x": xs,
            "y": ys,
            "line": {"shape": "hvh", "width": 1.4, "color": "#1f77b4"},
        },
        {
            "type": "scatter",
            "mode": "lines",
            "name": "ESD of the shuffled weight",
            "x": rx,
            "y": ry,
            "line": {"shape": "hvh", "width": 1.4, "color": "#9467bd"},
        },
    ]
    layout = _layout(title, x_title="eigenvalue λ", y_title="density", log_y=True)
    layout["xaxis"]["type"] = "log"
    layout["hovermode"] = "closest"
    edge = _num(traps.get("bulk_max"))
    n_traps = int(_num(traps.get("num_traps")) or 0)
    if edge is not None and edge > 0:
        _vline(layout, edge, f"shuffled λ+={edge:.3g} · {n_traps} trap(s)", "#9467bd", 1.0)
    lam = _num(traps.get("lambda_max"))
    if lam is not None and lam > 0 and n_traps:
        _vline(layout, lam, f"shuffled λmax={lam:.3g}", "#d62728", 0.9)
    return {"data": data, "layout": layout}


def _linear_bins(
    payload: Mapping[str, Any],
) -> tuple[list[float], list[float], list[float], list[int]]:
    """``(left edges, right edges, density, counts)`` of the ESD in equal bins
    (``linear_hist``: counts over ``[lo, hi]``), density = counts / (all * width); payloads
    stored before it existed fall back to the log-spaced bins (:func:`_bins`)."""
    part = payload.get("linear_hist")
    part = part if isinstance(part, Mapping) else {}
    lo, hi = _num(part.get("lo")), _num(part.get("hi"))
    raw = part.get("counts")
    counts = [int(c) for c in raw if isinstance(c, int | float)] if isinstance(raw, list) else []
    total = sum(counts)
    if lo is None or hi is None or not hi > lo or not counts or total <= 0:
        return _bins(payload)
    width = (hi - lo) / len(counts)
    left = [lo + i * width for i in range(len(counts))]
    return left, [x + width for x in left], [c / (total * width) for c in counts], counts


def mp_figure(payload: Mapping[str, Any], title: str) -> Figure:
    """ESD on linear axes (equal bins) against the fitted Marchenko-Pastur density: λ+ and the
    spikes past it. The y axis stops a little above the histogram, so an MP density that
    diverges at 0 (a square matrix's, Q = 1) does not flatten the bars."""
    lo, hi, density, counts = _linear_bins(payload)
    mp = payload.get("mp") or {}
    bulk_max = _num(mp.get("bulk_max"))
    edge = bulk_max if bulk_max is not None else math.inf
    centers = [(a + b) / 2 for a, b in zip(lo, hi, strict=True)]
    widths = [b - a for a, b in zip(lo, hi, strict=True)]
    beyond = [i for i, c in enumerate(centers) if c > edge and counts[i] > 0]
    # Red: the bins of the ``num_spikes`` largest eigenvalues (past lambda+ and its Tracy-Widom
    # pad, as the metric counts them), so the bars agree with the "n spike(s)" label; an
    # eigenvalue just past lambda+, within the pad, stays in the bulk. Without a count (older
    # payloads), every bin past lambda+.
    declared = _num(mp.get("num_spikes"))
    spikes = beyond
    if declared is not None:
        left, spikes = int(declared), []
        for i in reversed(beyond):
            if left <= 0:
                break
            spikes.insert(0, i)
            left -= counts[i]
    inside = [
        i for i in range(len(centers)) if i not in spikes and (i in beyond or centers[i] <= edge)
    ]
    data: list[dict[str, Any]] = [
        {
            "type": "bar",
            "name": "ESD bulk",
            "x": [centers[i] for i in inside],
            "y": [density[i] for i in inside],
            "width": [widths[i] for i in inside],
            "marker": {"color": "#1f77b4"},
            "opacity": 0.75,
        },
    ]
    if spikes:
        data.append(
            {
                "type": "bar",
                "name": "beyond λ+ (spikes)",
                "x": [centers[i] for i in spikes],
                "y": [density[i] for i in spikes],
                "width": [widths[i] for i in spikes],
                "customdata": [counts[i] for i in spikes],
                "marker": {"color": "#d62728"},
                "hovertemplate": "λ≈%{x:.3g}: %{customdata} eigenvalue(s)<extra></extra>",
            }
        )
    layout = _layout(title, x_title="eigenvalue λ", y_title="density")
    layout["hovermode"] = "closest"
    layout["bargap"] = 0
    sigma = _num(mp.get("sigma"))
    if bulk_max is not None:
        mx, my = _xy(mp, "pdf")
        data.append(
            {
                "type": "scatter",
                "mode": "lines",
                "name": "Marchenko-Pastur" + (f" \u03c3={sigma:.3g}" if sigma is not None else ""),
                "x": mx,
                "y": my,
                "line": {"color": "#ff7f0e", "width": 2},
            }
        )
        n_spikes = int(_num(mp.get("num_spikes")) or 0)
        layout["shapes"].append(
            {
                "type": "line",
                "xref": "x",
                "yref": "paper",
                "x0": bulk_max,
                "x1": bulk_max,
                "y0": 0,
                "y1": 1,
                "line": {"color": "#ff7f0e", "dash": "dash", "width": 1.5},
            }
        )
        top = max(density, default=0.0)
        if top > 0 and max(my, default=0.0) > 1.5 * top:
            layout["yaxis"]["range"] = [0, 1.3 * top]
        layout["annotations"].append(
            {
                "x": bulk_max,
                "y": 1,
                "xref": "x",
                "yref": "paper",
                "showarrow": False,
                "text": f"λ+={bulk_max:.3g} · {n_spikes} spike(s)",
                "xanchor": "left",
                "yanchor": "top",
                "font": {"size": 10, "color": "#ff7f0e"},
            }
        )
    return {"data": data, "layout": layout}


def heatmap_click_target(run_id: int, layer: str, metric: str, step: int | None) -> str:
    """The drilldown URL a heatmap cell click goes to (the browser builds the same one)."""
    query = {"metric": metric}
    if step is not None:
        query["step"] = str(step)
    return f"/runs/{run_id}/layers/{quote(layer, safe='')}?{urlencode(query)}"


def alerts_timeline_figure(alerts: Sequence[Mapping[str, Any]], last_step: int | None) -> Figure:
    """Alert episodes over steps, one row per rule: a segment from firing to resolution."""
    data: list[dict[str, Any]] = []
    by_severity: dict[str, list[Mapping[str, Any]]] = {}
    for a in alerts:
        by_severity.setdefault(str(a.get("severity", "warning")), []).append(a)
    for severity, rows in sorted(by_severity.items()):
        xs: list[int | None] = []
        ys: list[str | None] = []
        texts: list[str | None] = []
        for a in rows:
            end = a.get("resolved_step")
            if end is None:
                end = max(int(a["step"]), last_step or int(a["step"]))
            label = plot_text(f"{a['rule']} {a.get('layer') or ''}".strip(), 10_000)
            message = plot_text(str(a.get("message") or ""), 300)
            text = f"{label}<br>{plot_text(str(a.get('status')))} · {message}"
            xs += [int(a["step"]), int(end), None]
            ys += [label, label, None]
            texts += [text, text, None]
        data.append(
            {
                "type": "scatter",
                "mode": "lines+markers",
                "name": severity,
                "x": xs,
                "y": ys,
                "text": texts,
                "hoverinfo": "text+x",
                "line": {"width": 6, "color": SEVERITY_COLORS.get(severity, "#7f7f7f")},
                "marker": {"size": 9, "symbol": "diamond"},
            }
        )
    layout = _layout("Alert episodes", y_title="rule · layer")
    layout["hovermode"] = "closest"
    layout["yaxis"].update({"type": "category", "automargin": True})
    return {"data": data, "layout": layout}


@dataclass
class Panel:
    """What the browser receives for one panel: a figure or an empty-state message."""

    id: str
    title: str
    figure: Figure | None = None
    empty: str = ""
    help: str = ""
    csv_name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "figure": self.figure,
            "empty": self.empty,
            "help": self.help,
            "csv_name": self.csv_name or self.id,
            **self.extra,
        }


def panel_from(spec: PanelSpec, figure: Figure | None, *, empty: str | None = None) -> Panel:
    """A :class:`Panel` for ``spec``: the figure if it has data, else the spec's empty state."""
    has_data = figure is not None and any(_trace_has_data(t) for t in figure.get("data", []))
    return Panel(
        id=spec.id,
        title=spec.title,
        figure=figure if has_data else None,
        empty="" if has_data else (empty or spec.empty),
        help=spec.help,
    )


def _trace_has_data(trace: Mapping[str, Any]) -> bool:
    if trace.get("type") == "heatmap":
        return any(v is not None for row in trace.get("z", []) for v in row)
    return any(v is not None for v in trace.get("y", []))
