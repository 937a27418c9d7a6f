"""The OpenAPI document as the server behaves: every operation declares the error statuses it
can answer, each with the one error schema the server sends (:class:`ErrorBody`, never
FastAPI's ``HTTPValidationError``); bearer-token security where the route checks a token;
operation ids that are the route functions' names; tags with descriptions; integer bounds as
integers."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from fastapi.routing import APIRoute

from spectrawatch.wire import MAX_STEP
from spectrawatch_server.api.deps import route_role
from spectrawatch_server.api.known_query import query_names
from spectrawatch_server.schemas import ErrorBody

SCHEMAS_REF = "#/components/schemas/"
ERROR_SCHEMA = {"$ref": f"{SCHEMAS_REF}{ErrorBody.__name__}"}
FASTAPI_422 = ("HTTPValidationError", "ValidationError")  # FastAPI's schemas, never sent

ERRORS = {
    400: "`bad_request`: the body could not be parsed (not UTF-8, JSON nested too deep)",
    401: "`unauthorized`: no `Authorization: Bearer` token (on a server that requires auth), "
    "or a malformed, unknown or revoked one",
    403: "`insufficient_role`: the token's role is below the one this needs; `forbidden`: "
    "the token is for another project",
    404: "`*_not_found`: no such object, or one of a project the token may not see; "
    "`run_deleted`: the run was deleted",
    409: "`conflict`: a concurrent change broke a constraint; retry",
    413: "`too_large`: the body exceeds the server's limit (`SPECTRAWATCH_MAX_JSON_BYTES`)",
    415: "`unsupported_media_type`: the body is not sent as `application/json`",
    422: "`invalid_request` (each invalid field in `problems`), `out_of_range` (an id or step "
    "beyond 64 bits), `nul_character`",
    503: "`database_busy` / `database_unavailable`: retry after `Retry-After` seconds",
}


def error(description: str) -> dict[str, Any]:
    """A ``responses=`` entry of a route: an error answer with :class:`ErrorBody`."""
    return {"model": ErrorBody, "description": description}


PROJECT_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: error(
        "`project_not_found` / `run_not_found`: the project (or run) the body names does not "
        "exist, or the token may not see it"
    )
}
"""``responses=`` of a route whose body names a project or run."""


def error_statuses(route: APIRoute, method: str) -> list[int]:
    """The error statuses of :data:`ERRORS` that ``method`` on ``route`` can answer, from what
    it declares: a token (401), a role above ``read`` (403), an object named in its path or
    a ``project`` filter (404), a write (409), a JSON body (400, 413, 415)."""
    roles, authenticates = route_role(route.dependant)
    statuses = [422, 503]
    if authenticates:
        statuses.append(401)
    if any(role != "read" for role in roles):
        statuses.append(403)
    if "{" in route.path or "project" in query_names(route.dependant):
        statuses.append(404)
    if method != "GET":
        statuses.append(409)
    if route.body_field is not None:
        statuses += [400, 413, 415]
    return sorted(statuses)


def document_errors(schema: dict[str, Any], routes: Iterable[Any], prefix: str) -> None:
    """Give each operation of ``schema`` (an OpenAPI document; ``routes`` served under
    ``prefix``) its :func:`error_statuses` with :class:`ErrorBody` (a route's own
    ``responses=`` entry for a status stays), and the ``ErrorBody`` schema in place of
    FastAPI's 422 ``HTTPValidationError``; idempotent."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, definition in _error_schemas().items():
        components.setdefault(name, definition)
    paths = schema.get("paths", {})
    for operations in paths.values():
        for operation in operations.values():
            _replace_default_422(operation["responses"])
    for name in FASTAPI_422:  # referred to by nothing now
        components.pop(name, None)
    for route, method, operation in _operations(schema, routes, prefix):
        _declare_errors(operation["responses"], error_statuses(route, method))


BEARER = "bearerAuth"
BEARER_SCHEME = {
    "type": "http",
    "scheme": "bearer",
    "description": "a token from `spectrawatch token create` (`sw_...`), with the role each "
    "operation names; a server without `--require-auth` also answers without one",
}


def document_security(schema: dict[str, Any], routes: Iterable[Any], prefix: str) -> None:
    """Declare HTTP bearer auth in ``schema`` and require it on each operation whose route
    authenticates the caller (health, readiness and the docs stay open); idempotent."""
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})[BEARER] = BEARER_SCHEME
    for route, _, operation in _operations(schema, routes, prefix):
        if route_role(route.dependant)[1]:
            operation["security"] = [{BEARER: []}]


def _operations(
    schema: dict[str, Any], routes: Iterable[Any], prefix: str
) -> Iterator[tuple[APIRoute, str, dict[str, Any]]]:
    """Each API route among ``routes`` (served under ``prefix``), method (not HEAD) and its
    operation in ``schema``."""
    paths = schema.get("paths", {})
    for route in routes:
        if not isinstance(route, APIRoute):
            continue
        for method in sorted((route.methods or set()) - {"HEAD"}):
            operation = paths.get(prefix + route.path, {}).get(method.lower())
            if operation is not None:
                yield route, method, operation


def _replace_default_422(responses: dict[str, Any]) -> None:
    """FastAPI's 422 (``HTTPValidationError``, a body the server never sends) becomes ours."""
    default = responses.get("422", {}).get("content", {}).get("application/json", {})
    if default.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
        responses["422"] = _error_response(ERRORS[422])


def _declare_errors(responses: dict[str, Any], statuses: list[int]) -> None:
    """Add ``statuses`` to an operation's ``responses`` (those it has stay)."""
    for status in statuses:
        responses.setdefault(str(status), _error_response(ERRORS[status]))


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ERROR_SCHEMA}}}


def _error_schemas() -> dict[str, Any]:
    """:class:`ErrorBody`'s JSON schema and those it refers to, by component name."""
    definition = ErrorBody.model_json_schema(ref_template=SCHEMAS_REF + "{model}")
    nested: dict[str, Any] = definition.pop("$defs", {})
    return {ErrorBody.__name__: definition, **nested}


TAGS = [
    {"name": "health", "description": "Liveness (`/health`) and readiness (`/ready`); no token."},
    {"name": "tokens", "description": "What the calling token may do (`GET /token`)."},
    {"name": "projects", "description": "Projects: get-or-create, list, delete with all runs."},
    {"name": "runs", "description": "Runs: create or resume by name, list, update, delete."},
    {
        "name": "frames",
        "description": "Frame ingest (safetensors, optionally zstd) and the frames of a run.",
    },
    {"name": "scalars", "description": "Logged scalars (loss, accuracy): ingest and read."},
    {
        "name": "metrics",
        "description": "Analysis results: metric series, catalog, spectra, SED lag; imports.",
    },
    {"name": "alerts", "description": "Alert episodes and each project's alert rules."},
    {"name": "webhooks", "description": "Webhooks and their deliveries (admin tokens)."},
    {"name": "blobs", "description": "Releasing the stored frame blobs of ended runs."},
    {"name": "dashboards", "description": "The dashboards' figures (Plotly JSON) and tables."},
]
"""The document's tags, in the order Swagger UI lists them."""


def operation_id(route: APIRoute) -> str:
    """An operation's id: its route function's name (``list_runs``), unique across the API."""
    return route.name


INTEGER_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
EXACT_BOUNDS = {float(bound): bound for bound in (MAX_STEP, 2**63 - 1)}
"""Bounds the API uses whose float (FastAPI's OpenAPI models keep bounds as floats) is not
the integer: ``2**63 - 1`` became ``9.223372036854776e+18``."""


def exact_integer_bounds(node: Any) -> None:
    """Write the bounds of every ``integer`` schema under ``node`` as integers (in place)."""
    if isinstance(node, list):
        for item in node:
            exact_integer_bounds(item)
    if not isinstance(node, dict):
        return
    if node.get("type") == "integer":
        for key in INTEGER_BOUNDS:
            value = node.get(key)
            if isinstance(value, float) and value.is_integer():
                node[key] = EXACT_BOUNDS.get(value, int(value))
    for child in node.values():
        exact_integer_bounds(child)
