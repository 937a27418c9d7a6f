"""Typed dependencies: app state, DB session, the caller's principal, scoped lookups."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from spectrawatch.wire import RUN_UID_HEADER
from spectrawatch_server.api.errors import ApiError
from spectrawatch_server.api.state import AppState
from spectrawatch_server.db.models import Run
from spectrawatch_server.storage import repository as repo


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.spectrawatch
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def get_session(state: StateDep) -> Iterator[Session]:
    with state.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


@dataclass(frozen=True)
class Principal:
    """Who is calling: a token's project, or anonymous local use (``project_id`` None)."""

    project_id: int | None

    def can_access(self, project_id: int) -> bool:
        return self.project_id is None or self.project_id == project_id


def get_principal(request: Request, state: StateDep, session: SessionDep) -> Principal:
    """Check ``Authorization: Bearer``; anonymous only when the server does not require auth."""
    return authenticate(session, state.settings.require_auth, request.headers.get("authorization"))


def authenticate(session: Session, require_auth: bool, header: str | None) -> Principal:
    """The principal for an ``Authorization`` header value (``None`` when absent)."""
    if header is None:
        if require_auth:
            raise ApiError(401, "unauthorized", "missing Authorization: Bearer <token> header")
        return Principal(project_id=None)
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise ApiError(401, "unauthorized", "Authorization header must be 'Bearer <token>'")
    token = repo.find_token(session, secret.strip())
    if token is None:
        raise ApiError(401, "unauthorized", "invalid or revoked token")
    return Principal(project_id=token.project_id)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


RunUidDep = Annotated[
    str | None,
    Header(
        alias=RUN_UID_HEADER,
        max_length=64,
        description="the run's `uid` as `POST /runs` gave it: a write to another run is 404",
    ),
]


def get_run(
    run_id: int, principal: PrincipalDep, session: SessionDep, uid: RunUidDep = None
) -> Run:
    """The run ``run_id`` if it exists and the caller may see it (else 404, never 403: no leak)."""
    return find_run(session, principal, run_id, uid)


def find_run(session: Session, principal: Principal, run_id: int, uid: str | None = None) -> Run:
    """See :func:`get_run`. 404 ``run_not_found`` also when ``uid`` (the client's
    ``X-Spectrawatch-Run-Uid``) is not the run's: the client's run is not on this server (its
    database was replaced or restored), and the client creates it again. A deleted run answers
    404 ``run_deleted`` (to callers that may see its project): a client stops sending to it."""
    run = session.get(Run, run_id)
    if run is None or not principal.can_access(run.project_id):
        raise ApiError(404, "run_not_found", f"run {run_id} does not exist")
    if uid is not None and uid != run.uid:
        raise ApiError(
            404,
            "run_not_found",
            f"run {run_id} on this server is not the run with uid {uid[:64]!r} "
            "(was the server's database replaced?)",
        )
    if run.status == repo.DELETED:
        raise ApiError(404, "run_deleted", f"run {run_id} was deleted")
    return run


RunDep = Annotated[Run, Depends(get_run)]


def get_live_run(run: RunDep, session: SessionDep) -> Run:
    """:func:`get_run` for a write: on PostgreSQL the run stays share-locked until the request
    commits, so a concurrent deletion either waits for this write (and deletes it too) or has
    already made the run a tombstone (404 ``run_deleted`` here)."""
    if not repo.live_runs(session, [run.id]):
        raise ApiError(404, "run_deleted", f"run {run.id} was deleted")
    return run


LiveRunDep = Annotated[Run, Depends(get_live_run)]
