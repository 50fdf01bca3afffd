"""Graceful shutdown of the server: the first SIGTERM (or SIGINT) stops admission — new requests get
503 with Retry-After, `/health` says draining — and lets the requests in flight finish; once none is
left, or `server.drain_timeout_s` has passed (those still running are then aborted), uvicorn stops.
A second signal stops at once."""

from __future__ import annotations

import logging
import threading
import time

import uvicorn

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app, llm, drain_timeout_s: float):
        super().__init__(config)
        self.app, self.llm, self.drain_timeout_s = app, llm, drain_timeout_s
        self._drainer: threading.Thread | None = None

    def handle_exit(self, sig, frame) -> None:
        if self._drainer is not None:  # asked twice: stop now
            super().handle_exit(sig, frame)
            return
        self.app.state.draining = True
        log.warning(
            "shutting down: admission stopped, draining %d requests (at most %.0f s)", self.app.state.inflight(), self.drain_timeout_s
        )
        self._drainer = threading.Thread(target=self._drain, name="epd-drain", daemon=True)
        self._drainer.start()

    def _drain(self) -> None:
        deadline = time.time() + self.drain_timeout_s
        while (self.app.state.inflight() or self.llm.core.in_flight) and time.time() < deadline:
            time.sleep(0.05)
        left = [rid for rid, s in list(self.llm.core.pipeline.states.items()) if not s.done]
        for rid in left:
            self.llm.abort(rid, "the server shut down before this request finished")
        if left:
            log.warning("drain timed out: %d requests aborted", len(left))
            time.sleep(0.5)  # their streams end with the abort before the connections close
        self.should_exit = True
