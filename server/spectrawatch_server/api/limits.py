"""Request guards before routing: the size limit for JSON endpoints (frame bodies have their
own, larger, streamed limit) and NUL characters in URLs."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class JsonBodyLimit:
    """Reject bodies over ``max_bytes`` with 413 before the app parses them.

    Paths ending in ``exempt_suffix`` (frame ingest) are left to their own streamed check.
    Bytes are counted as chunks arrive, so a lying or absent Content-Length does not help.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, exempt_suffix: str = "/frames") -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt_suffix = exempt_suffix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].endswith(self.exempt_suffix):
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._reject(send)
                return
        # Buffer the (bounded) body first, so the limit answers 413 before any parsing.
        messages: list[Message] = []
        seen = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                await self._reject(send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send: Send) -> None:
        message = f"body exceeds {self.max_bytes} bytes"
        await _send_json(send, 413, {"error": {"code": "too_large", "message": message}})


class NulGuard:
    """Refuse a URL whose path or query holds a NUL character (``%00``) with 422, naming the
    parameter: PostgreSQL cannot store or compare text with NUL, and its error reached callers
    as "a numeric parameter is out of range"."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = nul_problem(scope.get("path", ""), scope.get("query_string", b""))
            if problem is not None:
                error = {"code": "nul_character", "message": problem}
                await _send_json(send, 422, {"error": error})
                return
        await self.app(scope, receive, send)


def nul_problem(path: str, query: bytes) -> str | None:
    """Where a NUL character is in a request's ``path`` or ``query`` string, or None."""
    if "\x00" in path:
        return "the URL path holds a NUL character (%00)"
    if b"%00" not in query.lower() and b"\x00" not in query:
        return None
    for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if "\x00" in name or "\x00" in value:
            return f"query parameter {name.replace(chr(0), '')[:64]!r} holds a NUL character (%00)"
    return None


async def _send_json(send: Send, status: int, content: object) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": json.dumps(content).encode()})
