"""Blob retention: release the stored bodies of old frames of ended runs, keep their results."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter

from spectrawatch_server.api.deps import PrincipalDep, SessionDep, StateDep, find_run, require_role
from spectrawatch_server.api.errors import ApiError
from spectrawatch_server.api.openapi import PROJECT_NOT_FOUND
from spectrawatch_server.api.routes.alerts import find_project
from spectrawatch_server.api.state import AppState
from spectrawatch_server.db import migrate
from spectrawatch_server.db.base import utcnow
from spectrawatch_server.schemas import PruneRequest, PruneResult
from spectrawatch_server.storage import repository as repo
from spectrawatch_server.storage.blobs import delete_all

router = APIRouter(tags=["blobs"])


@router.post(
    "/blobs/prune",
    response_model=PruneResult,
    dependencies=[require_role("admin")],
    responses=PROJECT_NOT_FOUND,
)
def prune(
    body: PruneRequest, principal: PrincipalDep, session: SessionDep, state: StateDep
) -> PruneResult:
    """Delete the blobs of analysed frames older than ``older_than_days`` of runs that ended.

    Metrics, spectra, alerts and the frame rows stay (``has_blob`` becomes false); frames of
    running runs are never pruned. A project token must name its project or one of its runs.
    """
    project_id = find_project(session, principal, body.project).id if body.project else None
    if body.run_id is not None:
        run = find_run(session, principal, body.run_id)
        if project_id is not None and run.project_id != project_id:
            raise ApiError(404, "run_not_found", f"run {body.run_id} is not in {body.project!r}")
    if project_id is None and body.run_id is None:
        project_id = principal.project_id  # a project token prunes its own project
    before = utcnow() - timedelta(days=body.older_than_days)
    pruned = repo.prune_blobs(
        session, before, project_id=project_id, run_id=body.run_id, dry_run=body.dry_run
    )
    session.commit()
    failed = 0 if body.dry_run else delete_all(state.blobs, pruned.blob_keys)
    return PruneResult(
        frames=pruned.frames, bytes=pruned.bytes, blobs_not_deleted=failed, dry_run=body.dry_run
    )


def prune_expired(state: AppState, days: float) -> int:
    """The periodic retention sweep (``SPECTRAWATCH_PRUNE_BLOBS_AFTER_DAYS``): frames pruned."""
    with state.sessions.begin() as session:
        migrate.lift_timeouts(session.connection())  # a sweep, not a request: no API timeouts
        pruned = repo.prune_blobs(session, utcnow() - timedelta(days=days))
    delete_all(state.blobs, pruned.blob_keys)
    return pruned.frames
