"""When the server reached each phase of a request, by the client's X-Request-Id (wall clock), so that a
client's TTFT can be split into the way in (body, parsing, rendering), the engine, and the way back.

Phases: `received` (the HTTP server parsed the request's headers and handed it to the app), `body_start`
and `body_end` (the first and last chunk of its body taken by the app, seen by `BodyTimer` before any
other middleware), `handler` (the endpoint entered: the body parsed and validated),
`submitted` (the engine has the request: prompt rendered, images checked), `first_chunk` (the first
chunk carrying a token handed to the HTTP server). Requests without an X-Request-Id are not timed.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Optional

from epd.serve.middleware import header

PHASES = ("received", "body_start", "body_end", "handler", "submitted", "first_chunk")


class ServerTimings:
    """The latest `limit` timed requests' phases; the first mark of a phase wins (retries keep their first)."""

    def __init__(self, limit: int = 100_000):
        self.limit = limit
        self._by_id: OrderedDict[str, dict[str, float]] = OrderedDict()

    def mark(self, rid: Optional[str], phase: str, t: Optional[float] = None) -> None:
        if rid is None:
            return
        if phase not in PHASES:
            raise ValueError(f"unknown server phase {phase!r}; known: {PHASES}")
        entry = self._by_id.get(rid)
        if entry is None:
            entry = self._by_id[rid] = {}
            while len(self._by_id) > self.limit:
                self._by_id.popitem(last=False)
        entry.setdefault(phase, time.time() if t is None else t)

    def get(self, rid: str) -> dict[str, float]:
        return dict(self._by_id.get(rid, {}))

    def __len__(self) -> int:
        return len(self._by_id)


class BodyTimer:
    """ASGI middleware: marks when a timed request reaches the app and when its body is taken."""

    def __init__(self, app, timings: ServerTimings):
        self.app, self.timings = app, timings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        raw = header(scope, b"x-request-id")
        rid = raw.decode("latin-1") if raw else None
        if rid is None:
            return await self.app(scope, receive, send)
        self.timings.mark(rid, "received")

        async def timed_receive():
            message = await receive()
            if message["type"] == "http.request":
                self.timings.mark(rid, "body_start")
                if not message.get("more_body", False):
                    self.timings.mark(rid, "body_end")
            return message

        return await self.app(scope, timed_receive, send)
