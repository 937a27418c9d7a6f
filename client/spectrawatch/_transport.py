"""The HTTP API as the client sees it: one method per endpoint, errors sorted by what to do next.

:class:`Api` wraps an ``httpx.Client``; pass ``transport=httpx.MockTransport(handler)`` to test
without a server (the httpx way of swapping the network out). Two error types matter:
:class:`Unavailable` (connection failure, timeout, 5xx, 408/429: retry later, spool meanwhile;
its ``retry_after`` holds the server's ``Retry-After`` in seconds when it sent one)
and :class:`Rejected` (any other 4xx: the request itself is wrong; retrying cannot help).

httpx's timeouts bound each connect, read and write, not a request as a whole: a server that
answers one byte a second would hold the caller forever. So every request runs on its own daemon
thread and is abandoned (as :class:`Unavailable`) when it has not completed within
``deadline_s`` plus one second per ``_MIN_RATE`` bytes of body, or by :attr:`Api.not_after`
(the sender's flush deadline). An abandoned request may still complete later; everything the
client sends is idempotent (frames by their key, scalars by (step, name)), so sending it again
from the spool is safe. At most ``_MAX_ABANDONED`` abandoned requests are left running; while
that many are, new requests fail at once instead of piling up connections; an abandoned one
stops reading at its next chunk of reply. No reply is read past :data:`_REPLY_MAX` bytes (a
run's, which echoes its config and summary: :data:`_RUN_REPLY_MAX`; both plus twice the JSON
body sent), compressed or not
(:func:`~spectrawatch._reply.read_reply`): a server answering without end cannot fill the
training process's memory.
"""

from __future__ import annotations

import email.utils
import html
import json
import math
import re
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import httpx

from spectrawatch._reply import ACCEPT_ENCODING, read_reply
from spectrawatch.config import API_PATH
from spectrawatch.wire import IDEMPOTENCY_HEADER, RUN_UID_HEADER

_RETRYABLE_4XX = frozenset({408, 425, 429})
_MIN_RATE = 100_000  # bytes/s an upload is allowed on top of ``deadline_s``
_MAX_ABANDONED = 2
_REPLY_MAX = 4 << 20  # bytes of a reply read at most
_RUN_REPLY_MAX = 80 << 20
"""A run's reply echoes its config and summary, each up to the server's default JSON body
limit (32 MiB), stored by whichever process sent them: a resumed run's reply may be that large
though this process sent none of it."""


class ApiError(Exception):
    """Base of the errors :class:`Api` raises."""

    def __init__(self, message: str, status: int | None = None, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Unavailable(ApiError):
    """The server could not be reached or answered 5xx/408/429: try again later
    (``retry_after``: the seconds its ``Retry-After`` header asked for, if any)."""

    def __init__(
        self,
        message: str,
        status: int | None = None,
        code: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status, code)
        self.retry_after = retry_after


_RETRY_AFTER_MAX_CHARS = 64  # an HTTP-date has 29; a longer value is no Retry-After


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date), else None.

    Never raises, and is finite: the value is another party's text (a server, a proxy, a webhook
    receiver) and a caller that crashed on it lost what it was sending."""
    if not value:
        return None
    value = value.strip()
    if len(value) > _RETRY_AFTER_MAX_CHARS:
        return None
    if value.isascii() and value.isdigit():  # isdigit() alone takes "²", which float() refuses
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


class Rejected(ApiError):
    """The server refused the request (4xx): do not retry it."""


def idempotency_key(run_id: int | str, seq: int) -> str:
    """``{run_id}:{seq}`` -- the key a frame is deduplicated by on the server."""
    return f"{run_id}:{seq}"


class Api:
    """Typed calls to the spectrawatch server (DESIGN §4)."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout_s: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        deadline_s: float | None = None,
    ) -> None:
        headers = {"User-Agent": "spectrawatch-client", "Accept-Encoding": ACCEPT_ENCODING}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._client = httpx.Client(
            base_url=url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
            transport=transport,
        )
        self.deadline_s = 3 * timeout_s if deadline_s is None else deadline_s
        self.not_after = math.inf  # monotonic time after which no request may still run
        self._abandoned: list[threading.Thread] = []

    def close(self) -> None:
        self._client.close()

    def _send(
        self,
        method: str,
        path: str,
        content: bytes | None,
        reply_max: int = _REPLY_MAX,
        **kwargs: Any,
    ) -> httpx.Response:
        """``httpx.Client.request`` bounded as a whole (see the module docstring); the reply is
        read to ``reply_max`` bytes, or to twice the JSON body sent and 4 MiB (an echo)."""
        size = len(content) if content else 0
        budget = self.deadline_s + size / _MIN_RATE
        if self.not_after <= time.monotonic():
            raise Unavailable(f"{method} {path}: not sent, the flush deadline has passed")
        self._abandoned = [t for t in self._abandoned if t.is_alive()]
        if len(self._abandoned) >= _MAX_ABANDONED:
            raise Unavailable(
                f"{method} {path}: not sent, {len(self._abandoned)} earlier requests are "
                "still unanswered (server too slow)"
            )
        request = self._client.build_request(method, API_PATH + path, content=content, **kwargs)
        echo = 2 * len(request.content) if kwargs.get("json") is not None else 0
        limit = max(reply_max, _REPLY_MAX + echo)
        outcome: list[httpx.Response | BaseException] = []
        abandoned = threading.Event()

        def call() -> None:
            try:
                outcome.append(read_reply(self._client, request, limit, abandoned))
            except BaseException as exc:  # handed to the caller, never raised here
                outcome.append(exc)

        worker = threading.Thread(target=call, name="spectrawatch-request", daemon=True)
        worker.start()
        start = time.monotonic()
        end = start + budget
        while worker.is_alive():  # in slices: ``not_after`` may be moved meanwhile (finish)
            left = min(end, self.not_after) - time.monotonic()
            if left <= 0:
                self._abandoned.append(worker)
                abandoned.set()
                waited = time.monotonic() - start
                raise Unavailable(f"{method} {path}: no complete reply in {waited:.1f} s")
            worker.join(min(left, 0.25))
        result = outcome[0]
        if isinstance(result, httpx.HTTPError):  # connect/read/write errors and timeouts
            raise Unavailable(f"{method} {path}: {type(result).__name__}: {result}") from result
        if isinstance(result, BaseException):
            raise result
        return result

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        reply_max: int = _REPLY_MAX,
    ) -> Any:
        resp = self._send(method, path, content, reply_max, json=json, headers=headers)
        if resp.status_code >= 400:
            code, message = error_of(resp)
            text = f"{method} {path} -> {resp.status_code}{f' {code}' if code else ''}: {message}"
            if resp.status_code >= 500 or resp.status_code in _RETRYABLE_4XX:
                wait = parse_retry_after(resp.headers.get("retry-after"))
                raise Unavailable(text, resp.status_code, code, wait)
            raise Rejected(text, resp.status_code, code)
        if not 200 <= resp.status_code < 300:  # redirects are not followed: nothing was stored
            where = resp.headers.get("location", "")
            raise Unavailable(
                f"{method} {path} -> {resp.status_code} (redirect to {where!r}: point the client "
                "at the server's final URL)",
                resp.status_code,
                "redirect",
            )
        if not resp.content:
            body: Any = {}
        else:
            try:
                body = resp.json()
            except ValueError:
                body = {}
        if isinstance(body, dict):
            body.setdefault("_status", resp.status_code)
        return body

    def health(self) -> dict[str, Any]:
        out: dict[str, Any] = self._request("GET", "/health")
        return out

    def create_project(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = self._request("POST", "/projects", json={"name": name})
        return out

    def create_run(
        self,
        project: str,
        name: str,
        config: Mapping[str, Any] | None = None,
        tags: Sequence[str] | None = None,
        *,
        resume: bool = True,
    ) -> dict[str, Any]:
        """Create the run, or get the existing one of that name (resume: ``_status`` 200); with
        ``resume=False`` an existing one is refused (:class:`Rejected` 409 ``run_exists``)."""
        body: dict[str, Any] = {"project": project, "name": name}
        if not resume:
            body["resume"] = False
        if config:
            body["config"] = finite_json(dict(config))
        if tags:
            body["tags"] = list(tags)
        out: dict[str, Any] = self._request("POST", "/runs", json=body, reply_max=_RUN_REPLY_MAX)
        return out

    # The writes to a run take its ``uid`` (from ``create_run``; None for a server older than
    # run uids): a server whose run ``run_id`` is another run answers 404 ``run_not_found``.

    def update_run(
        self,
        run_id: int | str,
        status: str,
        summary: Mapping[str, Any] | None = None,
        uid: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"status": status}
        if summary:
            body["summary"] = finite_json(dict(summary))
        out: dict[str, Any] = self._request(
            "PATCH",
            f"/runs/{run_id}",
            json=body,
            headers=_uid_header(uid),
            reply_max=_RUN_REPLY_MAX,
        )
        return out

    def post_frame(
        self,
        run_id: int | str,
        seq: int,
        body: bytes,
        encoding: str | None = None,
        uid: str | None = None,
    ) -> dict[str, Any]:
        headers = {
            IDEMPOTENCY_HEADER: idempotency_key(run_id, seq),
            "Content-Type": "application/octet-stream",
            **_uid_header(uid),
        }
        if encoding:
            headers["Content-Encoding"] = encoding
        out: dict[str, Any] = self._request(
            "POST", f"/runs/{run_id}/frames", content=body, headers=headers
        )
        return out

    def post_scalars(
        self, run_id: int | str, rows: Sequence[Mapping[str, Any]], uid: str | None = None
    ) -> dict[str, Any]:
        """``[{step, name, value}]``; a NaN/Inf value goes as ``NaN``/``Infinity``/``-Infinity``
        (Python's JSON, which the server reads and stores as null; httpx's ``json=`` refuses
        them)."""
        body = json.dumps(list(rows), separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", **_uid_header(uid)}
        out: dict[str, Any] = self._request(
            "POST", f"/runs/{run_id}/scalars", content=body, headers=headers
        )
        return out

    def post_client_stats(
        self, run_id: int | str, stats: Mapping[str, Any], uid: str | None = None
    ) -> dict[str, Any]:
        out: dict[str, Any] = self._request(
            "POST", f"/runs/{run_id}/client-stats", json=dict(stats), headers=_uid_header(uid)
        )
        return out


def _uid_header(uid: str | None) -> dict[str, str]:
    return {RUN_UID_HEADER: uid} if uid else {}


def error_of(resp: httpx.Response) -> tuple[str, str]:
    """``(code, message)`` of a JSON error body ``{"error": {"code", "message"}}``; for any
    other body, :func:`foreign_reply`."""
    try:
        body = resp.json()
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            return str(err.get("code", "")), str(err.get("message", ""))
        if isinstance(body, dict) and "detail" in body:
            return "", str(body["detail"])[:500]
    except ValueError:
        pass
    return "", foreign_reply(resp)


_SUMMARY_MAX = 120  # characters of a foreign error page quoted in a message
_HTML_NOISE = re.compile(r"<(head|script|style)\b.*?</\1\s*>|<!--.*?-->", re.DOTALL | re.IGNORECASE)
_HTML_TAG = re.compile(r"<[^>]*>")


def foreign_reply(resp: httpx.Response) -> str:
    """One short line for an error reply that is not the API's JSON (every spectrawatch error
    is JSON): another service's or a proxy's page, which quoted whole would fill the warning,
    ``last_error`` and the client stats with HTML."""
    text = resp.text
    if "html" in resp.headers.get("content-type", "") or text.lstrip().startswith("<"):
        text = html.unescape(_HTML_TAG.sub(" ", _HTML_NOISE.sub(" ", text)))
    text = " ".join(text.split())
    if len(text) > _SUMMARY_MAX:
        text = text[: _SUMMARY_MAX - 3] + "..."
    where = _root_of(resp)
    return f"{text or 'empty body'} (not a spectrawatch reply: is {where} a spectrawatch server?)"


def _root_of(resp: httpx.Response) -> str:
    """The server root URL the request went to (the part before ``/api/v1``, no credentials)."""
    try:
        url = resp.request.url
    except RuntimeError:  # a response built without a request (tests)
        return "the URL"
    return f"{url.scheme}://{url.netloc.decode('ascii')}{url.path.partition(API_PATH)[0]}".rstrip(
        "/"
    )


NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}


def finite_json(value: Any) -> Any:
    """``value`` with every NaN/Infinity float replaced by the string the server stores for it
    (``"NaN"``, ``"Infinity"``, ``"-Infinity"``; Python's ``json`` tokens): httpx refuses to
    encode them, and a run whose ``config`` held ``max_steps=inf`` was never created."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else NON_FINITE[value]
    if isinstance(value, Mapping):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value
