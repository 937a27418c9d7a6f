"""Typed dependencies: app state, DB session, the caller's principal, scoped lookups."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, get_args

from fastapi import Depends, Header, Request
from fastapi.routing import APIRoute
from sqlalchemy.orm import Session

from spectrawatch.wire import RUN_UID_HEADER
from spectrawatch_server.api.errors import ApiError
from spectrawatch_server.api.state import AppState
from spectrawatch_server.db.models import Alert, Delivery, Run, Webhook
from spectrawatch_server.storage import repository as repo


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.spectrawatch
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def get_session(state: StateDep) -> Iterator[Session]:
    with state.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


Role = Literal["read", "write", "admin"]
ROLES: tuple[Role, ...] = get_args(Role)  # each allows what the ones before it allow
DEFAULT_ROLE: Role = "write"


def parse_role(value: str) -> Role:
    """``value`` as a :data:`Role` (ValueError naming the roles otherwise)."""
    for role in ROLES:
        if value == role:
            return role
    raise ValueError(f"role must be one of {', '.join(ROLES)}, not {value!r}")


@dataclass(frozen=True)
class Principal:
    """Who is calling: a token's project (None: a server-wide token, every project) and role,
    or anonymous local use (``project_id`` None, role ``admin``: a server without
    ``--require-auth`` allows everything). ``token_id``: the token's row (None when anonymous,
    and on frame ingest, whose auth cache does not need it)."""

    project_id: int | None
    role: Role = "admin"
    token_id: int | None = None

    def can_access(self, project_id: int) -> bool:
        return self.project_id is None or self.project_id == project_id

    def allows(self, role: Role) -> bool:
        """Whether this principal's role includes ``role`` (read < write < admin)."""
        return ROLES.index(self.role) >= ROLES.index(role)

    def require(self, role: Role, project: str | None = None) -> None:
        """403 ``insufficient_role`` unless :meth:`allows` ``role``; the message is the command
        that makes such a token (``--project`` is required: ``project``, when known)."""
        if not self.allows(role):
            raise ApiError(
                403,
                "insufficient_role",
                f"this needs a token with role {role!r} or above; this token's role is "
                f"{self.role!r} (spectrawatch token create --project {project or '<project>'} "
                f"--role {role})",
            )


def get_principal(request: Request, state: StateDep, session: SessionDep) -> Principal:
    """Check ``Authorization: Bearer``; anonymous only when the server does not require auth."""
    return authenticate(session, state.settings.require_auth, request.headers.get("authorization"))


def challenge(error: str | None = None) -> dict[str, str]:
    """A 401's ``WWW-Authenticate`` header (RFC 6750): the Bearer scheme, and ``error``
    (``invalid_request``, ``invalid_token``) when a token was sent."""
    value = 'Bearer realm="spectrawatch"' + (f', error="{error}"' if error else "")
    return {"WWW-Authenticate": value}


def authenticate(session: Session, require_auth: bool, header: str | None) -> Principal:
    """The principal for an ``Authorization`` header value (``None`` when absent); 401 with a
    ``WWW-Authenticate: Bearer`` challenge otherwise."""
    if header is None:
        if require_auth:
            raise ApiError(
                401,
                "unauthorized",
                "missing Authorization: Bearer <token> header",
                challenge(),
            )
        return Principal(project_id=None)
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise ApiError(
            401,
            "unauthorized",
            "Authorization header must be 'Bearer <token>'",
            challenge("invalid_request"),
        )
    token = repo.find_token(session, secret.strip())
    if token is None:
        raise ApiError(401, "unauthorized", "invalid or revoked token", challenge("invalid_token"))
    return Principal(project_id=token.project_id, role=parse_role(token.role), token_id=token.id)


PrincipalDep = Annotated[Principal, Depends(get_principal)]

ROLE_ATTRIBUTE = "spectrawatch_role"  # on a role dependency, and on endpoints that check inside


def require_role(role: Role) -> Any:
    """A route dependency (``dependencies=[require_role("admin")]``): 403
    ``insufficient_role`` when the caller's token has a lesser role. The object the route names
    (``run_id``, project ``name``/``project``, ``webhook_id``, ``delivery_id`` in the path) is
    looked up first, on refusal only: one the caller may not see stays a 404, so a 403 tells
    nothing about another project's objects."""

    def check_role(request: Request, principal: PrincipalDep, session: SessionDep) -> None:
        if not principal.allows(role):
            _check_visible(session, principal, request.path_params)
            principal.require(role, _refused_project(session, principal, request.path_params))

    setattr(check_role, ROLE_ATTRIBUTE, role)
    return Depends(check_role)


_F = TypeVar("_F", bound=Callable[..., Any])


def checks_role_inside(role: Role) -> Callable[[_F], _F]:
    """Marks an endpoint that checks ``role`` itself (frame ingest, with its auth cache), for
    the route-table test that every write route declares a role."""

    def mark(endpoint: _F) -> _F:
        setattr(endpoint, ROLE_ATTRIBUTE, role)
        return endpoint

    return mark


def route_role(dependant: Any) -> tuple[list[Role], bool]:
    """The roles a route declares (its ``require_role`` dependencies, or its endpoint's
    :func:`checks_role_inside` mark) and whether it authenticates the caller at all, from its
    FastAPI ``Dependant`` tree."""
    roles: list[Role] = []
    authenticates = False

    def walk(node: Any) -> None:
        nonlocal authenticates
        role = getattr(node.call, ROLE_ATTRIBUTE, None)
        if role is not None:
            roles.append(role)
        authenticates = authenticates or node.call is get_principal
        for sub in node.dependencies:
            walk(sub)

    walk(dependant)
    return roles, authenticates or bool(roles)


def role_line(route: APIRoute) -> str:
    """The sentence an operation's OpenAPI description ends with: the role it requires."""
    roles, authenticates = route_role(route.dependant)
    if not authenticates:
        return "No token needed."
    role = max(roles or ["read"], key=ROLES.index)
    above = "" if role == "admin" else " or above"
    return (
        f"Requires a token with role `{role}`{above} on a server that requires auth "
        "(`--require-auth`); without it, anonymous local use may do everything."
    )


def describe_roles(schema: dict[str, Any], routes: Iterable[Any], prefix: str) -> None:
    """End each operation's description in ``schema`` (an OpenAPI document) with the role its
    route among ``routes`` (served under ``prefix``) requires; idempotent."""
    paths = schema.get("paths", {})
    for route in routes:
        if not isinstance(route, APIRoute):
            continue
        line = role_line(route)
        for method in (route.methods or set()) - {"HEAD"}:
            operation = paths.get(prefix + route.path, {}).get(method.lower())
            if operation is None:
                continue
            description = str(operation.get("description") or "").rstrip()
            if not description.endswith(line):
                operation["description"] = f"{description}\n\n{line}" if description else line


def _check_visible(session: Session, principal: Principal, params: dict[str, Any]) -> None:
    """404 as the route's own lookup would answer, for the object a refused route names."""
    if "run_id" in params:
        find_run(session, principal, _int(params["run_id"], "run_not_found", "run"))
    name = params.get("project", params.get("name"))
    if isinstance(name, str):
        project = repo.get_project(session, name)
        if project is None or not principal.can_access(project.id):
            raise ApiError(404, "project_not_found", f"project {name!r} does not exist")
    if "webhook_id" in params:
        hook_id = _int(params["webhook_id"], "webhook_not_found", "webhook")
        hook = session.get(Webhook, hook_id)
        if hook is None or not principal.can_access(hook.project_id):
            raise ApiError(404, "webhook_not_found", f"webhook {hook_id} does not exist")
    if "alert_id" in params:
        find_alert(session, principal, _int(params["alert_id"], "alert_not_found", "alert"))
    if "delivery_id" in params:
        delivery_id = _int(params["delivery_id"], "delivery_not_found", "delivery")
        delivery = session.get(Delivery, delivery_id)
        hook = None if delivery is None else session.get(Webhook, delivery.webhook_id)
        if hook is None or not principal.can_access(hook.project_id):
            raise ApiError(404, "delivery_not_found", f"delivery {delivery_id} does not exist")


def find_alert(session: Session, principal: Principal, alert_id: int) -> Alert:
    """Alert ``alert_id`` of a run the caller may see, else 404 ``alert_not_found``."""
    alert = session.get(Alert, alert_id)
    run = None if alert is None else session.get(Run, alert.run_id)
    if alert is None or run is None or not principal.can_access(run.project_id):
        raise ApiError(404, "alert_not_found", f"alert {alert_id} does not exist")
    return alert


def _refused_project(session: Session, principal: Principal, params: dict[str, Any]) -> str | None:
    """The project a refused caller needs another token for: its token's own, else (a
    server-wide token) the one the route names, by name or by run; None when neither."""
    project_id = principal.project_id
    if project_id is None and "run_id" in params:
        project_id = find_run(
            session, principal, _int(params["run_id"], "run_not_found", "run")
        ).project_id
    if project_id is not None:
        return project_name(session, project_id)
    name = params.get("project", params.get("name"))
    return name if isinstance(name, str) else None


def project_name(session: Session, project_id: int) -> str | None:
    """Project ``project_id``'s name, for messages (None: deleted meanwhile)."""
    return repo.project_names(session, [project_id]).get(project_id)


def _int(value: Any, code: str, what: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ApiError(404, code, f"{what} {value!r} does not exist") from None
    if not 0 < number < 2**63:
        raise ApiError(404, code, f"{what} {value} does not exist")
    return number


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
