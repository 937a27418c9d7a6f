"""The dashboards' figure API (``/api/v1/dashboards/...``): each page's Plotly figures, built by
:mod:`spectrawatch_server.figures` from the downsampled reads of
:mod:`spectrawatch_server.storage.dashboard_reads`, behind the same auth as the rest of the
API; and the page definitions (``dashboards/pages/*.json``) and links both sides use.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode, urlsplit

from fastapi import APIRouter, Query
from fastapi.responses import Response
from sqlalchemy.orm import Session

from spectrawatch.wire import DOT_NAMES
from spectrawatch_server import figures as dash
from spectrawatch_server.alerts import rules as R
from spectrawatch_server.alerts.engine import read_evidence
from spectrawatch_server.api.deps import (
    PrincipalDep,
    RunDep,
    SessionDep,
    find_run,
)
from spectrawatch_server.api.errors import ApiError
from spectrawatch_server.api.routes.alerts import find_project, list_rules
from spectrawatch_server.api.routes.runs import run_public, runs_public
from spectrawatch_server.db.models import Run, Scalar, Spectrum
from spectrawatch_server.storage import dashboard_reads as reads
from spectrawatch_server.storage import metric_reads
from spectrawatch_server.storage import repository as repo

HEATMAP_COLUMNS = 300  # steps sampled for the layer x step heatmap (about one per pixel column)
DEFAULT_POINTS = 1000
ACTIVATION_LINES = 12  # lines drawn per activations figure; more: a min-max band of all
ACTIVATION_POINTS = 60_000  # points per activations figure (legend-only lines included)
# stored points read per activations figure: a longer series is read at evenly spaced steps
ACTIVATION_READ_POINTS = 2 * ACTIVATION_POINTS
MIN_LINE_POINTS = 200
MAX_COMPARE_RUNS = 8
# the layer page's panels drawn from its HT-SR spectrum payload, by panel kind
SPECTRUM_FIGURES = {"esd": dash.esd_figure, "mp": dash.mp_figure, "traps": dash.traps_figure}
DELIVERIES_MASKED = (
    "Webhook URLs show their scheme and host only, and errors their first words: the rest"
    " needs an admin token (a webhook's URL is often a credential, and an error can quote it)."
)
NO_RUNS_PICKED = (
    "No runs picked: tick them on the runs list (/) and press “compare selected”, "
    "or open /compare?runs=1,2."
)


api_router = APIRouter(prefix="/dashboards", tags=["dashboards"])


def package_dir() -> Path:
    """The installed ``spectrawatch_server.dashboards`` folder (pages, templates, static).

    Read from the package's ``__path__``: an editable install maps the top-level ``dashboards/``
    folder in as a namespace-style package, which ``importlib.resources`` cannot open.
    """
    entries = list(
        getattr(importlib.import_module("spectrawatch_server.dashboards"), "__path__", [])
    )
    for entry in entries:
        if (Path(entry) / "templates").is_dir():
            return Path(entry)
    raise RuntimeError(f"dashboard assets not found in {entries}")


@cache
def pages() -> dict[str, dash.PageSpec]:
    """Every page definition of ``dashboards/pages/*.json``, parsed once."""
    out = {}
    for path in sorted((package_dir() / "pages").glob("*.json")):
        spec = dash.parse_page(json.loads(path.read_text(encoding="utf-8")))
        out[spec.id] = spec
    return out


@cache
def metric_docs() -> dict[str, dash.MetricHelp]:
    """``dashboards/metric_help.json``: docs/metrics.md's rows by key, read once."""
    path = package_dir() / "metric_help.json"
    return dash.load_metric_help(path.read_text(encoding="utf-8"))


def metrics_help(names: Sequence[str]) -> list[dict[str, Any]]:
    """The docs' help of ``names`` (those the docs have), one per docs row: the windows of one
    SED key share theirs."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        item = dash.help_public(metric_docs(), name)
        if item is not None and item["key"] not in out:
            out[item["key"]] = item
    return list(out.values())


def project_href(name: str) -> str:
    """The dashboard link of a project's runs: ``/projects/<name>`` with the name escaped as
    one path segment (``#``, ``?``, ``%``, space, ``\\``...), or ``/?project=<name>`` for ``.``
    and ``..``, which a browser resolves away as path segments even escaped (``%2E``); new
    projects cannot be named so, ones stored before can."""
    if name in DOT_NAMES:
        return "/?" + urlencode({"project": name})
    return "/projects/" + quote(name, safe="")


def rules_href(name: str) -> str:
    """The dashboard link of a project's alert rules (``.`` and ``..`` as a query, as
    :func:`project_href`)."""
    if name in DOT_NAMES:
        return "/alert-rules?" + urlencode({"project": name})
    return "/projects/" + quote(name, safe="") + "/alert-rules"


def warning_evidence(
    session: Session, run_id: int, warning: int | None
) -> tuple[dict[str, int | float], str]:
    """The detector's evidence where it fired (``{piece: step}``) and its one-line reading."""
    if warning is None:
        return {}, ""
    key = dash.WARNING_KEY
    evidence = read_evidence(session, run_id, dash.MODEL_LAYER, key, warning) or {}
    labels = R.evidence_sources()[key][1]
    return evidence, R.describe_evidence(evidence, labels) if evidence else ""


# --- series as plot lines (the SQL is in storage.dashboard_reads) -----------------------------


def layer_label(prefix: str = "") -> Callable[[reads.Key], str]:
    """Labels a line by its layer, after ``prefix``."""
    return lambda key: prefix + key[1]


def lines_of(
    series: reads.Series,
    name: str,
    label: str | Callable[[reads.Key], str] | None = None,
    styles: Mapping[str, int] | None = None,
    order: dash.LayerKey = dash.natural_key,
) -> list[dash.Line]:
    """The lines of series ``name`` in ``series`` (one per layer, in ``order``: the model's, see
    :func:`model_order`), each labelled ``label`` (a string, or a function of ``(name, layer)``;
    the layer by default), values rounded for the JSON; ``styles``: each layer's index in the
    page's list, whose :func:`~spectrawatch_server.figures.series_style` it takes in every
    chart."""
    label = label or layer_label()
    keys = sorted((k for k in series if k[0] == name), key=lambda k: order(k[1]))
    out = []
    for k in keys:
        text = label if isinstance(label, str) else label(k)
        line = dash.Line(text, series[k][0], dash.rounded(series[k][1]))
        if styles is not None and k[1] in styles:
            color, style = dash.series_style(styles[k[1]])
            line = replace(line, color=color, dash=style)
        out.append(line)
    return out


def styled(line: dash.Line, index: int) -> dash.Line:
    """``line`` in the page's ``index``-th colour and dash (a run's on the compare page)."""
    color, style = dash.series_style(index)
    return replace(line, color=color, dash=style)


def metric_series(
    session: Session, run_id: int, names: Sequence[str], layer: str | None, max_points: int
) -> reads.Series:
    """Metrics ``names`` (one layer if given) bucketed to about ``max_points`` points each."""
    return reads.bucketed_series(session, run_id, names, max(1, max_points // 2), layer=layer)


def scalar_lines(session: Session, run_id: int, max_points: int) -> dict[str, dash.Line]:
    """Every scalar of a run as a line, bucketed to about ``max_points`` points, by name."""
    names = reads.series_names(session, run_id, Scalar)
    series = reads.bucketed_series(session, run_id, names, max(1, max_points // 2), model=Scalar)
    return {n: line for n in names for line in lines_of(series, n, lambda k: k[0])}


def model_order(session: Session, run_id: int) -> dash.LayerKey:
    """The sort key of the run's layers in its model's order (``__model__`` first, layers no
    frame names after the others in natural order): ``embed`` before ``blocks.0``, ``blocks.2``
    before ``blocks.10``, ``head`` last, as W&B and TensorBoard list them."""
    return dash.model_order_key(reads.model_order(session, run_id))


def layer_options(
    session: Session, run_id: int, name: str, order: dash.LayerKey = dash.natural_key
) -> list[str]:
    """Every layer with metric ``name`` in ``order`` (a layer control's options): a series
    that stopped at a NaN (``__model__``'s, a layer's) while others went on is still offered;
    only layers at the latest step were, and the control lost them (and its default)."""
    return sorted(metric_reads.metric_layers(session, run_id, name), key=order)


def _points(max_points: int | None) -> int:
    return DEFAULT_POINTS if max_points is None else max(50, min(max_points, 5000))


Points = Annotated[int | None, Query(ge=3, le=100_000)]


def _choose(options: Sequence[str], requested: str | None, preferred: Sequence[str]) -> str | None:
    if requested in options:
        return requested
    for pattern in preferred:
        hits = dash.match_names(options, [pattern])
        if hits:
            return hits[0]
    return options[0] if options else None


def _json(body: dict[str, Any]) -> Response:
    """Compact strict JSON (figures are large: skip FastAPI's generic encoder)."""
    text_body = json.dumps(body, separators=(",", ":"), allow_nan=False, default=str)
    return Response(text_body, media_type="application/json")


def _base(session: Session, run: Run, page: dash.PageSpec) -> dict[str, Any]:
    public = run_public(session, run).model_dump(mode="json")
    return {
        "run": public,
        "page": {"id": page.id, "title": page.title},
        "controls": {},
        "tables": [],
    }


# --- figure API -------------------------------------------------------------------------------


@api_router.get("/runs/{run_id}/overview")
def read_overview(
    run: RunDep, session: SessionDep, sed_layer: str | None = None, max_points: Points = None
) -> Response:
    """Scalars, SED gap/edge per window with phase bands, early warning, alert markers."""
    page = pages()["overview"]
    n = _points(max_points)
    body = _base(session, run, page)
    names = reads.series_names(session, run.id)
    scalars = scalar_lines(session, run.id, n)
    crossing_name = next((s for s in sorted(scalars) if dash.VAL_ACC_PATTERN.match(s)), "")
    crossing = None
    threshold = dash.VAL_ACC_THRESHOLD
    if crossing_name:
        # the line keeps each bucket's max: its largest value is the series' (percent or not)
        values = [v for v in scalars[crossing_name].y if v is not None]
        threshold = dash.val_acc_threshold(max(values, default=None))
        crossing = reads.first_step_at_least(
            session, run.id, crossing_name, threshold, model=Scalar
        )
    warning = None
    if dash.WARNING_KEY in names:
        warning = reads.first_step_at_least(
            session, run.id, dash.WARNING_KEY, 0.5, layer=dash.MODEL_LAYER
        )
    evidence, why = warning_evidence(session, run.id, warning)
    alerts = reads.alert_rows(session, run.id)
    markers = dash.overview_markers(
        warning, crossing, crossing_name, alerts, warning_hover=why, threshold=threshold
    )
    onsets = reads.nonfinite_onsets(session, run.id)
    bad = dash.nonfinite_marker(onsets)
    if bad is not None:
        markers.append(bad)
    body["summary"] = {
        "early_warning_step": warning,
        "early_warning_evidence": evidence,
        "early_warning_reason": why,
        "val_acc_name": crossing_name,
        "val_acc_threshold": threshold,
        "val_acc_crossing_step": crossing,
        "lead_steps": None if warning is None or crossing is None else crossing - warning,
        "metric_names": len(names),
        "open_alerts": sum(  # as the runs list counts them: not acknowledged
            1 for a in alerts if a["status"] == "open" and a["acknowledged_at"] is None
        ),
        "nonfinite_step": None if bad is None else bad.step,
        "nonfinite_note": dash.nonfinite_note(onsets),
    }
    gap_names = dash.match_names(names, page.panel("sed_gap").match)
    order = model_order(session, run.id) if gap_names else dash.natural_key
    layer_opts = layer_options(session, run.id, gap_names[0], order) if gap_names else []
    layer = _choose(layer_opts, sed_layer, [dash.MODEL_LAYER])
    if layer_opts:
        body["controls"]["sed_layer"] = {
            "label": "SED layer",
            "options": layer_opts,
            "labels": [dash.layer_text(o) for o in layer_opts],
            "value": layer,
        }

    # Every metric series of the page in one bucketed read per layer (SED panels at the
    # chosen layer with their phase codes; the other line panels at the model level).
    phase_names = dash.match_names(names, [dash.PHASE_PREFIX + ".w*", dash.PHASE_PREFIX])[:1]
    wanted: dict[str | None, set[str]] = {}
    for spec in page.panels:
        if spec.kind in ("sed", "lines"):
            at = layer if spec.kind == "sed" else dash.MODEL_LAYER
            extra = phase_names if spec.kind == "sed" else []
            wanted.setdefault(at, set()).update(dash.match_names(names, spec.match), extra)
    series: dict[str | None, reads.Series] = {
        at: metric_series(session, run.id, sorted(group), at, n)
        for at, group in wanted.items()
        if group
    }
    # a scalar non-finite from its first logged step has no line (nulls only, or no rows from
    # an older client): its panel still marks it (scalar_panels)
    scalar_onsets = dash.scalar_onsets(run.client_stats)
    claimed = dash.claim_scalars(page.panels, [*scalars, *scalar_onsets])
    panels = []
    for spec in page.panels:
        if spec.kind == "scalars":
            panels += scalar_panels(
                spec, claimed[spec.id], scalars, scalar_onsets, markers, run.last_step
            )
        elif spec.kind == "sed":
            at_layer = series.get(layer, {})
            lines = []
            for name in dash.match_names(names, spec.match):
                lines += lines_of(at_layer, name, lambda k: dash.window_of(k[0]) or k[0])
            bands: list[dash.Band] = []
            if phase_names and lines:
                for key in (k for k in at_layer if k[0] == phase_names[0]):
                    bands = dash.phase_bands(*at_layer[key])
            title = spec.title + (f" · {dash.layer_text(layer)}" if layer else "")
            fig = dash.line_figure(
                title, lines, y_title=spec.y_title, log_y=spec.log_y, markers=markers, bands=bands
            )
            panel = dash.panel_from(spec, fig)
            panel.extra["metrics_help"] = metrics_help(dash.match_names(names, spec.match))
            panels.append(panel)
        else:
            model_level = series.get(dash.MODEL_LAYER, {})
            lines = []
            matched = dash.match_names(names, spec.match)
            for name in matched:
                lines += lines_of(model_level, name, lambda k: k[0])
            healthy = dash.healthy_band(matched)
            fig = dash.line_figure(
                spec.title,
                lines,
                y_title=spec.y_title,
                log_y=spec.log_y,
                markers=markers,
                y_band=None if healthy is None else healthy[:2],
                y_band_label="" if healthy is None else "healthy: " + healthy[2],
            )
            panel = dash.panel_from(spec, fig)
            panel.extra["metrics_help"] = metrics_help(matched)
            panels.append(panel)
    dash.share_step_range(panels, [run.last_step] if run.last_step is not None else [])
    body["panels"] = [p.public() for p in panels]
    return _json(body)


def scalar_panels(
    spec: dash.PanelSpec,
    chosen: Sequence[str],
    scalars: Mapping[str, dash.Line],
    onsets: Mapping[str, tuple[int, str]],
    markers: Sequence[dash.Marker],
    last_step: int | None,
) -> list[dash.Panel]:
    """The overview's panels of scalars ``chosen`` by ``spec``: one chart per group of like
    size (:func:`~spectrawatch_server.figures.group_by_magnitude`: a learning rate is not drawn
    flat under a grad norm), each scalar's red NaN point with its line; a scalar non-finite
    from its first step (no line) is a red line on the first chart."""
    drawn = dash.drawn_scalars(scalars)  # with a finite value: a NaN from the start has none
    visible = [s for s in chosen if s in drawn or (s in scalars and s not in onsets)]
    never = [
        dash.scalar_onset_marker(s, *onsets[s]) for s in chosen if s in onsets and s not in drawn
    ]
    groups = dash.group_by_magnitude([scalars[s] for s in visible]) or [[]]
    out = []
    for k, group in enumerate(groups):
        names = [line.name for line in group]
        lines = group + [
            dash.scalar_onset_line(scalars[s], *onsets[s]) for s in names if s in onsets
        ]
        sub = spec
        if len(groups) > 1:  # the first chart keeps the panel's id (links, tests, CSV name)
            title = f"{spec.title}: {', '.join(names)}"
            sub = replace(spec, id=spec.id if k == 0 else f"{spec.id}-{k + 1}", title=title)
        fig = dash.line_figure(
            sub.title,
            lines,
            y_title=spec.y_title,
            log_y=spec.log_y,
            markers=[*markers, *(never if k == 0 else [])],
        )
        panel = dash.panel_from(sub, fig)
        if panel.figure is None and never and k == 0:  # nothing finite: the red lines alone
            panel.figure, panel.empty = _markers_only(fig, never, last_step), ""
        # its scalars, and on the first chart those without a line
        mine = [s for s in chosen if s in names or (k == 0 and s not in visible)]
        note = dash.scalar_onsets_note(onsets, mine, drawn=drawn)
        if note and panel.figure is not None:
            panel.extra["note"] = note
        panel.extra["metrics_help"] = metrics_help(mine)
        out.append(panel)
    return out


def _frozen_note(
    unchanged: Mapping[str, int],
    layers: Sequence[str] | None = None,
    order: dash.LayerKey = dash.natural_key,
) -> str:
    """Why frozen layers' series stop early: ``unchanged`` (``{layer: step last sent}`` of the
    latest weight snapshot, ``repo.latest_unchanged``) of ``layers`` (all when None, named in
    ``order``) as one sentence, e.g. "frozen: unchanged since step 10 (base.0.weight): ..."; ""
    for none."""
    wanted = None if layers is None else set(layers)
    hits = sorted((step, la) for la, step in unchanged.items() if wanted is None or la in wanted)
    if not hits:
        return ""
    names = sorted((layer for _, layer in hits), key=order)
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    since = hits[0][0] if hits[0][0] == hits[-1][0] else f"{hits[0][0]}-{hits[-1][0]}"
    return (
        f"frozen: unchanged since step {since} ({shown}): the client sends a frozen weight again "
        "only when it changes, so its metrics are at the steps it was sent; the model means "
        "carry them forward."
    )


@api_router.get("/runs/{run_id}/layers")
def read_layers(
    run: RunDep,
    session: SessionDep,
    metric: str | None = None,
    columns: Annotated[int, Query(ge=10, le=2000)] = HEATMAP_COLUMNS,
) -> Response:
    """Layer x step heatmap of one metric (steps sampled to ``columns``)."""
    page = pages()["layers"]
    body = _base(session, run, page)
    names = [
        n for n in reads.series_names(session, run.id) if not dash.match_names([n], page.exclude)
    ]
    chosen = _choose(names, metric, page.preferred)
    spec = page.panel("heatmap")
    panel = dash.panel_from(spec, None)
    if chosen is not None:
        body["controls"]["metric"] = {"label": "metric", "options": names, "value": chosen}
        steps, skipped = reads.sampled_steps(
            session, run.id, chosen, columns, skip_layer=dash.MODEL_LAYER
        )
        cells = reads.grid_cells(session, run.id, chosen, steps)
        layer_cells = [c for c in cells if c[0] != dash.MODEL_LAYER]  # a model mean is no layer
        order = model_order(session, run.id)  # rows top to bottom as the forward pass runs
        grid = dash.grid_from_rows(layer_cells or cells, order)
        # layers gone NaN/Inf: their columns stop at the last finite frame; say so, and where
        onsets = reads.nonfinite_onsets(session, run.id)
        shown = [la for la in grid.layers if la in onsets] or None
        marker = dash.nonfinite_marker(onsets, shown, order)
        figure = dash.heatmap_figure(chosen, grid, sampled=skipped, marker=marker)
        panel = dash.panel_from(spec, figure)
        panel.extra["click"] = {"kind": "layer_drilldown", "metric": chosen}
        frozen = _frozen_note(repo.latest_unchanged(session, run.id)[1], grid.layers, order)
        notes = [dash.nonfinite_note(onsets, shown, order), frozen]
        panel.extra["note"] = " ".join(n for n in notes if n)
        panel.extra["metrics_help"] = metrics_help([chosen])
    body["panels"] = [panel.public()]
    return _json(body)


def default_esd_step(steps: Sequence[int], onset: int | None) -> int:
    """The step a layer's drill-down opens at: its last ESD (``steps``, sorted), or, for a
    layer non-finite from step ``onset``, its last ESD before it (those after hold no
    spectrum: "Layer skipped: empty or non-finite ESD"), when there is one."""
    finite = [s for s in steps if onset is None or s < onset]
    return finite[-1] if finite else steps[-1]


@api_router.get("/runs/{run_id}/layer")
def read_layer(
    run: RunDep,
    session: SessionDep,
    layer: Annotated[str, Query(max_length=500)],
    step: int | None = None,
    metric: str | None = None,
    max_points: Points = None,
) -> Response:
    """Drilldown of one layer: ESD + power law, MP bulk and spikes, plain vs FARMS alpha."""
    if not layer:  # the page's URL ends in /layers/: say what to do, not "min_length"
        raise ApiError(
            422,
            "layer_missing",
            f"layer: none given; pick a layer on the run's layer heatmap (/runs/{run.id}/layers)",
        )
    page = pages()["layer"]
    n = _points(max_points)
    body = _base(session, run, page)
    body["layer"] = layer
    # the HT-SR spectra's keys, then the one payload shown (a long run holds hundreds of them,
    # ~10 KB each); a layer HT-SR leaves out (e.g. a 50k-token embedding) has spectra that say
    # why ("skipped"), so its page says so, not "no ESD yet"
    keys = metric_reads.spectrum_steps(session, run.id, layer, "htsr")
    steps = sorted({s for s, _ in keys})
    onsets = reads.nonfinite_onsets(session, run.id)
    onset = onsets[layer][0] if layer in onsets else None
    chosen_row = None
    step_note = ""
    if keys:
        target = step if step is not None else default_esd_step(steps, onset)
        # the last ESD at or before the step asked for; the first one for a step before it
        chosen = max([k for k in keys if k[0] <= target] or [k for k in keys if k[0] == steps[0]])
        chosen_row = session.get_one(Spectrum, chosen[1])
        body["controls"]["step"] = {
            "label": "ESD at step",
            "options": [str(s) for s in steps],
            "labels": [
                f"{s} (non-finite)" if onset is not None and s >= onset else str(s) for s in steps
            ],
            "value": str(chosen_row.step),
        }
        if step is None and chosen_row.step != steps[-1]:
            step_note = (
                f"Showing step {chosen_row.step}, the last snapshot before this layer went"
                f" non-finite; steps {steps[steps.index(chosen_row.step) + 1]}-{steps[-1]} are"
                " still in the step menu."
            )
    names = reads.series_names(session, run.id)
    note = dash.nonfinite_note(onsets, [layer])
    bad = dash.nonfinite_marker(onsets, [layer])
    body["nonfinite_note"] = note
    body["frozen_note"] = _frozen_note(repo.latest_unchanged(session, run.id)[1], [layer])
    # said once, above the panels (each of the 7 panels repeated it)
    body["note"] = " ".join(n for n in (note, body["frozen_note"], step_note) if n)
    skipped = chosen_row.payload.get("skipped") if chosen_row is not None else None
    skipped_text = f"Layer skipped: {skipped}" if skipped else None
    metric_styles: dict[str, int] = {}  # each metric's colour: its place on the page
    panels = []
    for spec in page.panels:
        if spec.kind in SPECTRUM_FIGURES:
            part = (chosen_row.payload.get(spec.match[0]) if chosen_row is not None else None) or {}
            title = f"{spec.title} · {layer}" + (
                f" @ step {chosen_row.step}" if chosen_row is not None else ""
            )
            fig = (SPECTRUM_FIGURES[spec.kind](part, title) or None) if part else None
            panels.append(dash.panel_from(spec, fig, empty=skipped_text))
        else:
            matched = dash.match_names(names, spec.match)
            series = metric_series(session, run.id, matched, layer, n)
            lines = [ln for name in matched for ln in lines_of(series, name, lambda k: k[0])]
            lines = [
                styled(ln, metric_styles.setdefault(ln.name, len(metric_styles))) for ln in lines
            ]
            healthy = None if spec.kind == "alpha_history" else dash.healthy_band(matched)
            band = dash.HTSR_GOOD_RANGE if spec.kind == "alpha_history" else None
            band = band if healthy is None else healthy[:2]
            line_markers = []
            if chosen_row is not None:
                line_markers.append(dash.Marker(chosen_row.step, "ESD step", "#555", "dot"))
            if bad is not None:
                line_markers.append(bad)
            # many metrics (the "other metrics"): one chart per group of like size
            groups = [lines] if spec.kind == "alpha_history" else dash.group_by_magnitude(lines)
            for k, group in enumerate(groups or [[]]):
                sub = spec
                if len(groups) > 1:
                    names_in = ", ".join(ln.name for ln in group)
                    sub_id = spec.id if k == 0 else f"{spec.id}-{k + 1}"
                    sub = replace(spec, id=sub_id, title=f"{spec.title}: {names_in}")
                fig = dash.line_figure(
                    f"{sub.title} · {layer}",
                    group,
                    y_title=spec.y_title,
                    log_y=spec.log_y,
                    y_band=band,
                    y_band_label="" if healthy is None else "healthy: " + healthy[2],
                    markers=line_markers,
                )
                # HT-SR's alphas: none for a layer it skips, which says why as the ESDs do
                alpha_empty = skipped_text if spec.kind == "alpha_history" else None
                panels.append(dash.panel_from(sub, fig, empty=alpha_empty))
    dash.share_step_range(panels, [run.last_step] if run.last_step is not None else [])
    body["panels"] = [p.public() for p in panels]
    heat = _choose(
        [m for m in names if not m.startswith("grok.")], metric, pages()["layers"].preferred
    )
    body["links"] = {"heatmap_metric": heat}
    return _json(body)


@api_router.get("/runs/{run_id}/activations")
def read_activations(run: RunDep, session: SessionDep, max_points: Points = None) -> Response:
    """EigenTrack descriptors per module over steps: one figure per descriptor."""
    page = pages()["activations"]
    n = _points(max_points)
    body = _base(session, run, page)
    names = reads.series_names(session, run.id)
    onsets = reads.nonfinite_onsets(session, run.id)  # modules whose activations went NaN/Inf
    # each module's colour: its place among every module of the page, the same in each chart
    layers_of = {
        m: metric_reads.metric_layers(session, run.id, m)
        for spec in page.panels
        for m in dash.match_names(names, spec.match)
    }
    order = model_order(session, run.id)  # modules in forward order, in menus and legends
    every = sorted({la for found in layers_of.values() for la in found}, key=order)
    styles = {la: i for i, la in enumerate(every)}
    panels = []
    drawn: set[str] = set()  # the modules of every figure: the page's one NaN/Inf note
    for spec in page.panels:
        matched = dash.match_names(names, spec.match)
        if not matched:
            panels.append(dash.panel_from(spec, None))
            continue
        groups = [[m] for m in matched] if spec.split else [matched]
        for group in groups:
            # a point budget per figure: 150 modules get 400 points each (min and max of 200
            # buckets), not 1,000; the layers by index seeks
            count = sum(len(layers_of[m]) for m in group)
            per_line = max(MIN_LINE_POINTS, min(n, ACTIVATION_POINTS // max(1, count)))
            # and a read budget: 150 modules x 5,000 steps read <= 800 steps of each (715)
            per_read = max(per_line, ACTIVATION_READ_POINTS // max(1, count))
            series, decimated = reads.bucketed_layers(
                session, run.id, group, max(1, per_line // 2), per_read
            )
            lines = []
            for name in group:
                prefix = "" if len(group) == 1 else f"{name} · "
                lines += lines_of(series, name, layer_label(prefix), styles, order)
            title = group[0] if len(group) == 1 else spec.title
            # the panel spec's caption is the page's, said once above the figures (it was
            # repeated on each of them): a figure's help is what only it has
            body["help"] = spec.help
            help_text = ""
            if decimated:
                extremes = reads.extreme_budget(per_read)
                help_text += (
                    f" Each module's {', '.join(decimated)} is read at up to"
                    f" {per_read - extremes:,} evenly spaced stored steps (it has more), and at"
                    f" up to {extremes:,} more: its non-finite values and those beyond the range"
                    " of the steps read (a one-step burst between two of them is drawn; a dip"
                    " inside that range may not be);"
                    f" GET /api/v1/runs/{run.id}/metrics?name=…&layer=… has every point."
                )
            if len(lines) > ACTIVATION_LINES:
                lines = dash.thin_lines(lines, ACTIVATION_LINES)
                help_text += (
                    f" The grey band spans all {len(lines) - 2} lines (lowest to highest at each"
                    f" step); the first {ACTIVATION_LINES} and those reaching the extremes are"
                    " drawn, the others are in the legend: click one to draw it."
                )
            sub = dash.PanelSpec(
                f"{spec.id}-{group[0]}", title, spec.kind, help=help_text.strip(), empty=spec.empty
            )
            modules = sorted({layer for name, layer in series if name in group}, key=order)
            drawn.update(modules)
            marker = dash.nonfinite_marker(onsets, modules, order)
            figure = dash.line_figure(
                title,
                lines,
                y_title=group[0] if len(group) == 1 else "",
                markers=[marker] if marker else [],
            )
            panel = dash.panel_from(sub, figure)
            panel.extra["metrics_help"] = metrics_help(group)  # what the raw key means
            panels.append(panel)
    body["note"] = dash.nonfinite_note(onsets, drawn, order)
    dash.share_step_range(panels, [run.last_step] if run.last_step is not None else [])
    body["panels"] = [p.public() for p in panels]
    return _json(body)


# a page table's headers: the field names as words (the API and CSV keep the names)
COLUMN_LABELS = {
    "resolved_step": "resolved at step",
    "acknowledged_by": "acknowledged by",
    "last_status_code": "last HTTP status",
    "latency_ms": "latency (ms)",
    "last_error": "last error",
    "created_at": "created",
    "delivered_at": "delivered",
    "url": "URL",
}


def _table(
    table_id: str,
    title: str,
    columns: Sequence[str],
    records: Sequence[Mapping[str, Any]],
    **extra: Any,
) -> dict[str, Any]:
    """A page table: its ``columns`` as the header and each record's values in that order."""
    return {
        "id": table_id,
        "title": title,
        "columns": list(columns),
        "labels": [COLUMN_LABELS.get(c, c.replace("_", " ")) for c in columns],
        "rows": [[r[c] for c in columns] for r in records],
        **extra,
    }


def url_origin(url: str) -> str:
    """``url``'s scheme and host (and port), ``/…`` for the rest: no user info, path or query
    (where a webhook's credential is: a Slack path, a ``?token=``)."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return "…"
    if not parts.scheme or not host:
        return "…"
    origin = f"{parts.scheme}://" + (f"[{host}]" if ":" in host else host)
    origin += f":{port}" if port is not None else ""
    hidden = parts.path.strip("/") or parts.query or parts.fragment or "@" in parts.netloc
    return origin + ("/…" if hidden else "")


def error_gist(error: str) -> str:
    """A delivery error's words before its first ``:`` (the server's own: ``HTTP 500``,
    ``refused``, ``gave up after 3 attempts``, an exception's class), ``…`` for the rest,
    which can quote the receiver's answer or the URL."""
    head, sep, _ = error.partition(":")
    return head + ": …" if sep else head


def masked_delivery(row: Mapping[str, Any]) -> dict[str, Any]:
    """A delivery row for a token below ``admin``: :func:`url_origin` and :func:`error_gist`."""
    return {**row, "url": url_origin(row["url"]), "last_error": error_gist(row["last_error"])}


@api_router.get("/runs/{run_id}/alerts")
def read_alerts(run: RunDep, session: SessionDep, principal: PrincipalDep) -> Response:
    """Alert episodes on a timeline, the alert list and the project's webhook delivery log
    (below ``admin``: URLs and errors cut to what cannot hold a credential)."""
    page = pages()["alerts"]
    body = _base(session, run, page)
    alerts = reads.alert_rows(session, run.id)
    spec = page.panel("timeline")
    body["panels"] = [
        dash.panel_from(spec, dash.alerts_timeline_figure(alerts, run.last_step)).public()
    ]
    admin = principal.allows("admin")
    deliveries = reads.delivery_rows(session, run.project_id)
    if not admin:
        deliveries = [masked_delivery(d) for d in deliveries]
    body["tables"] = [
        _table(
            "alerts",
            "Alerts",
            (
                "step",
                "rule",
                "layer",
                "severity",
                "status",
                "resolved_step",
                "acknowledged_by",
                "message",
            ),
            [{**a, "layer": dash.layer_text(a["layer"])} for a in alerts],
            empty="No alerts for this run.",
            # the page's acknowledge buttons (PATCH /alerts/{id}): one entry per row
            actions=[
                {"id": a["id"], "acknowledged": a["acknowledged_at"] is not None} for a in alerts
            ],
        ),
        _table(
            "deliveries",
            "Webhook deliveries (this project)",
            (
                "id",
                "event",
                "url",
                "status",
                "attempts",
                "last_status_code",
                "latency_ms",
                "last_error",
                "created_at",
                "delivered_at",
            ),
            deliveries,
            empty="No webhook deliveries yet (add one with POST /api/v1/webhooks).",
            # UTC ISO values: the page shows them in the browser's local time, zone named
            times=["created_at", "delivered_at"],
            help="" if admin else DELIVERIES_MASKED,
        ),
    ]
    return _json(body)


@api_router.get("/compare")
def read_compare(
    principal: PrincipalDep,
    session: SessionDep,
    runs: Annotated[str | None, Query(pattern=r"^\d+(,\d+)*$")] = None,
    names: Annotated[list[str] | None, Query()] = None,
    layer: str | None = None,
    max_points: Points = None,
) -> Response:
    """Two or more runs overlaid per metric or scalar, aligned by step; none picked (the
    page opened as ``/compare``): the empty state says how to pick them. ``names`` repeated
    (``names=a&names=b``), or comma-separated (see :func:`picked_names`)."""
    page = pages()["compare"]
    n = _points(max_points)
    asked = list(dict.fromkeys(int(r) for r in (runs or "").split(",") if r))
    ids, left_out = asked[:MAX_COMPARE_RUNS], asked[MAX_COMPARE_RUNS:]
    run_rows = [find_run(session, principal, i) for i in ids]
    scalars = {r.id: scalar_lines(session, r.id, n) for r in run_rows}
    drawn = {r.id: dash.drawn_scalars(scalars[r.id]) for r in run_rows}
    metrics = {r.id: reads.series_names(session, r.id) for r in run_rows}
    # where each run's scalars (client stats) and layers (frames) went NaN/Inf
    scalar_onsets = {r.id: dash.scalar_onsets(r.client_stats) for r in run_rows}
    layer_onsets = {r.id: reads.nonfinite_onsets(session, r.id) for r in run_rows}
    available = sorted(
        {
            *(s for v in scalars.values() for s in v),
            *(s for v in scalar_onsets.values() for s in v),  # non-finite from the first step
            *(m for v in metrics.values() for m in v),
        },
        key=dash.natural_key,
    )
    requested = picked_names(names or [], available)
    if not requested:
        requested = []
        for pattern in page.preferred:
            hit = dash.match_names(available, [pattern])
            if hit and hit[0] not in requested:
                requested.append(hit[0])
        requested = requested[:3] or available[:1]
    metric_chosen = [x for x in requested if any(x in m for m in metrics.values())]
    layer_opts: list[str] = []  # the first run's layers in its model's order, then the others'
    for r in run_rows:
        held = {la for name in metric_chosen for la in layer_options(session, r.id, name)}
        if held:
            order = model_order(session, r.id)
            layer_opts += [la for la in sorted(held, key=order) if la not in layer_opts]
    layer_value = _choose(layer_opts, layer, [dash.MODEL_LAYER])
    public = [r.model_dump(mode="json") for r in runs_public(session, run_rows)]
    body: dict[str, Any] = {
        "runs": public,
        "page": {"id": page.id, "title": page.title},
        "controls": {
            "names": {
                "label": "metrics",
                "options": available,
                "value": requested,
                "multiple": True,
            }
        },
        "tables": [],
        "left_out": left_out,
        "notice": left_out_notice(left_out),
        "config": compare_config(public),
    }
    if layer_opts:
        body["controls"]["layer"] = {
            "label": "layer",
            "options": layer_opts,
            "labels": [dash.layer_text(o) for o in layer_opts],
            "value": layer_value,
        }
    more = _runs_to_add(session, run_rows)
    if more:  # value "": the page adds the chosen run to ``runs`` (labels: what the list shows)
        body["controls"]["add"] = {
            "label": "add a run",
            "options": ["", *(str(r.id) for r in more)],
            "labels": ["—", *(f"#{r.id} {r.name} ({r.status})" for r in more)],
            "value": "",
        }
    spec = page.panel("compare")
    panels = []
    for name in requested:
        lines = []
        marks: list[dash.Marker] = []
        notes: list[str] = []
        for index, r in enumerate(run_rows):  # a run's colour: its place in the page's list
            label = f"#{r.id} {r.name}"
            onset = scalar_onsets[r.id].get(name)
            if name in scalars[r.id] and (onset is None or name in drawn[r.id]):
                ln = scalars[r.id][name]
                lines.append(styled(dash.Line(label, ln.x, ln.y), index))
                if onset is not None:  # a red point where the run's line ends
                    lines.append(dash.scalar_onset_line(dash.Line(label, ln.x, ln.y), *onset))
                    notes.append(f"{label}: {name} became {onset[1]} at step {onset[0]}")
            elif onset is not None:  # non-finite from its first step: no line, a red one
                marks.append(dash.scalar_onset_marker(f"#{r.id} {name}", *onset))
                notes.append(
                    f"{label}: {name} was {onset[1]} from its first logged step, {onset[0]}"
                )
            elif name in metrics[r.id]:
                series = metric_series(session, r.id, [name], layer_value, n)
                lines += [styled(ln, index) for ln in lines_of(series, name, label)]
                found = _compare_layer_marker(layer_onsets[r.id], layer_value, r)
                if found is not None:
                    marks.append(found[0])
                    notes.append(f"{label}: {found[1]}")
        shown = dash.layer_text(layer_value)
        title = name + (f" · {shown}" if name in metric_chosen and layer_value else "")
        sub = dash.PanelSpec(f"compare-{name}", title, "compare", empty=spec.empty)
        fig = dash.line_figure(title, lines, y_title=name, log_y=log_axis(name), markers=marks)
        panel = dash.panel_from(sub, fig)
        if panel.figure is None and marks:  # nothing finite at all: the red lines alone
            last = max((r.last_step or 0 for r in run_rows), default=0)
            panel.figure, panel.empty = _markers_only(fig, marks, last), ""
        if notes and panel.figure is not None:
            note = "; ".join(notes)
            if name not in metric_chosen:  # the layers' sentences say why themselves
                note += (
                    ": NaN/Inf values are gaps in a chart, so a run's line stops there (red"
                    " point), or is not drawn at all when it never had a finite one (red line)."
                )
            panel.extra["note"] = note
        panels.append(panel)
    dash.share_step_range(panels, [r.last_step for r in run_rows if r.last_step is not None])
    if not panels:
        panels.append(dash.panel_from(spec, None, empty=None if ids else NO_RUNS_PICKED))
    body["panels"] = [p.public() for p in panels]
    return _json(body)


def log_axis(name: str) -> bool:
    """Whether the compare page draws ``name`` on a log y axis: where the overview or the layer
    page does (losses, SED gap ratios, update ratios; linear for values <= 0 all the same)."""
    specs = [*pages()["overview"].panels, *pages()["layer"].panels]
    return any(spec.log_y and dash.match_names([name], spec.match) for spec in specs)


def compare_config(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The compare page's config table of ``runs`` (public run dicts): one column per run,
    its status and tags, then one row per flattened config key, differing keys first."""
    return {
        "columns": [f"#{r['id']} {r['name']}" for r in runs],
        "status": [r["status"] for r in runs],
        "tags": [list(r["tags"]) for r in runs],
        "rows": [row.public() for row in dash.config_rows([r["config"] for r in runs])],
    }


def left_out_notice(left_out: Sequence[int]) -> str:
    """What the compare page says of runs asked for past :data:`MAX_COMPARE_RUNS` (``""``)."""
    if not left_out:
        return ""
    runs = ", ".join(f"#{i}" for i in left_out)
    return (
        f"{len(left_out)} run{'s' if len(left_out) > 1 else ''} left out ({runs}): the page"
        f" compares at most {MAX_COMPARE_RUNS} runs, the first {MAX_COMPARE_RUNS} in its list."
    )


def picked_names(values: Sequence[str], available: Sequence[str]) -> list[str]:
    """The names of ``available`` that ``values`` (the repeated ``names`` parameter) pick, in
    order, once each: a value that is a name is that name (``a,b`` too), any other one a
    comma-separated list of names (``names=loss,htsr.alpha``)."""
    known = set(available)
    picked = (
        [value] if value in known else [n for n in value.split(",") if n in known]
        for value in values
    )
    return list(dict.fromkeys(n for group in picked for n in group))


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def rule_condition(params: dict[str, Any]) -> str:
    """A rule's condition in a few words, from its params (``htsr.alpha < 2 or > 6``,
    ``scalar val_loss > 2 for 3 points``, ``scalar val_acc < 0.6 for 5 points from step 500``)."""
    kind = params.get("kind")
    metric = params.get("metric") or "?"
    if params.get("scalar") is not None:
        metric = f"scalar {params['scalar']}"
    if kind == "threshold":
        bounds = [
            f"{op} {_number(params[key])}"
            for op, key in (("<", "below"), (">", "above"))
            if params.get(key) is not None
        ]
        text = f"{metric} " + " or ".join(bounds) if bounds else str(metric)
    elif kind == "growth":
        text = (
            f"{metric} ≥ {_number(params.get('factor'))} times the minimum of the previous "
            f"{params.get('window')} points"
        )
    elif kind == "nonfinite":
        text = "NaN/Inf in a frame"
    elif kind == "client_drops":
        text = f"client drops > {_number(params.get('above'))}"
    elif kind == "silence":
        text = f"a running run silent for {_number(params.get('minutes'))} min"
    else:
        return ""
    if kind in ("threshold", "growth") and (params.get("fire_after") or 1) > 1:
        text += f" for {params['fire_after']} points"
    if kind in ("threshold", "growth") and params.get("after_step"):
        text += f" from step {params['after_step']}"
    if params.get("hysteresis"):
        text += f" (hysteresis {_number(params['hysteresis'])})"
    return text


@api_router.get("/projects/{project}/alert-rules")
def read_rules(project: str, principal: PrincipalDep, session: SessionDep) -> Response:
    """The project's alert rules (as ``GET /projects/{project}/alert-rules``), each with its
    condition in words and the number of alerts open under it across the project's runs."""
    row = find_project(session, principal, project)
    counts = reads.open_alerts_by_rule(session, row.id)
    rules = []
    for rule in list_rules(project, principal, session):
        item = rule.model_dump(mode="json")
        item["condition"] = rule_condition(rule.params) if rule.problem is None else ""
        item["layers"] = rule.params.get("layers", "*") if isinstance(rule.params, dict) else "*"
        if isinstance(rule.params, dict) and rule.params.get("scalar") is not None:
            item["layers"] = "—"  # a logged scalar: one series per run, no layers
        item["open_alerts"] = counts.get(rule.name, 0)
        rules.append(item)
    return _json(
        {
            "project": row.name,
            "page": {"id": "rules", "title": "Alert rules"},
            "runs_href": project_href(row.name),
            "rules": rules,
        }
    )


@api_router.get("/alert-rules")
def read_rules_of(project: str, principal: PrincipalDep, session: SessionDep) -> Response:
    """:func:`read_rules` with the project as a query (``?project=``): the rules page's read,
    which reaches the projects named ``.`` and ``..`` too (a browser resolves those away as
    path segments, escaped as ``%2E`` or not)."""
    return read_rules(project, principal, session)


def _markers_only(
    figure: dash.Figure, markers: Sequence[dash.Marker], last_step: int | None
) -> dash.Figure:
    """A figure of no finite value, only red lines (a scalar never finite): over the run's
    steps, a linear y-axis without ticks (there is no value to read)."""
    first = min(m.step for m in markers)
    last = max(last_step or 0, max(m.step for m in markers))
    pad = max(1.0, (last - first) * 0.02)
    figure["layout"]["xaxis"]["range"] = [first - pad, last + pad]
    figure["layout"]["yaxis"].update(type="linear", showticklabels=False, range=[0, 1])
    return figure


def _compare_layer_marker(
    onsets: dict[str, tuple[int, str]], layer: str | None, run: Run
) -> tuple[dash.Marker, str] | None:
    """A red line where ``run``'s ``layer`` went NaN/Inf (the whole-model series: where any
    layer did), labelled with the run, and the sentence saying so; None if it did not."""
    layers = None if layer is None or layer == dash.MODEL_LAYER else [layer]
    marker = dash.nonfinite_marker(onsets, layers)
    if marker is None:
        return None
    note = dash.nonfinite_note(onsets, layers)
    label = f"#{run.id}: non-finite from step {marker.step}"
    return dash.Marker(
        marker.step, label, marker.color, marker.dash, dash.plot_text(note, 400)
    ), note


ADD_RUN_OPTIONS = 200  # newest runs offered per project by the compare page's "add a run"


def _runs_to_add(session: Session, compared: Sequence[Run]) -> list[Run]:
    """Newest runs of the compared runs' projects not compared yet (none at the cap)."""
    if not compared or len(compared) >= MAX_COMPARE_RUNS:
        return []
    ids = {r.id for r in compared}
    projects = dict.fromkeys(r.project_id for r in compared)
    return [
        r
        for project_id in projects
        for r in repo.list_runs(session, project_id, ADD_RUN_OPTIONS, 0)
        if r.id not in ids
    ]
