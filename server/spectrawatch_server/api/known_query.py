"""Every ``/api/v1`` route refuses a query parameter it does not declare: 422 naming it and the
ones the route takes. Ignored, a filter the server lacks or a typo read as no filter at all
(``GET /runs?status=running`` listed finished runs, ``/metrics?layr=0.weight`` every layer)."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute


def query_names(dependant: Dependant) -> set[str]:
    """The query parameters (as sent: their aliases) of a route's dependency tree."""
    names = {field.alias for field in dependant.query_params}
    for sub in dependant.dependencies:
        names |= query_names(sub)
    return names


def refuse_unknown_query(request: Request) -> None:
    """A router dependency: 422 ``invalid_request`` with a problem per unknown parameter
    (``query.<name>``), whose message lists the parameters the route takes."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    known = query_names(route.dependant)
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        takes = ", ".join(sorted(known)) or "no query parameters"
        message = f"unknown query parameter; {request.method} {request.url.path} takes: {takes}"
        errors = [
            {"loc": ("query", name), "msg": message, "type": "extra_forbidden"} for name in unknown
        ]
        raise RequestValidationError(errors)


KNOWN_QUERY_ONLY: Any = Depends(refuse_unknown_query)
"""The dependency to include the API's routers with."""
