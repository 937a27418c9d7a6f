"""JSON errors: every 4xx/5xx body is ``{"error": {"code": ..., "message": ...}}``."""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from spectrawatch.wire import FrameError
from spectrawatch_server.db.errors import (
    LOCK_NOT_AVAILABLE,
    STATEMENT_TIMEOUTS,
    sqlite_busy,
    sqlstate,
)
from spectrawatch_server.storage.blobs import BlobStoreFull

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error with an HTTP status, a stable code and a message naming the problem."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message, **extra}}, status_code=status, headers=headers
    )


STATIC_URL = "/dashboards/static"  # the dashboards' CSS and JS (mounted by routes/dashboards.py)


def _wants_page(request: Request) -> bool:
    """A browser asking for a dashboard page (not ``/api``, not a static file)."""
    path = request.url.path
    accept = request.headers.get("accept", "")
    return not path.startswith(("/api/", f"{STATIC_URL}/")) and "text/html" in accept


def error_page(status: int, message: str) -> HTMLResponse:
    """The dashboards' error page: the pages' header, the status and the message (escaped), a
    link home; phone-sized with the pages' viewport (it rendered 980 px wide, without a way on)."""
    text = html.escape(message)
    body = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{status} · spectrawatch</title>"
        f"<link rel='stylesheet' href='{STATIC_URL}/spectrawatch.css'></head><body>"
        "<header class='top'><a class='brand' href='/'>spectrawatch</a>"
        "<nav><a href='/'>Runs</a></nav></header><main class='error-page'>"
        f"<h1>{status}</h1><p>{text}</p><p><a href='/'>All runs</a></p></main></body></html>"
    )
    return HTMLResponse(body, status_code=status)


UNPARSED_BODY = "There was an error parsing the body"
"""FastAPI's 400 detail for a body it fails to parse otherwise than with a JSON syntax error
(which is a 422): bytes that are not UTF-8, or JSON nested past Python's recursion limit."""


MethodIndex = list[tuple[re.Pattern[str], frozenset[str]]]


def method_index(routes: Iterable[Any], prefix: str) -> MethodIndex:
    """Each API route's path pattern (served under ``prefix``) and methods: a 405's ``Allow``
    (``app.state.method_index``)."""
    return [
        (compile_path(prefix + route.path)[0], frozenset(route.methods or ()))
        for route in routes
        if isinstance(route, APIRoute)
    ]


def allowed_methods(request: Request, allow: str) -> str:
    """A 405's ``Allow``: Starlette names the first route of the path only (``POST`` for
    ``/runs``, which ``GET`` lists too), so the methods of every route the app's
    :func:`method_index` matches are added; and HEAD wherever GET is (:class:`HeadAsGet`)."""
    methods = {m.strip() for m in allow.split(",") if m.strip()}
    index: MethodIndex = getattr(request.app.state, "method_index", [])
    for pattern, route_methods in index:
        if pattern.match(request.scope["path"]):
            methods |= route_methods
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))


JSON_TYPES = ("application/json",)
"""The body media type of the API's JSON routes (``+json`` suffixes are read as JSON too)."""


def _unsupported_media_type(request: Request, exc: RequestValidationError) -> str | None:
    """Why a body failed as not JSON (415), or None: FastAPI reads the body of a request whose
    Content-Type is not JSON (``curl -d`` sends a form type) as no object at all, and answered
    422 "body: Input should be a valid dictionary"."""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media in JSON_TYPES or media.endswith("+json"):
        return None
    if not any(e.get("loc", ())[:1] == ("body",) for e in exc.errors()):
        return None
    empty = request.headers.get("content-length", "0") == "0"
    if empty and "transfer-encoding" not in request.headers:
        return None  # no body at all: 422 "Field required" says so
    sent = f"this request's is {media!r}" if media else "this request has none"
    return f"the body must be JSON sent with Content-Type: application/json ({sent})"


def _problem(error: Any) -> dict[str, str]:
    """One pydantic/FastAPI validation error as ``{field, message}``; a JSON syntax error
    (loc ``("body", offset)``) names the offset and the parser's reason, not a field."""
    loc = tuple(error.get("loc", ()))
    if error.get("type") == "json_invalid" and loc[:1] == ("body",):
        where = f" at character {loc[1]}" if len(loc) > 1 else ""
        reason = str(error.get("ctx", {}).get("error", "")).strip()
        return {"field": "body", "message": f"malformed JSON{where}: {reason or 'invalid'}"}
    return {"field": ".".join(str(p) for p in loc), "message": str(error.get("msg", ""))}


def _out_of_range_names(request: Request) -> list[str]:
    """The path and query parameters of ``request`` holding an integer beyond 64 bits."""
    pairs = [*request.path_params.items(), *request.query_params.multi_items()]
    return sorted(
        {
            name
            for name, value in pairs
            if isinstance(value, str | int)
            and str(value).lstrip("-").isdigit()
            and not -(2**63) <= int(value) < 2**63
        }
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        if _wants_page(request):
            return error_page(exc.status, exc.message)
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(FrameError)
    async def _frame_error(_: Request, exc: FrameError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        unsupported = _unsupported_media_type(request, exc)
        if unsupported is not None:
            return error_response(415, "unsupported_media_type", unsupported)
        problems = [_problem(e) for e in exc.errors()]
        summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems[:5])
        if _wants_page(request):
            return error_page(422, summary)
        return error_response(422, "invalid_request", summary, problems=problems)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error"
        )
        detail = str(exc.detail)
        if detail == UNPARSED_BODY:
            detail = (
                "the body could not be parsed: not UTF-8, or JSON nested more than about "
                "1,000 levels deep"
            )
        headers = dict(exc.headers or {})  # a 405's Allow
        if "Allow" in headers:
            headers["Allow"] = allowed_methods(request, headers["Allow"])
        if _wants_page(request):
            return error_page(exc.status_code, detail)
        return error_response(exc.status_code, code, detail, headers)

    @app.exception_handler(BlobStoreFull)
    async def _full(_: Request, exc: BlobStoreFull) -> JSONResponse:
        return error_response(507, "storage_full", "blob store is full; frame not stored")

    @app.exception_handler(OverflowError)
    @app.exception_handler(DataError)
    async def _out_of_range(request: Request, exc: Exception) -> JSONResponse:
        if "NUL" in str(exc):  # PostgreSQL text cannot hold U+0000 (a field no schema checks)
            return error_response(
                422, "nul_character", "a text value holds a NUL character (\\u0000)"
            )
        # ids/steps beyond the database's 64-bit integers (or similar value errors)
        names = _out_of_range_names(request)
        message = (
            f"{', '.join(names)} out of range: ids and steps are at most 2**63 - 1"
            if names
            else "a numeric parameter is out of range"
        )
        return error_response(422, "out_of_range", message)

    @app.exception_handler(IntegrityError)
    async def _conflict(_: Request, exc: IntegrityError) -> JSONResponse:
        # a uniqueness or reference constraint broken by a concurrent change
        log.info("integrity error: %s", exc)
        return error_response(
            409, "conflict", "the request conflicts with a concurrent change; retry it"
        )

    @app.exception_handler(OperationalError)
    async def _db_down(_: Request, exc: OperationalError) -> JSONResponse:
        code = sqlstate(exc)
        if code in STATEMENT_TIMEOUTS or sqlite_busy(exc):
            # SPECTRAWATCH_DB_STATEMENT_TIMEOUT_SECONDS / _DB_LOCK_TIMEOUT_SECONDS ran out (on
            # SQLite the lock timeout is the busy timeout): the database is busy (a long lock, a
            # heavy query), not down
            statement = code is not None and code != LOCK_NOT_AVAILABLE
            what = "a database statement" if statement else "a database lock"
            log.warning("database busy: timed out waiting for %s: %s", what.split()[-1], exc)
            return error_response(
                503,
                "database_busy",
                f"the database is busy: timed out waiting for {what}; retry later",
                {"Retry-After": "5"},
            )
        log.warning("database unavailable: %s", exc)
        return error_response(
            503, "database_unavailable", "database unavailable; retry later", {"Retry-After": "5"}
        )

    @app.exception_handler(PoolTimeoutError)
    async def _pool_exhausted(_: Request, exc: PoolTimeoutError) -> JSONResponse:
        # every pooled connection stayed busy for the pool's timeout (a slow or locked
        # database, a burst of clients): transient, like a database outage, not a server bug
        log.warning("database connection pool exhausted: %s", exc)
        return error_response(
            503, "database_busy", "no database connection free; retry later", {"Retry-After": "5"}
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal_error", f"internal error: {type(exc).__name__}")
