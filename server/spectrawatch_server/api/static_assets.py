"""The dashboards' static files with content-versioned URLs.

Pages link ``/dashboards/static/NAME?v=DIGEST`` (:func:`asset_url`, the first 12 hex digits of
the file's SHA-256): a browser caches such a response for a year without asking again
(``immutable``: the 4.6 MB ``plotly.min.js`` is not even revalidated on a run page's load), and
an upgrade that changes a file changes its URL, so a page never runs a new template with an old
script. A URL without the current digest (an old page, a hand-typed one) is served with
``no-cache``: revalidated (ETag) on every use.
"""

from __future__ import annotations

import hashlib
import os
from functools import cache
from pathlib import Path
from urllib.parse import parse_qs

from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"


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
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        current = bool(name) and query.get("v") == [asset_digests(self.root).get(name)]
        response.headers["Cache-Control"] = IMMUTABLE if current else REVALIDATE
        return response
