"""Alert figures: the colours of alert severities (shared with the overview's alert markers)
and the timeline of alert episodes, one row per rule, a segment from firing to resolution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from spectrawatch_server.figures.base import Figure, _layout, natural_key, plot_text
from spectrawatch_server.figures.keys import layer_text

SEVERITY_COLORS = {  # none of them a data line's colour (figures.base.DATA_COLORS)
    "critical": "#d62728",
    "error": "#d62728",
    "warning": "#ff7f0e",
    "info": "#5f6b7a",
}


# the CSV of the timeline (the page's figureCsv): the trace's name, its customdata row, the step
TIMELINE_CSV = ("severity", "rule", "layer", "status", "step")


def alerts_timeline_figure(alerts: Sequence[Mapping[str, Any]], last_step: int | None) -> Figure:
    """Alert episodes over steps, one row per rule and layer: a segment from firing to
    resolution. Rows in natural order (``blocks.2`` before ``blocks.10``), their list in
    ``yaxis.categoryarray`` (the page gives each row its own height from it). Each point's
    ``customdata`` is its ``[rule, layer, status]`` as stored (the labels are HTML-escaped)
    and the trace's ``meta.csv`` the CSV header: :data:`TIMELINE_CSV`."""
    data: list[dict[str, Any]] = []
    labels: set[str] = set()
    by_severity: dict[str, list[Mapping[str, Any]]] = {}
    for a in alerts:
        by_severity.setdefault(str(a.get("severity", "warning")), []).append(a)
    for severity, rows in sorted(by_severity.items()):
        xs: list[int | None] = []
        ys: list[str | None] = []
        texts: list[str | None] = []
        raw: list[list[str] | None] = []
        for a in rows:
            end = a.get("resolved_step")
            if end is None:
                end = max(int(a["step"]), last_step or int(a["step"]))
            label = plot_text(f"{a['rule']} {layer_text(a.get('layer'))}".strip(), 10_000)
            message = plot_text(str(a.get("message") or ""), 300)
            text = f"{label}<br>{plot_text(str(a.get('status')))} · {message}"
            labels.add(label)
            xs += [int(a["step"]), int(end), None]
            ys += [label, label, None]
            texts += [text, text, None]
            stored = [str(a["rule"]), str(a.get("layer") or ""), str(a.get("status"))]
            raw += [stored, stored, None]
        data.append(
            {
                "type": "scatter",
                "mode": "lines+markers",
                "name": severity,
                "x": xs,
                "y": ys,
                "text": texts,
                "customdata": raw,
                "meta": {"csv": list(TIMELINE_CSV)},
                "hoverinfo": "text+x",
                "line": {"width": 6, "color": SEVERITY_COLORS.get(severity, "#7f7f7f")},
                "marker": {"size": 9, "symbol": "diamond"},
            }
        )
    layout = _layout("Alert episodes", y_title="rule · layer")
    layout["hovermode"] = "closest"
    order = sorted(labels, key=natural_key, reverse=True)  # the first row at the top
    layout["yaxis"].update(
        {
            "type": "category",
            "automargin": True,
            "categoryorder": "array",
            "categoryarray": order,
            "dtick": 1,  # every row labelled: the page is as tall as the rows need
        }
    )
    return {"data": data, "layout": layout}
