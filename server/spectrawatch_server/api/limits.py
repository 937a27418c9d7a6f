"""Request-size limit for JSON endpoints (frame bodies have their own, larger, streamed limit)."""

from __future__ import annotations

import json

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
        body = json.dumps(
            {"error": {"code": "too_large", "message": f"body exceeds {self.max_bytes} bytes"}}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})
