"""HTML pages may not be framed by another site (clickjacking).

Every ``text/html`` response (dashboard pages, error pages) gets ``X-Frame-Options: DENY`` and
``Content-Security-Policy: frame-ancestors 'none'`` (the header browsers follow today; the first
for older ones); a page with its own policy (``/docs``, ``/redoc``: :mod:`.api_docs`) keeps it.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

FRAME_HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
}


class NoFraming:
    """ASGI middleware adding :data:`FRAME_HEADERS` to HTML responses (a CSP already set is
    kept)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if headers.get("content-type", "").startswith("text/html"):
                    for name, value in FRAME_HEADERS.items():
                        headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)
