"""Every ``/api/v1`` route refuses a query parameter it does not declare: 422 naming it and the
ones the route takes. Ignored, a filter the server lacks or a typo read as no filter at all
(``GET /runs?status=running`` listed finished runs, ``/metrics?layr=0.weight`` every layer).

A parameter taking one value that is given twice is refused too (422 naming it): read as its
last value, ``/alerts?status=open&status=resolved`` listed the resolved alerts alone, where a
client meant both (``/runs?status=a&status=b`` lists either: ``status`` there is a list). Only
a parameter declared as a list may be repeated."""

from __future__ import annotations

import types
from typing import Any, Union, get_args, get_origin

from fastapi import Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

_LISTS = (list, tuple, set, frozenset)


def query_names(dependant: Dependant) -> set[str]:
    """The query parameters (as sent: their aliases) of a route's dependency tree."""
    names = {field.alias for field in dependant.query_params}
    for sub in dependant.dependencies:
        names |= query_names(sub)
    return names


def repeatable_names(dependant: Dependant) -> set[str]:
    """The query parameters of a route's dependency tree declared as lists (``list[str]``,
    optional or not): the ones that may be given more than once."""
    names = {f.alias for f in dependant.query_params if _is_list(f.field_info.annotation)}
    for sub in dependant.dependencies:
        names |= repeatable_names(sub)
    return names


def _is_list(annotation: Any) -> bool:
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(_is_list(arg) for arg in get_args(annotation))
    return origin in _LISTS or annotation in _LISTS


def refuse_unknown_query(request: Request) -> None:
    """A router dependency: 422 ``invalid_request`` with a problem per unknown parameter
    (``query.<name>``), whose message lists the parameters the route takes, and one per
    parameter that takes one value but was given several."""
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
    _refuse_repeated(request, route)


def _refuse_repeated(request: Request, route: APIRoute) -> None:
    """422 naming each single-valued parameter given more than once (not read as its last)."""
    repeatable = repeatable_names(route.dependant)
    params = request.query_params
    repeated = sorted(
        name for name in set(params) if name not in repeatable and len(params.getlist(name)) > 1
    )
    if repeated:
        errors = [
            {
                "loc": ("query", name),
                "msg": f"given {len(params.getlist(name))} times; it takes one value",
                "type": "repeated_parameter",
            }
            for name in repeated
        ]
        raise RequestValidationError(errors)


KNOWN_QUERY_ONLY: Any = Depends(refuse_unknown_query)
"""The dependency to include the API's routers with."""
