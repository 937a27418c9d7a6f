"""Projects: get-or-create and list (scoped to the caller's token)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from sqlalchemy.exc import IntegrityError

from spectrawatch_server.api.deps import PrincipalDep, SessionDep
from spectrawatch_server.api.errors import ApiError
from spectrawatch_server.schemas import ProjectCreate, ProjectPublic
from spectrawatch_server.storage import repository as repo

router = APIRouter(prefix="/projects", tags=["projects"])


@router.post("", status_code=201, response_model=ProjectPublic)
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
