"""Reading every item of a paged list endpoint, as :class:`~spectrawatch.api.Api` and the CLI do.

A server that sends ``Link: <...>; rel="next"`` (RFC 8288) names each next page itself (for
``GET /runs`` by ``before_id``: stable while runs are created or deleted); an older server that
sends none is paged by ``offset``, where an item created between pages shifts the next page and
comes back twice: it is kept once, by its ``id``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

# one GET: a path and its query, or a link's URL (None: its own query, which a query replaces)
Send = Callable[[str | httpx.URL, dict[str, Any] | None], httpx.Response]


def next_url(resp: httpx.Response) -> httpx.URL | None:
    """The URL of ``resp``'s ``Link: <...>; rel="next"``, resolved against the URL of the
    request it answered (a relative reference, or a URL under the server's public URL); one
    naming another origin (a public URL this client does not use) keeps its query on this
    client's own URL: the token is sent to no other host. None without such a link."""
    link = resp.links.get("next", {}).get("url")
    if not link:
        return None
    here = resp.url
    url = here.join(link)
    if (url.scheme, url.host, url.port) != (here.scheme, here.host, here.port):
        url = here.copy_with(query=url.query)
    return url


def read_pages(
    send: Send, path: str, params: dict[str, Any], page: int, most: int | None = None
) -> list[Any]:
    """Every item (at most ``most``) of the list endpoint ``path`` with query ``params``, read
    ``page`` at a time: by the ``Link`` the server sends, else by ``offset``; an item whose
    ``id`` was already read is left out."""
    seen: set[Any] = set()
    found: list[Any] = []
    read, linked = 0, False
    asked = _size(page, most, 0)
    resp = send(path, {**params, "limit": asked, "offset": 0})
    while True:
        items = resp.json()
        read += len(items)
        found += _unseen(items, seen)
        if most is not None and len(found) >= most:
            return found[:most]
        link = next_url(resp)
        if link == resp.url or (link is None and (linked or len(items) < asked)):
            return found  # the last page (or a link to itself: nothing more to read)
        asked = _size(page, most, len(found))
        if link is not None:
            linked = True
            resp = send(link if asked == page else link.copy_set_param("limit", asked), None)
        else:
            resp = send(path, {**params, "limit": asked, "offset": read})


def _size(page: int, most: int | None, have: int) -> int:
    """Items to ask for next: a ``page``, or fewer when only ``most - have`` are wanted."""
    return page if most is None else min(page, most - have)


def _unseen(items: list[Any], seen: set[Any]) -> list[Any]:
    """``items`` without those whose ``id`` is in ``seen`` (which gains the rest's ids)."""
    out = []
    for item in items:
        key = item.get("id") if isinstance(item, dict) else None
        if key is not None:
            if key in seen:
                continue
            seen.add(key)
        out.append(item)
    return out
