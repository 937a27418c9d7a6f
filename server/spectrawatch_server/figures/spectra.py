"""Spectrum figures of one weight from its stored ESD payload (``htsr.esd_payload``; NaN/Inf
stored as null): the ESD on log-log axes with its power-law fit (:func:`esd_figure`), against
the ESD of the same weight shuffled (correlation traps, :func:`traps_figure`), and on linear
axes against the fitted Marchenko-Pastur density (:func:`mp_figure`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from spectrawatch_server.figures.base import VALUE_AXIS_FORMAT, Figure, _layout


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
    layout["xaxis"].update(type="log", **VALUE_AXIS_FORMAT)  # decades in powers of ten
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
    layout["xaxis"].update(type="log", **VALUE_AXIS_FORMAT)  # decades in powers of ten
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
