"""Runs: create (or resume by name), get, list, update status, client health stats, delete
(one, or the stale ones of a retention), re-analyse stored frames."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Annotated, get_args

from fastapi import APIRouter, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from spectrawatch.wire import NAME_MAX
from spectrawatch_server.alerts.engine import engine_for
from spectrawatch_server.api.deps import (
    LiveRunDep,
    PrincipalDep,
    RunDep,
    SessionDep,
    StateDep,
    require_role,
)
from spectrawatch_server.api.errors import ApiError
from spectrawatch_server.api.links import keyset_page, page_link
from spectrawatch_server.api.openapi import PROJECT_NOT_FOUND, error
from spectrawatch_server.api.routes.alerts import find_project
from spectrawatch_server.db import migrate
from spectrawatch_server.db.base import utcnow
from spectrawatch_server.db.models import Project, Run
from spectrawatch_server.db.session import release_free_pages, sqlite_write_lock
from spectrawatch_server.schemas import (
    BulkDeletedRun,
    BulkDeleteRequest,
    BulkDeleteResult,
    ClientStats,
    ReanalyzeRequest,
    ReanalyzeResult,
    RunCreate,
    RunCreated,
    RunDeleted,
    RunPublic,
    RunStatus,
    RunUpdate,
    Tag,
    dot_name_problem,
)
from spectrawatch_server.storage import reanalysis, result_store
from spectrawatch_server.storage import repository as repo
from spectrawatch_server.storage.blobs import delete_all
from spectrawatch_server.storage.metric_reads import INT64_MAX

router = APIRouter(prefix="/runs", tags=["runs"])
RUN_STATUSES: tuple[str, ...] = get_args(RunStatus)  # those a run can be listed by


def run_public(session: Session, run: Run) -> RunPublic:
    """``run`` as the API shows it, with its frames counted by status."""
    return runs_public(session, [run])[0]


def runs_public(session: Session, runs: Sequence[Run]) -> list[RunPublic]:
    """:func:`run_public` of each of ``runs``: their projects' names and frame counts by one
    query each (a list of 1,000 runs made one query a run)."""
    projects = repo.project_names(session, [r.project_id for r in runs])
    counts = repo.frame_counts(session, [r.id for r in runs])
    return [
        RunPublic(
            id=run.id,
            uid=run.uid,
            project=projects[run.project_id],
            name=run.name,
            status=run.status,
            config=run.config,
            tags=run.tags,
            summary=run.summary,
            client_stats=run.client_stats,
            last_step=run.last_step,
            created_at=run.created_at,
            updated_at=run.updated_at,
            last_seen_at=run.last_seen_at,
            frames=counts.get(run.id, {}),
        )
        for run in runs
    ]


@router.post(
    "",
    status_code=201,
    response_model=RunCreated,
    dependencies=[require_role("write")],
    responses={
        200: {"model": RunCreated, "description": "the run existed: resumed"},
        409: error(
            "`run_exists`: the run exists and `resume` is false; `run_deleted`: it was "
            "deleted while it was resumed"
        ),
    },
)
def create_run(
    body: RunCreate,
    principal: PrincipalDep,
    session: SessionDep,
    state: StateDep,
    response: Response,
) -> RunCreated:
    """Create run ``name`` in ``project`` (created if needed); an existing run resumes (200),
    or with ``resume: false`` is refused (409: ``spectrawatch import`` creates, never merges)."""
    project = repo.get_project(session, body.project)
    if principal.project_id is not None and (project is None or project.id != principal.project_id):
        raise ApiError(403, "forbidden", f"token is not valid for project {body.project!r}")
    for attempt in (1, 2):
        try:
            run, created = _get_or_create_run(session, body)
            _refuse_resume(body, created)
            previous = None if created else run.status  # before _claim sets it running
            if _claim(session, run, created, body.project):
                session.commit()
                break
        except IntegrityError:  # the project or run was created concurrently: retry once
            if attempt == 2:
                raise
        session.rollback()  # or deleted concurrently: create it afresh
    else:
        raise ApiError(
            409, "run_deleted", f"run {body.name!r} was deleted while it was resumed; retry"
        )
    if not created:
        response.status_code = 200
    return RunCreated(
        **dict(run_public(session, run)),
        resumed_status=previous,
        dashboard_url=page_link(state.settings.public_url, f"/runs/{run.id}"),
    )


def _get_or_create_run(session: Session, body: RunCreate) -> tuple[Run, bool]:
    """The run, created (and its project) if needed; ``.`` and ``..`` name only a project or run
    stored before those names were refused, never a new one (422 naming the field)."""
    project = repo.get_project(session, body.project)
    if project is None:
        _refuse_dot_name("project", body.project)
        project, _ = repo.get_or_create_project(session, body.project)
    if repo.get_run_by_name(session, project.id, body.name) is None:
        _refuse_dot_name("name", body.name)  # before anything is written: nothing to undo
    return repo.get_or_create_run(session, project, body.name, body.config, body.tags)


def _claim(session: Session, run: Run, created: bool, project: str) -> bool:
    """Mark a resumed run running and check that it and its project are still there: False
    when a concurrent deletion won (on PostgreSQL the writes here wait for its row locks,
    then see its tombstones), so the caller creates the run afresh instead of reviving a
    tombstone or filling a deleted project."""
    if not created:
        resumed = session.execute(
            update(Run).where(Run.id == run.id, Run.status != repo.DELETED).values(status="running")
        )
        session.expire(run)
        if not resumed.rowcount:  # type: ignore[attr-defined]
            return False
    return session.scalar(select(Project.name).where(Project.id == run.project_id)) == project


def _refuse_dot_name(field: str, name: str) -> None:
    """The 422 a :data:`~spectrawatch_server.schemas.NewName` field answers with."""
    problem = dot_name_problem(name)
    if problem is not None:
        error = {"loc": ("body", field), "msg": f"Value error, {problem}", "type": "value_error"}
        raise RequestValidationError([error])


def _refuse_resume(body: RunCreate, created: bool) -> None:
    if not created and not body.resume:
        raise ApiError(
            409, "run_exists", f"run {body.name!r} already exists in project {body.project!r}"
        )


@router.get("", response_model=list[RunPublic])
def list_runs(
    principal: PrincipalDep,
    session: SessionDep,
    state: StateDep,
    request: Request,
    response: Response,
    project: str | None = None,
    name: Annotated[str | None, Query(min_length=1, max_length=NAME_MAX)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
    before_id: Annotated[int | None, Query(ge=1, le=INT64_MAX)] = None,
    status: Annotated[list[str] | None, Query(max_length=len(RUN_STATUSES))] = None,
    tag: Annotated[list[Tag] | None, Query(max_length=100)] = None,
) -> list[RunPublic]:
    """Runs newest first (of ``project``; named exactly ``name``; with one of the ``status``
    values, repeated or comma-separated; with every ``tag`` given): those with an id below
    ``before_id`` when given, ``offset`` of them skipped, at most ``limit``. When more match,
    ``Link: <url>; rel="next"`` names the next page by ``before_id`` (the page's last id), which
    neither repeats nor skips a run when runs are created or deleted between pages, as
    ``offset`` does; the link keeps the filters and is relative to the request's URL (RFC
    8288), or under ``SPECTRAWATCH_PUBLIC_URL``."""
    statuses = _statuses(status or [])
    project_id = principal.project_id
    if project is not None:
        row = repo.get_project(session, project)
        if row is None or not principal.can_access(row.id):
            raise ApiError(404, "project_not_found", f"project {project!r} does not exist")
        project_id = row.id
    runs = repo.list_runs(
        session, project_id, limit + 1, offset, before_id, name, statuses, tag or []
    )
    page = keyset_page(request, response, state.settings.public_url, runs, limit)
    return runs_public(session, page)


def _statuses(values: list[str]) -> list[str]:
    """The run statuses of ``status`` query values, each one or a comma-separated list (422
    naming the field for any other word)."""
    names = [s.strip() for value in values for s in value.split(",") if s.strip()]
    bad = [s for s in names if s not in RUN_STATUSES]
    if bad:
        message = f"run statuses are {', '.join(RUN_STATUSES)}, not {bad[0][:64]!r}"
        raise RequestValidationError([{"loc": ("query", "status"), "msg": message, "type": "enum"}])
    return names


@router.post(
    "/bulk-delete",
    response_model=BulkDeleteResult,
    dependencies=[require_role("admin")],
    responses=PROJECT_NOT_FOUND,
)
def bulk_delete_runs(
    body: BulkDeleteRequest,
    principal: PrincipalDep,
    session: SessionDep,
    state: StateDep,
    request: Request,
) -> BulkDeleteResult:
    """Retention: delete the runs (``finished``/``crashed`` unless ``statuses`` says otherwise)
    inactive for more than ``older_than_days``, each as ``DELETE /runs/{id}`` does and in its
    own transaction (a long retention never holds the database), at most ``limit`` per call;
    ``matched`` says how many matched in all. A project token deletes in its own project only.
    """
    project_id = find_project(session, principal, body.project).id if body.project else None
    if project_id is None:
        project_id = principal.project_id
    before = utcnow() - timedelta(days=body.older_than_days)
    matched, candidates = repo.stale_runs(session, before, body.statuses, project_id, body.limit)
    names = repo.project_names(session, {r.project_id for r in candidates})
    listed = [
        BulkDeletedRun(
            id=r.id,
            project=names.get(r.project_id, ""),
            name=r.name,
            status=r.status,
            updated_at=r.updated_at,
        )
        for r in candidates
    ]
    if body.dry_run:
        frames, size = repo.frame_totals(session, [r.id for r in candidates])
        session.rollback()
        return BulkDeleteResult(
            runs=listed,
            matched=matched,
            frames=frames,
            bytes=size,
            blobs_not_deleted=0,
            dry_run=True,
        )
    done: list[BulkDeletedRun] = []
    frames = size = failed = 0
    ingest = getattr(request.app.state, "ingest", None)
    for entry in listed:
        session.rollback()  # a fresh transaction each: re-check the run under its lock
        sqlite_write_lock(session)  # SQLite's lock (with_for_update is PostgreSQL's)
        run = session.get(Run, entry.id, with_for_update=True, populate_existing=True)
        if run is None or not repo.is_stale(run, before, body.statuses):
            continue  # resumed, written to or deleted meanwhile
        deleted = repo.delete_run(session, run)
        if deleted is None:
            continue
        state.queue.forget_run(session, entry.id)
        session.commit()
        if ingest is not None:
            ingest.auth.forget_run(entry.id)
        failed += delete_all(state.blobs, deleted.blob_keys)
        frames, size = frames + deleted.frames, size + deleted.bytes
        done.append(entry)
    if done:
        release_free_pages(state.engine)
    return BulkDeleteResult(
        runs=done,
        matched=matched,
        frames=frames,
        bytes=size,
        blobs_not_deleted=failed,
        dry_run=False,
    )


@router.get("/{run_id}", response_model=RunPublic)
def read_run(run: RunDep, session: SessionDep) -> RunPublic:
    return run_public(session, run)


@router.patch("/{run_id}", response_model=RunPublic, dependencies=[require_role("write")])
def update_run(body: RunUpdate, run: LiveRunDep, session: SessionDep) -> RunPublic:
    if body.status is not None:
        run.status = body.status
    if body.summary is not None:
        run.summary = {**run.summary, **body.summary}
    if body.tags is not None:
        run.tags = body.tags
    session.commit()
    return run_public(session, run)


@router.post(
    "/{run_id}/client-stats", response_model=RunPublic, dependencies=[require_role("write")]
)
def report_client_stats(
    body: ClientStats, run: LiveRunDep, session: SessionDep, state: StateDep
) -> RunPublic:
    """Latest client health counters (drops, spool) — shown in the run's status; the
    ``client_drops`` alert rules run on them at once."""
    run.client_stats = body.model_dump()
    engine_for(state.settings).evaluate_client_stats(session, run)
    session.commit()
    return run_public(session, run)


@router.post(
    "/{run_id}/reanalyze",
    response_model=ReanalyzeResult,
    dependencies=[require_role("admin")],
    responses={
        409: error("`run_running`, `analysis_pending` (frames still queued), `blobs_missing`")
    },
)
def reanalyze_run(
    run: LiveRunDep, session: SessionDep, state: StateDep, body: ReanalyzeRequest | None = None
) -> ReanalyzeResult:
    """Analyse a run's stored frames again (after an upgrade that fixed a metric, or frames
    whose analysis failed for good), from the first frame at ``from_step`` on, in seq order.

    In one transaction: the results of those frames are deleted and their jobs queued, so each
    frame reads as history what the frames before it stored, as when it was first analysed.
    Frames whose blobs were pruned and imported metric batches keep their results; 409
    ``blobs_missing`` when a frame's blob is missing from the store (its results would be
    deleted for an analysis that fails, and later frames read it as history). Alerts are not
    evaluated again (their episodes and webhooks stay as they were), except for frames whose
    first analysis failed: they never were. 409 ``run_running``
    for a running run, 409 ``analysis_pending`` while frames of the run wait for analysis.
    """
    from_step = body.from_step if body is not None else None
    session.refresh(run)  # its status under the run's lock (LiveRunDep)
    if run.status == "running":
        raise ApiError(
            409,
            "run_running",
            f"run {run.id} is running: re-analyse it once it is finished or crashed",
        )
    waiting = state.queue.backlog(session, run.id)
    if waiting:
        raise ApiError(
            409,
            "analysis_pending",
            f"run {run.id} has {waiting} analysis job(s) waiting or running: re-analyse it "
            "once they are done",
        )
    # an admin's one-off, deleting every result row of the run's frames (millions on a long
    # run): not bounded by the API's statement timeout (PostgreSQL), as the retention sweep
    migrate.lift_timeouts(session.connection())
    plan = reanalysis.plan_reanalysis(session, run.id, from_step, state.blobs.exists)
    if plan.missing:  # their analyses (and later frames' reading them) would fail for good
        raise ApiError(
            409,
            "blobs_missing",
            f"{plan.missing} frame(s) of run {run.id} have a blob the store no longer has: "
            "restore the blobs first (nothing was changed)",
        )
    result_store.clear_frame_results(session, run.id, plan.frame_ids)
    reanalysis.mark_requeued(session, plan)
    state.queue.requeue(session, plan.frame_ids)
    session.commit()
    state.queue.notify()
    return ReanalyzeResult(
        run_id=run.id,
        from_step=from_step,
        queued=len(plan.frame_ids),
        skipped_pruned=plan.pruned,
        skipped_imported=plan.imported,
    )


@router.delete("/{run_id}", response_model=RunDeleted, dependencies=[require_role("admin")])
def delete_run(run: RunDep, session: SessionDep, state: StateDep, request: Request) -> RunDeleted:
    """Delete a run with everything stored for it: frames and their blobs, metrics, spectra,
    scalars, alerts and pending analysis jobs. Writes still arriving for it get 404
    ``run_deleted`` (the client stops sending; it recreates only a ``run_not_found`` run)."""
    project = session.get_one(Project, run.project_id).name
    run_id, name = run.id, run.name
    deleted = repo.delete_run(session, run)
    if deleted is not None:
        state.queue.forget_run(session, run_id)
    session.commit()
    if deleted is None:  # a concurrent DELETE of the same run won
        raise ApiError(404, "run_deleted", f"run {run_id} was deleted")
    ingest = getattr(request.app.state, "ingest", None)
    if ingest is not None:  # this process's cached ingest authorisation for the run
        ingest.auth.forget_run(run_id)
    failed = delete_all(state.blobs, deleted.blob_keys)  # after the commit: orphans, not holes
    release_free_pages(state.engine)  # SQLite: the file shrinks by the run's rows
    return RunDeleted(
        id=run_id,
        project=project,
        name=name,
        frames=deleted.frames,
        bytes=deleted.bytes,
        blobs_not_deleted=failed,
    )
