"""What every server-talking CLI command shares: ``--url``/``--token``, one API call with the
server's error message, ``error:`` lines and exit 1 for a failed call, ``--json`` or lines."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx

from spectrawatch._paging import read_pages
from spectrawatch._reply import ACCEPT_ENCODING, REPLY_MAX, ReplyError, read_reply
from spectrawatch._transport import error_of, parse_retry_after
from spectrawatch.config import DEFAULT_URL, url_problem


class CliError(Exception):
    """A failed API call, with the server's message (and HTTP ``status`` when it answered)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def server_url(args: argparse.Namespace) -> str:
    """The server root URL: ``--url``, else ``SPECTRAWATCH_URL``, else the default."""
    url = str(args.url or os.environ.get("SPECTRAWATCH_URL") or DEFAULT_URL).rstrip("/")
    problem = url_problem(url)
    if problem is not None:
        raise CliError(f"--url {url!r:.200}: {problem}")
    return url


def _client(args: argparse.Namespace) -> httpx.Client:
    url = server_url(args)
    token = args.token or os.environ.get("SPECTRAWATCH_TOKEN")
    headers = {"accept-encoding": ACCEPT_ENCODING}
    if token:
        headers["authorization"] = f"Bearer {token}"
    return httpx.Client(base_url=f"{url}/api/v1", headers=headers, timeout=30)


def server_args() -> argparse.ArgumentParser:
    """The ``--url``/``--token`` options every server-talking command shares (a parent parser)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=None, help=f"server URL (SPECTRAWATCH_URL, {DEFAULT_URL})")
    common.add_argument("--token", default=None, help="API token (SPECTRAWATCH_TOKEN)")
    return common


def segment(text: str) -> str:
    """``text`` as one URL path segment: every reserved character percent-encoded (a project
    named ``a?b``, ``a#b`` or ``50%``), and ``.``/``..`` too, which URL normalisation would
    otherwise resolve away."""
    quoted = quote(text, safe="")
    return quoted.replace(".", "%2E") if text in (".", "..") else quoted


# 503s whose request changed nothing (the transaction was rolled back): safe to send again
RETRIED_CODES = ("database_busy", "database_unavailable")
BUSY_RETRIES = 3  # after the first attempt; each waits Retry-After, at most BUSY_WAIT_MAX_S
BUSY_WAIT_MAX_S = 10.0


def call(
    args: argparse.Namespace, method: str, path: str, max_bytes: int = REPLY_MAX, **kwargs: Any
) -> Any:
    """One request to ``/api/v1{path}``: its JSON (None for 204), or :class:`CliError`, also
    for a reply larger than ``max_bytes``. A 503 ``database_busy`` / ``database_unavailable``
    (a lock held by an analysis, a database restarting) is sent again after its
    ``Retry-After``, up to :data:`BUSY_RETRIES` times."""
    response = request(args, method, path, max_bytes, **kwargs)
    return None if response.status_code == 204 else response.json()


PAGE_MAX = 1000  # the most items a list endpoint returns per request


def call_pages(
    args: argparse.Namespace, path: str, params: dict[str, Any], most: int | None = None
) -> list[Any]:
    """Every item (at most ``most``) of the list endpoint ``/api/v1{path}``, a request per
    :data:`PAGE_MAX`: by the server's ``Link: rel="next"``, else (an older server) by offset,
    an item read twice kept once (:func:`~spectrawatch._paging.read_pages`)."""

    def send(target: str | httpx.URL, query: dict[str, Any] | None) -> httpx.Response:
        return request(args, "GET", target, params=query)

    return read_pages(send, path, params, PAGE_MAX, most)


def request(
    args: argparse.Namespace,
    method: str,
    path: str | httpx.URL,
    max_bytes: int = REPLY_MAX,
    **kwargs: Any,
) -> httpx.Response:
    """:func:`call`'s request (a path under ``/api/v1``, or a server's absolute link): the
    response, read; :class:`CliError` for an error status."""
    with _client(args) as client:
        for attempt in range(BUSY_RETRIES + 1):
            try:
                response = read_reply(
                    client, client.build_request(method, path, **kwargs), max_bytes
                )
            except ReplyError as exc:
                raise CliError(f"{method} {path}: {exc}") from exc
            except httpx.HTTPError as exc:
                raise CliError(f"cannot reach the server: {exc}") from exc
            wait = _busy_wait(response)
            if wait is None or attempt == BUSY_RETRIES:
                break
            print(f"server busy ({error_of(response)[1]}); again in {wait:g} s", file=sys.stderr)
            time.sleep(wait)
    if response.status_code >= 400:
        _, message = error_of(response)
        raise CliError(f"HTTP {response.status_code}: {message}", response.status_code)
    return response


def _busy_wait(response: httpx.Response) -> float | None:
    """Seconds to wait before sending a request that got a retryable 503 again; else None."""
    if response.status_code != 503 or error_of(response)[0] not in RETRIED_CODES:
        return None
    after = parse_retry_after(response.headers.get("retry-after"))  # None: absent or nonsense
    return min(1.0 if after is None else after, BUSY_WAIT_MAX_S)


# C0/C1 controls (ESC sequences clear or retitle a terminal, CR/LF forge lines) and the bidi
# overrides and isolates that reorder what a reader sees
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\\x1b``): values other processes stored (a
    run's config, a client's last error) cannot drive the terminal of whoever reads them."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def print_result(args: argparse.Namespace, data: Any, lines: list[str]) -> None:
    """``data`` as JSON with ``--json``, else ``lines`` (``(none)`` when there are none), each
    with its control characters escaped."""
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print("\n".join(map(printable, lines)) if lines else "(none)")


def reporting_errors(
    func: Callable[[argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    """``func`` with a failed API call printed as ``error: ...`` on stderr and exit code 1."""

    def wrapped(args: argparse.Namespace) -> int:
        try:
            code: int = func(args)
        except CliError as exc:
            print(printable(f"error: {exc}"), file=sys.stderr)
            return 1
        return code

    return wrapped
