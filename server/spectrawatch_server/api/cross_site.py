"""Web pages of other sites cannot use an anonymous local server (no auth: loopback only).

A browser sends a page's requests to ``http://127.0.0.1:8765`` too: without a token to
require, the server must tell its own dashboards and local clients from any site the user
visits. Two requests are refused with 403:

- a ``Host`` that is neither a loopback name or address nor ``SPECTRAWATCH_PUBLIC_URL``'s
  host (``host_not_allowed``): a DNS-rebinding page (``http://evil.example:8765`` resolved to
  127.0.0.1) would be same-origin with the server and read and write everything;
- a POST, PUT, PATCH or DELETE whose ``Origin`` is not the server's own (``cross_origin``):
  ``fetch(..., {mode: "no-cors"})`` sends a "simple" POST without asking, which the frame
  route (raw body, any content type), webhook test sends and redeliveries would act on.

Clients outside a browser send no ``Origin``. With ``require_auth`` nothing here applies: a
page cannot attach the bearer token, and the server sends no CORS headers, so the browser
refuses to send it otherwise.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from spectrawatch_server.config import is_loopback_host

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _hostname(netloc: str) -> str | None:
    """The host of ``host[:port]`` (brackets of an IPv6 address removed), None if malformed."""
    try:
        return urlsplit("//" + netloc).hostname
    except ValueError:
        return None


class CrossSiteGuard:
    """Refuse other sites' browser requests to an anonymous server (see the module doc)."""

    def __init__(self, app: ASGIApp, public_url: str | None = None) -> None:
        self.app = app
        public = urlsplit(public_url) if public_url else None
        self.public_host = public.hostname if public is not None else None
        self.public_origin = (
            f"{public.scheme}://{public.netloc}".lower() if public is not None else None
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k: v for k, v in scope.get("headers", []) if k in (b"host", b"origin")}
        host = headers.get(b"host", b"").decode("latin-1").lower()
        if host and not self._allowed_host(host):
            await _refuse(
                send,
                "host_not_allowed",
                f"Host {host[:200]!r} is not this server: an anonymous server answers loopback "
                "names only (behind a proxy, set SPECTRAWATCH_PUBLIC_URL; or require auth)",
            )
            return
        origin = headers.get(b"origin")
        if scope["method"] not in SAFE_METHODS and origin is not None:
            text = origin.decode("latin-1").lower()
            own = urlsplit(text).netloc == host if "://" in text else False
            if not own and text != self.public_origin:
                await _refuse(
                    send,
                    "cross_origin",
                    f"{scope['method']} from a page of origin {text[:200]!r} refused: "
                    "an anonymous server takes writes from its own pages and local clients only",
                )
                return
        await self.app(scope, receive, send)

    def _allowed_host(self, host: str) -> bool:
        name = _hostname(host)
        if name is None:
            return False
        return is_loopback_host(name) or (self.public_host is not None and name == self.public_host)


async def _refuse(send: Send, code: str, message: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 403,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
