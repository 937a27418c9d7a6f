"""``Link`` headers of paged responses that a client behind a proxy can follow.

The request's own URL names the host and scheme the server was reached at: behind a reverse
proxy that sends no ``Forwarded`` / ``X-Forwarded-*`` headers, the internal address
(``http://127.0.0.1:8000``), which the client cannot reach. A link is therefore a relative
reference, path and query, which RFC 8288 §3.2 resolves against the request's URI (the URI the
client asked for); with ``SPECTRAWATCH_PUBLIC_URL`` set, an absolute URL under it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

from fastapi import Request, Response


def next_link(
    request: Request, public_url: str | None, drop: tuple[str, ...] = (), **params: Any
) -> str:
    """The ``Link`` header value (``<ref>; rel="next"``) of the request's URL with ``params``
    set and the ``drop`` query parameters removed: ``/path?query``, or
    ``<public_url>/path?query`` when the server has a public URL."""
    url = request.url.remove_query_params(list(drop)).include_query_params(**params)
    ref = f"{url.path}?{url.query}" if url.query else url.path
    if public_url:
        ref = public_url.rstrip("/") + ref
    return f'<{ref}>; rel="next"'


class _HasId(Protocol):
    @property
    def id(self) -> int: ...


Row = TypeVar("Row", bound=_HasId)


def keyset_page(
    request: Request, response: Response, public_url: str | None, rows: Sequence[Row], limit: int
) -> Sequence[Row]:
    """The first ``limit`` of ``rows`` (read newest first, ``limit + 1`` of them); when there
    were more, ``Link: rel="next"`` on ``response`` names the next page by ``before_id`` (the
    page's last id, ``offset`` dropped), which no row created or deleted meanwhile shifts."""
    if len(rows) <= limit:
        return rows
    rows = rows[:limit]
    response.headers["Link"] = next_link(
        request, public_url, drop=("offset",), before_id=rows[-1].id
    )
    return rows


def page_link(public_url: str | None, path: str) -> str:
    """A dashboard page's link: ``path``, or ``<public_url><path>`` when the server has a public
    URL (as :func:`next_link`'s references)."""
    return public_url.rstrip("/") + path if public_url else path
