"""Dashboards (DESIGN §8): HTML pages and the bundled static assets.

HTML pages (``/``, ``/projects/{name}``, ``/runs/{id}``, ``/runs/{id}/layers``,
``/runs/{id}/layers/{layer}``, ``/runs/{id}/activations``, ``/runs/{id}/alerts``,
``/compare?runs=1,2``, ``/projects/{name}/alert-rules``) are shells: the browser script reads the
page state from the URL, fetches ``/api/v1/dashboards/...`` (the figure API,
:mod:`~spectrawatch_server.api.routes.dashboard_figures`) and polls ``/api/v1/runs/{id}`` to
refresh while the run is live. Plotly.js is served from the package.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from functools import cache, partial
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from spectrawatch_server import figures as dash
from spectrawatch_server.api.deps import (
    Principal,
    SessionDep,
    StateDep,
    authenticate,
)
from spectrawatch_server.api.errors import STATIC_URL, ApiError
from spectrawatch_server.api.known_query import KNOWN_QUERY_ONLY
from spectrawatch_server.api.routes.dashboard_figures import (
    api_router,
    metric_docs,
    package_dir,
    pages,
    project_href,
    rules_href,
)
from spectrawatch_server.api.static_assets import VersionedStaticFiles, asset_url
from spectrawatch_server.storage import dashboard_reads as reads
from spectrawatch_server.storage import repository as repo

router = APIRouter(tags=["dashboards"], include_in_schema=False)


@cache
def templates() -> Jinja2Templates:
    out = Jinja2Templates(directory=str(package_dir() / "templates"))
    out.env.filters["project_href"] = project_href
    out.env.filters["rules_href"] = rules_href
    out.env.filters["config_text"] = dash.config_text
    out.env.globals["asset"] = partial(asset_url, STATIC_URL, package_dir() / "static")
    return out


@router.get("/favicon.ico")
def read_favicon() -> Response:
    """No icon: 204, so browsers asking for one on non-HTML pages log no failed load."""
    return Response(status_code=204)


def install(app: FastAPI, api_prefix: str) -> None:
    """Add the HTML pages, the figure API (under ``api_prefix``; an unknown query parameter is
    a 422, as on the rest of the API) and the static mount to ``app``."""
    app.include_router(router)
    app.include_router(api_router, prefix=api_prefix, dependencies=[KNOWN_QUERY_ONLY])
    app.mount(STATIC_URL, VersionedStaticFiles(package_dir() / "static"), name="dashboards-static")


# --- HTML pages -------------------------------------------------------------------------------


def _age(value: datetime | None, now: datetime) -> str:
    if value is None:
        return "—"
    seconds = max(0.0, (now - value).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{math.floor(seconds / size)}{unit}"
    return f"{int(seconds)}s"


RUNS_SHOWN = 1000  # rows of the runs list; past it, the page says how many match in all
CONFIG_SORT = "config:"  # sort=config:<key>: the listed runs by a config key (see runs_table)
CONFIG_COLUMNS = 20  # config columns a runs list shows at most
Columns = Annotated[list[str] | None, Query(max_length=CONFIG_COLUMNS)]
SUMMARY_COLUMNS = 10  # summary (last scalar value) columns a runs list shows at most
SummaryColumns = Annotated[list[str] | None, Query(max_length=SUMMARY_COLUMNS + 1)]


def runs_table(
    session: Session,
    principal_project: int | None,
    project: str | None,
    status: str | None,
    q: str | None,
    sort: str,
    desc: bool,
) -> tuple[list[dict[str, Any]], int]:
    """The runs list's rows (the first :data:`RUNS_SHOWN` by ``sort``, filtered by ``status``
    and name ``q``, :func:`~spectrawatch_server.storage.dashboard_reads.runs_page`) and how
    many runs match in all.

    ``sort`` ``config:<key>`` orders the rows listed (the newest :data:`RUNS_SHOWN`) by that
    config key, in Python: a JSON path in SQL is a full scan and a different function on
    SQLite and PostgreSQL, and each row's config is read anyway for its columns."""
    project_id = principal_project
    if project is not None:
        row = repo.get_project(session, project)
        if row is None or (principal_project is not None and row.id != principal_project):
            raise ApiError(404, "project_not_found", f"project {project!r} does not exist")
        project_id = row.id
    by_config = sort.startswith(CONFIG_SORT)
    sql_sort, sql_desc = ("id", True) if by_config else (sort, desc)
    runs, total = reads.runs_page(session, project_id, status, q, sql_sort, sql_desc, RUNS_SHOWN)
    counts = reads.open_alert_counts(session, [r.id for r in runs])
    nonfinite = reads.nonfinite_runs(session, runs)
    projects = repo.project_names(session, [r.project_id for r in runs])
    now = datetime.now(timezone.utc)
    rows = [
        {
            "id": r.id,
            "name": r.name,
            "project": projects.get(r.project_id, "?"),
            "status": r.status,
            "last_step": r.last_step,
            "age": _age(r.created_at, now),
            "seen": _age(r.last_seen_at, now),
            # UTC ISO: the page's script titles the ages with them in local time
            "created_at": r.created_at.isoformat(),
            "last_seen_at": None if r.last_seen_at is None else r.last_seen_at.isoformat(),
            "open_alerts": counts.get(r.id, 0),
            "tags": r.tags,
            "config": dash.flatten_config(r.config or {}),
            "nonfinite": nonfinite_text(nonfinite.get(r.id), r.client_stats),
        }
        for r in runs
    ]
    if by_config:
        rows = dash.sort_by_config(rows, sort.removeprefix(CONFIG_SORT), desc=desc)
    return rows, total


def nonfinite_text(frame_step: int | None, client_stats: Any) -> str:
    """Where a run went NaN/Inf, for its runs-list badge ("" when it did not): its frames'
    first step (:func:`~spectrawatch_server.storage.dashboard_reads.nonfinite_runs`) and each
    scalar's, from the client's stats."""
    parts = [] if frame_step is None else [f"frames from step {frame_step}"]
    onsets = sorted(dash.scalar_onsets(client_stats).items(), key=lambda kv: kv[1])
    parts += [f"{name} ({value}) from step {step}" for name, (step, value) in onsets]
    return "NaN/Inf: " + "; ".join(parts) if parts else ""


def summary_columns(
    session: Session, rows: list[dict[str, Any]], picked: list[str] | None
) -> tuple[list[str], list[str]]:
    """The summary columns of the runs list (``picked``, "" entries dropped; when None, the
    :func:`~spectrawatch_server.figures.configs.default_summary` of the listed runs' scalars)
    and the scalar names its picker offers; each row gets ``summary``, ``{name: (step,
    value)}`` of its last points (one statement for the page's runs)."""
    ids = [r["id"] for r in rows]
    names = reads.scalar_names_of(session, ids)
    columns = (
        dash.default_summary(names)
        if picked is None
        else list(dict.fromkeys(c for c in picked if c))[:SUMMARY_COLUMNS]
    )
    last = reads.last_scalars(session, ids, columns)
    for row in rows:
        row["summary"] = last.get(row["id"], {})
    return columns, sorted({*names, *columns}, key=dash.natural_key)


def _page(request: Request, template: str, **context: Any) -> HTMLResponse:
    return templates().TemplateResponse(request, template, context)


@router.get("/", response_class=HTMLResponse)
def show_runs(
    request: Request,
    state: StateDep,
    session: SessionDep,
    project: str | None = None,
    status: str | None = None,
    q: str | None = None,
    sort: str = "id",
    desc: bool = True,
    fragment: bool = False,
    cols: Columns = None,
    summary: SummaryColumns = None,
) -> HTMLResponse:
    """All runs (of one project with ``?project=``): status (with a NaN/Inf badge), last step,
    age, open alerts, the config keys of ``cols`` (repeated) as columns, offered from the keys
    the listed runs have, and the last values of the scalars of ``summary`` (repeated; without
    it, a training loss, a validation loss and accuracy the listed runs logged; an empty one
    alone: none), offered from the scalars they logged; ``sort=summary:<scalar>`` orders every
    matching run by one.

    With auth on, a page asked for without a token (a browser's navigation) is served without
    its rows; its script asks for the table (``fragment``) with the token the browser keeps,
    which answers the rows of the token's project (401 without a valid token)."""
    principal = Principal(project_id=None)
    locked = False
    if state.settings.require_auth:
        header = request.headers.get("authorization")
        locked = header is None and not fragment
        if not locked:
            principal = authenticate(session, True, header)
    rows, total = (
        ([], 0)
        if locked
        else runs_table(session, principal.project_id, project, status, q, sort, desc)
    )
    columns = list(dict.fromkeys(c for c in cols or [] if c))
    sums, scalar_names = summary_columns(session, rows, summary)
    context = {
        "rows": rows,
        "cols": columns,
        "sums": sums,
        "scalar_names": scalar_names,
        "summary_sort": reads.SUMMARY_SORT,
        "summary_text": dash.summary_text,
        "config_keys": sorted(
            {*dash.config_keys([r["config"] for r in rows]), *columns}, key=dash.natural_key
        ),
        "config_sort": CONFIG_SORT,
        "total": total,
        "project": project,
        "status": status or "",
        "q": q or "",
        "sort": sort,
        "desc": desc,
        "locked": locked,
        # a filter of project names for anonymous use only (a token sees one project)
        "projects": []
        if state.settings.require_auth
        else [p.name for p in repo.list_projects(session)],
    }
    return _page(request, "runs_table.html" if fragment else "runs.html", **context)


@router.get("/projects/{name}", response_class=HTMLResponse)
def show_project(
    request: Request,
    state: StateDep,
    session: SessionDep,
    name: str,
    status: str | None = None,
    q: str | None = None,
    sort: str = "id",
    desc: bool = True,
    fragment: bool = False,
    cols: Columns = None,
    summary: SummaryColumns = None,
) -> HTMLResponse:
    return show_runs(request, state, session, name, status, q, sort, desc, fragment, cols, summary)


def _run_page(
    request: Request, state: Any, session: Session, run_id: int, page: str, **extra: Any
) -> HTMLResponse:
    title = f"run {run_id}"
    if (
        not state.settings.require_auth
    ):  # with auth on, the shell names nothing until the API answers
        run = repo.get_run(session, run_id)
        if run is None:
            raise ApiError(404, "run_not_found", f"run {run_id} does not exist")
        title = f"{run.name} (#{run.id})"
    config = {"page": page, "runId": run_id, "api": "/api/v1", **extra}
    return _page(
        request,
        "run.html",
        page=page,
        title=title,
        run_id=run_id,
        config=config,
        page_title=pages()[page].title,
        **extra,
    )


@router.get("/runs/{run_id}", response_class=HTMLResponse)
def show_run(request: Request, state: StateDep, session: SessionDep, run_id: int) -> HTMLResponse:
    return _run_page(request, state, session, run_id, "overview")


@router.get("/runs/{run_id}/layers", response_class=HTMLResponse)
def show_layers(
    request: Request, state: StateDep, session: SessionDep, run_id: int
) -> HTMLResponse:
    return _run_page(request, state, session, run_id, "layers")


@router.get("/runs/{run_id}/layers/{layer:path}", response_class=HTMLResponse)
def show_layer(
    request: Request, state: StateDep, session: SessionDep, run_id: int, layer: str
) -> HTMLResponse:
    return _run_page(request, state, session, run_id, "layer", layer=layer)


@router.get("/runs/{run_id}/activations", response_class=HTMLResponse)
def show_activations(
    request: Request, state: StateDep, session: SessionDep, run_id: int
) -> HTMLResponse:
    return _run_page(request, state, session, run_id, "activations")


@router.get("/runs/{run_id}/alerts", response_class=HTMLResponse)
def show_alerts(
    request: Request, state: StateDep, session: SessionDep, run_id: int
) -> HTMLResponse:
    return _run_page(request, state, session, run_id, "alerts")


@router.get("/compare", response_class=HTMLResponse)
def show_compare(request: Request, runs: str = "") -> HTMLResponse:
    config = {"page": "compare", "runId": None, "api": "/api/v1"}
    return _page(
        request,
        "run.html",
        page="compare",
        title="",  # the page's own title says it: "Compare runs · spectrawatch"
        run_id=None,
        config=config,
        page_title=pages()["compare"].title,
    )


@router.get("/metrics-reference", response_class=HTMLResponse)
def show_metrics_reference(request: Request) -> HTMLResponse:
    """Every metric key the docs describe (``docs/metrics.md``'s tables, as the pages' help
    shows them), by section, each row anchored by its key: the pages' help links here. Docs
    text only, no run data: served without a token."""
    sections: dict[str, list[Any]] = {}
    for entry in metric_docs().values():
        sections.setdefault(entry.section, []).append(entry)
    return _page(request, "metrics.html", sections=sections)


@router.get("/projects/{name}/alert-rules", response_class=HTMLResponse)
def show_rules(request: Request, state: StateDep, session: SessionDep, name: str) -> HTMLResponse:
    """A project's alert rules: each one's condition, state and open alerts, with controls to
    switch it on or off, reset a customized default and edit its parameters."""
    if not state.settings.require_auth and repo.get_project(session, name) is None:
        raise ApiError(404, "project_not_found", f"project {name!r} does not exist")
    config = {"page": "rules", "project": name, "api": "/api/v1"}
    return _page(request, "rules.html", project=name, config=config)


@router.get("/alert-rules", response_class=HTMLResponse)
def show_rules_of(
    request: Request, state: StateDep, session: SessionDep, project: str | None = None
) -> HTMLResponse:
    """:func:`show_rules` for the projects named ``.`` or ``..`` (see :func:`rules_href`);
    without a project, a page to pick one (it was a bare "422 query.project: Field required").
    With auth on, no project names: those are a token's to see, its runs list links its rules."""
    if project:
        return show_rules(request, state, session, project)
    names = [] if state.settings.require_auth else [p.name for p in repo.list_projects(session)]
    return _page(request, "rules_index.html", projects=names, locked=state.settings.require_auth)
