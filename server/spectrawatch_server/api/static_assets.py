"""The dashboards' static files with content-versioned URLs.

Pages link ``/dashboards/static/NAME?v=DIGEST`` (:func:`asset_url`, the first 12 hex digits of
the file's SHA-256): a browser caches such a response for a year without asking again
(``immutable``: the 4.6 MB ``plotly.min.js`` is not even revalidated on a run page's load), and
an upgrade that changes a file changes its URL, so a page never runs a new template with an old
script. A URL without the current digest (an old page, a hand-typed one) is served with
``no-cache``: revalidated (ETag) on every use.

Text files (scripts, styles, JSON) go gzip-compressed to a browser that accepts it, compressed
once a process and kept: ``plotly.min.js`` is 4.8 MB as is, 1.5 MB gzipped, which a page's
first load waited for.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from functools import cache
from pathlib import Path
from urllib.parse import parse_qs

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"
COMPRESSED_SUFFIXES = frozenset({".js", ".css", ".json", ".svg", ".html", ".map", ".txt"})
COMPRESS_MIN_BYTES = 1024  # smaller files gain less than the header costs


@cache
def gzipped(path: Path, mtime_ns: int, size: int) -> bytes:
    """``path``'s bytes gzip-compressed (level 6), once per version of the file (``mtime_ns``
    and ``size`` key the cache)."""
    return gzip.compress(path.read_bytes(), compresslevel=6, mtime=0)


def accepts_gzip(scope: Scope) -> bool:
    """Whether the request's ``Accept-Encoding`` takes gzip (not refused with ``q=0``) and asks
    no byte range (a range is of the file as stored)."""
    headers = Headers(scope=scope)
    if "range" in headers:
        return False
    for part in headers.get("accept-encoding", "").split(","):
        name, _, params = part.strip().partition(";")
        if name.strip().lower() in ("gzip", "*"):
            return params.replace(" ", "").lower() not in ("q=0", "q=0.0", "q=0.00", "q=0.000")
    return False


def gzip_response(response: Response, full_path: Path, stat_result: os.stat_result) -> Response:
    """``response`` (a 200 of file ``full_path``) as its gzip-compressed bytes: its headers but
    the length, ``Content-Encoding: gzip`` and a weak ETag (the same file, another encoding;
    an ``If-None-Match`` with it still answers 304)."""
    body = gzipped(full_path, stat_result.st_mtime_ns, stat_result.st_size)
    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
    headers["content-encoding"] = "gzip"
    headers["vary"] = "Accept-Encoding"
    if "etag" in headers:
        headers["etag"] = weak_etag(headers["etag"])
    return Response(body, status_code=response.status_code, headers=headers)


def weak_etag(etag: str) -> str:
    """``etag`` as a weak validator: the gzip bytes are the same file in another encoding."""
    return etag if not etag or etag.startswith("W/") else "W/" + etag


@cache
def asset_digests(directory: Path) -> dict[str, str]:
    """``{relative name: digest}`` of every file under ``directory``, read once a process (the
    package's files do not change while it runs)."""
    out = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
            out[path.relative_to(directory).as_posix()] = digest
    return out


def asset_url(static_url: str, directory: Path, name: str) -> str:
    """The versioned URL of static file ``name`` (KeyError for a file that is not there: a
    template naming a missing file fails its first render, in the tests)."""
    return f"{static_url}/{name}?v={asset_digests(directory)[name]}"


class VersionedStaticFiles(StaticFiles):
    """:class:`StaticFiles` answering a request for the current version of a file (``?v=``
    equal to its digest) with a year-long immutable ``Cache-Control``, any other with
    ``no-cache``."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory=str(directory))
        self.root = directory

    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        try:
            name = Path(full_path).resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:  # a link out of the folder: served, never as immutable
            name = ""
        path = Path(full_path)
        if path.suffix in COMPRESSED_SUFFIXES and stat_result.st_size >= COMPRESS_MIN_BYTES:
            if response.status_code in (200, 304):
                response.headers["Vary"] = "Accept-Encoding"
            if response.status_code == 200 and accepts_gzip(scope):
                response = gzip_response(response, path, stat_result)
            elif response.status_code == 304 and accepts_gzip(scope) and "etag" in response.headers:
                # the validators the gzip 200 would carry (RFC 9110 15.4.5): its weak ETag
                response.headers["etag"] = weak_etag(response.headers["etag"])
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        current = bool(name) and query.get("v") == [asset_digests(self.root).get(name)]
        response.headers["Cache-Control"] = IMMUTABLE if current else REVALIDATE
        return response
