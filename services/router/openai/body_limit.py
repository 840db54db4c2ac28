"""Refuses request bodies over the router's limit (413) before they are read whole.

A declared Content-Length over the limit is answered at once, before a byte of the body is
read; a chunked body is counted as it arrives and refused once it passes the limit. The limit
is the largest valid request (ModelLimits.max_request_bytes), so nothing valid is refused and
nothing larger costs the router more than reading that much.
"""
from __future__ import annotations

import json


class _TooLarge(Exception):
    pass


class BodyLimit:
    """Pure ASGI middleware (a BaseHTTPMiddleware would buffer the body it is meant to bound)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        received = 0
        started = False

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracked_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send) -> None:
        message = f"the request body is larger than this server's limit of {self.max_bytes} bytes"
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": "request_too_large"}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
