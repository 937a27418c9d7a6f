"""Dashboard pages: definitions (``dashboards/pages/*.json``, shipped as
``spectrawatch_server.dashboards``) are parsed by :func:`parse_page`; each panel names a plot
``kind`` and the metric keys it shows (glob patterns, matched against the run's metric names by
:func:`match_names`). A :class:`Panel` is what the browser receives for one panel: a figure or
an empty-state message.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from spectrawatch_server.figures.base import Figure, natural_key

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


def _is_step_chart(figure: Figure) -> bool:
    layout = figure.get("layout", {})
    step_axis = layout.get("xaxis", {}).get("title", {}).get("text") == "step"
    return step_axis and all(t.get("type") != "heatmap" for t in figure.get("data", []))


def share_step_range(panels: Sequence[Panel], steps: Iterable[int] = ()) -> tuple[float, float]:
    """Give every step-axis line chart of ``panels`` one x range: from the first to the last
    step any of them draws or marks (and ``steps``: the runs' last steps), padded 2 %; so a
    "non-finite from step 230" line sits at one place on each. Such panels get ``shared_x``
    (the page links their zoom). Returns the range ((0, 1) when none has a step)."""
    charts = [(p, p.figure) for p in panels if p.figure is not None and _is_step_chart(p.figure)]
    xs: list[float] = [int(s) for s in steps]
    for _, figure in charts:
        for trace in figure["data"]:
            xs += [x for x in trace.get("x", []) if isinstance(x, (int, float))]
        xs += [s["x0"] for s in figure["layout"].get("shapes", []) if s.get("xref") == "x"]
    lo, hi = (min(xs), max(xs)) if xs else (0, 1)
    pad = max(0.5, (hi - lo) * 0.02)
    shared = (lo - pad, hi + pad)
    for panel, figure in charts:
        figure["layout"]["xaxis"]["range"] = list(shared)
        panel.extra["shared_x"] = True
    return shared
