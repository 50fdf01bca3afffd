"""Plain ASGI middleware (not Starlette's BaseHTTPMiddleware, which hides a client's disconnect from
the endpoint): the API key, and the request body limit."""

from __future__ import annotations

import json

from fastapi import HTTPException


def header(scope, name: bytes) -> bytes | None:
    """A request header's raw value (`name` lower-case, as ASGI gives them), or None."""
    return dict(scope.get("headers") or []).get(name)


async def send_error(send, status: int, message: str, kind: str, code=None) -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


class ApiKey:
    """/v1/ routes need "Authorization: Bearer <key>"."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            if header(scope, b"authorization") != self.expected:
                return await send_error(send, 401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error")
        return await self.app(scope, receive, send)


class BodyLimit:
    """413 as soon as the declared or received bytes of a request body pass `limit`."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        seen = 0
        started = False

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # raised inside the app: its HTTPException handler answers 413
                    raise HTTPException(status_code=413, detail=self._message())
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except HTTPException as exc:
            if exc.status_code != 413 or started:
                raise
            await self._refuse(send)

    async def _refuse(self, send) -> None:
        await send_error(send, 413, self._message(), "invalid_request_error", "request_too_large")

    def _message(self) -> str:
        return f"request body larger than this server's limit of {self.limit} bytes"
