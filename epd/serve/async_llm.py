"""Async streaming API: `async for delta in llm.generate(request)` yields tokens as they are made.

The engine loop runs in a background thread; tokens cross to the event loop thread-safely.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Optional, Union

from epd.config import BackendConfig, DeploymentConfig, EngineConfig, ModelConfig
from epd.engine.core import EngineCore
from epd.lifetime import EventLog
from epd.request import INTERNAL, Request, TokenLogprob

SERVER_EVENTS = 50_000  # lifetime events a server keeps (the latest; ~17 per request with an image)
SERVER_SAMPLES = 20_000  # load samples a server keeps (~80 min at 4 per second)
SERVER_BATCHES = 10_000  # batch records a server keeps


@dataclass
class TokenDelta:
    request_id: str
    token_ids: list[int]
    finish_reason: Optional[str]  # stop | length | abort, on the last delta
    abort_reason: Optional[str] = None
    logprobs: Optional[list[TokenLogprob]] = None  # one per token id, when the request asked for them
    prompt_tokens: int = 0  # the prompt's length with image placeholders, once admitted
    error_kind: Optional[str] = None  # with an abort: invalid | internal | cancelled


class AsyncLLM:
    def __init__(
        self,
        model: Union[EngineConfig, ModelConfig],
        deployment: Optional[DeploymentConfig] = None,
        executor: str = "ray",
        backend: Optional[BackendConfig] = None,
        allocation=None,
        retain_finished: bool = True,
    ):
        """An EngineConfig, or its fields (model, deployment, executor, backend). `retain_finished=False`
        (a server): a request's state and output are dropped once its stream has ended, so memory
        holds the requests in flight only; True (benchmarks) keeps them for the run's record."""
        self.retain_finished = retain_finished
        self.core = EngineCore(EngineConfig.of(model, deployment, executor, backend), on_output=self._on_output, allocation=allocation)
        if not retain_finished:  # a server: the latest events and load samples only, memory stays flat
            self.core.pipeline.events = EventLog(capacity=SERVER_EVENTS)
            self.core.timeseries = deque(maxlen=SERVER_SAMPLES)
            self.core.batches = deque(maxlen=SERVER_BATCHES)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._loop, name="epd-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self.core.step(timeout=0.005)
        except BaseException as exc:  # surface engine crashes to every waiting stream
            self._error = exc
            with self._lock:
                for rid, (loop, q) in self._streams.items():
                    loop.call_soon_threadsafe(q.put_nowait, TokenDelta(rid, [], "abort", "the engine stopped", error_kind=INTERNAL))

    def _on_output(self, rid: str, tokens: list[int], finish: Optional[str], logprobs: Optional[list[TokenLogprob]] = None) -> None:
        with self._lock:
            entry = self._streams.get(rid)
        if entry:  # called on the engine thread, inside the pipeline: its state is current
            loop, q = entry
            why = kind = None
            if finish == "abort":
                out = self.core.pipeline.outputs.get(rid)
                why, kind = (out.abort_reason, out.error_kind) if out else (None, None)
            state = self.core.pipeline.states.get(rid)
            prompt = state.prompt_len if state is not None else 0
            loop.call_soon_threadsafe(q.put_nowait, TokenDelta(rid, tokens, finish, why, logprobs, prompt, kind))

    async def generate(self, req: Request) -> AsyncIterator[TokenDelta]:
        if self._error is not None:
            raise RuntimeError("engine loop crashed") from self._error
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if req.request_id in self._streams:
                raise ValueError(f"request id {req.request_id!r} is already being served")
            self._streams[req.request_id] = (asyncio.get_running_loop(), q)
        try:
            self.core.add_request(req)
        except ValueError:
            with self._lock:
                self._streams.pop(req.request_id, None)
            raise
        finished = False
        try:
            while True:
                delta: TokenDelta = await q.get()
                finished = delta.finish_reason is not None
                yield delta
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(req.request_id, None)
            if not finished:  # the consumer went away (client disconnect): free the request's blocks
                self.abort(req.request_id)
            if not self.retain_finished:
                self.core.forget_request(req.request_id)

    def abort(self, request_id: str, reason: str = "cancelled by the client") -> None:
        self.core.abort_request(request_id, reason)

    def wait_idle(self, timeout_s: float = 60.0) -> None:
        deadline = time.time() + timeout_s
        while self.core.has_work() or any(i.busy for i in self.core.pipeline.instances.values()):
            if time.time() > deadline:
                raise TimeoutError("engine did not go idle")
            time.sleep(0.01)

    def stop_loop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def start_loop(self) -> None:
        """Run the engine loop again after stop_loop (the same workers serve the next workload)."""
        if self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="epd-engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.stop_loop()
        self.core.close()
