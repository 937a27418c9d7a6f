"""The run overview's marks: the SED phases (rise/plateau/collapse) as shaded bands, the
first step where validation accuracy reaches its threshold, and markers for the early warning,
that crossing (with the lead time between them) and alerts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from spectrawatch_server.figures.alerts import SEVERITY_COLORS
from spectrawatch_server.figures.base import plot_text
from spectrawatch_server.figures.keys import VAL_ACC_THRESHOLD
from spectrawatch_server.figures.lines import Band, Marker

EARLY_WARNING_COLOR = "#000000"  # marker colours: none is a data line's (base.DATA_COLORS)
CROSSING_COLOR = "#555555"

# Phase codes of ``sed.phase`` (spectrawatch.spectral.sed.Phase): paper §3 rise/plateau/collapse.
PHASES: dict[int, tuple[str, str]] = {
    1: ("rise", "rgba(46, 160, 67, 0.13)"),
    2: ("plateau", "rgba(130, 130, 130, 0.13)"),
    3: ("collapse", "rgba(214, 39, 40, 0.15)"),
}


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
    threshold: float = VAL_ACC_THRESHOLD,
) -> list[Marker]:
    """Early-warning and val-accuracy markers (with the lead time between them) plus alerts,
    in colours no data line has;
    ``warning_hover`` (the detector's evidence) is the early-warning marker's hover text,
    ``threshold`` the accuracy the crossing reached (90 for one logged in percent)."""
    out: list[Marker] = []
    if warning_step is not None:
        lead = ""
        if crossing_step is not None:
            lead = f" (lead {crossing_step - warning_step:+d} steps)"
        hover = plot_text(warning_hover, 400)
        out.append(Marker(warning_step, "early warning" + lead, EARLY_WARNING_COLOR, "dot", hover))
    if crossing_step is not None:
        out.append(
            Marker(
                crossing_step,
                f"{plot_text(crossing_name, 60)} ≥ {threshold:g}",
                CROSSING_COLOR,
                "dash",
            )
        )
    for a in alerts:  # each labelled: line_figure joins a rule's labels that would overlap
        color = SEVERITY_COLORS.get(str(a.get("severity", "warning")), SEVERITY_COLORS["warning"])
        label = f"⚠ {plot_text(str(a.get('rule', 'alert')), 60)}"
        hover = f"{a.get('rule')} {a.get('layer') or ''}: {a.get('message') or ''}".strip()
        out.append(Marker(int(a["step"]), label, color, "dashdot", plot_text(hover, 400)))
    return out
