"""Projects: get-or-create, list (scoped to the caller's token) and delete."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from sqlalchemy.exc import IntegrityError

from spectrawatch_server.api.deps import PrincipalDep, SessionDep, StateDep, require_role
from spectrawatch_server.api.errors import ApiError
from spectrawatch_server.api.routes.alerts import find_project
from spectrawatch_server.db.models import Project, Token
from spectrawatch_server.db.session import release_free_pages
from spectrawatch_server.schemas import (
    ProjectCreate,
    ProjectDeleted,
    ProjectPublic,
    TokenPublic,
    WhoAmI,
)
from spectrawatch_server.storage import repository as repo
from spectrawatch_server.storage.blobs import delete_all

router = APIRouter(prefix="/projects", tags=["projects"])
token_router = APIRouter(tags=["tokens"])


@token_router.get("/token", response_model=WhoAmI)
def whoami(principal: PrincipalDep, session: SessionDep) -> WhoAmI:
    """The calling token's scope and role: ``project`` (None: a server-wide token, every
    project), ``role`` (``read`` < ``write`` < ``admin``) and the token's ``id``, ``name``,
    ``prefix`` and ``created_at`` as ``spectrawatch token list`` shows them. Without a token on
    a server that does not require auth: ``anonymous`` true, role ``admin``, every project.
    ``spectrawatch doctor`` asks this to tell whether a token can stream a run (``write``)."""
    if principal.token_id is None:
        return WhoAmI(project=None, role=principal.role, token=None, anonymous=True)
    token = session.get(Token, principal.token_id)
    project = None if principal.project_id is None else session.get(Project, principal.project_id)
    return WhoAmI(
        project=None if project is None else project.name,
        role=principal.role,
        token=TokenPublic.model_validate(token),
    )


@router.post(
    "",
    status_code=201,
    response_model=ProjectPublic,
    dependencies=[require_role("write")],
    responses={200: {"model": ProjectPublic, "description": "the project existed"}},
)
def create_project(
    body: ProjectCreate, principal: PrincipalDep, session: SessionDep, response: Response
) -> ProjectPublic:
    """Create a project, or return the existing one of that name (200)."""
    existing = repo.get_project(session, body.name)
    if principal.project_id is not None and (
        existing is None or existing.id != principal.project_id
    ):
        raise ApiError(403, "forbidden", f"token is not valid for project {body.name!r}")
    try:
        project, created = repo.get_or_create_project(session, body.name)
        session.commit()
    except IntegrityError:  # created concurrently by another request
        session.rollback()
        project, created = repo.get_or_create_project(session, body.name)
    if not created:
        response.status_code = 200
    return ProjectPublic.model_validate(project)


@router.get("", response_model=list[ProjectPublic])
def list_projects(principal: PrincipalDep, session: SessionDep) -> list[ProjectPublic]:
    return [
        ProjectPublic.model_validate(p) for p in repo.list_projects(session, principal.project_id)
    ]


@router.get("/{name}", response_model=ProjectPublic)
def read_project(name: str, principal: PrincipalDep, session: SessionDep) -> ProjectPublic:
    """One project by name; 404 ``project_not_found`` for one the caller's token cannot see."""
    return ProjectPublic.model_validate(find_project(session, principal, name))


@router.delete("/{name}", response_model=ProjectDeleted, dependencies=[require_role("admin")])
def delete_project(
    name: str, principal: PrincipalDep, session: SessionDep, state: StateDep, request: Request
) -> ProjectDeleted:
    """Delete a project with everything stored for it: each run as ``DELETE /runs/{id}`` does
    (frames, blobs, results, alerts, pending jobs; a client still streaming gets 404
    ``run_deleted`` and stops), its alert rules, webhooks and their deliveries; its tokens are
    revoked. The name is free at once for a new project.

    Who may: anyone when the server does not require auth (as every other call); with
    ``--require-auth``, a token of this project only (another project's token gets 404, as for
    every lookup): the rule that already lets it delete each of the project's runs.
    """
    project = find_project(session, principal, name)
    deleted = repo.delete_project(session, project)
    if deleted is not None:
        for run_id in deleted.run_ids:
            state.queue.forget_run(session, run_id)
    session.commit()
    if deleted is None:  # a concurrent DELETE of the same project won
        raise ApiError(404, "project_not_found", f"project {name!r} does not exist")
    ingest = getattr(request.app.state, "ingest", None)
    if ingest is not None:  # this process's cached ingest authorisation for its runs
        for run_id in deleted.run_ids:
            ingest.auth.forget_run(run_id)
    failed = delete_all(state.blobs, deleted.blob_keys)  # after the commit: orphans, not holes
    release_free_pages(state.engine)  # SQLite: the file shrinks by the project's rows
    return ProjectDeleted(
        name=name,
        runs=len(deleted.run_ids),
        frames=deleted.frames,
        bytes=deleted.bytes,
        tokens_revoked=deleted.tokens_revoked,
        alert_rules=deleted.alert_rules,
        webhooks=deleted.webhooks,
        deliveries_dropped=deleted.deliveries_dropped,
        blobs_not_deleted=failed,
    )
