"""Alert figures: the colours of alert severities (shared with the overview's alert markers)
and the timeline of alert episodes, one row per rule, a segment from firing to resolution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from spectrawatch_server.figures.base import Figure, _layout, plot_text

SEVERITY_COLORS = {
    "critical": "#d62728",
    "error": "#d62728",
    "warning": "#ff7f0e",
    "info": "#1f77b4",
}


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
