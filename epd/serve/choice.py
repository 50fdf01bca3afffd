"""One choice of a completion: an engine request's token stream turned into text pieces, stop strings
applied, logprobs in OpenAI's two shapes, usage counted exactly."""

from __future__ import annotations

import time
from typing import Optional

from epd.request import INTERNAL, INVALID, TokenLogprob
from epd.request import Request as EngineRequest
from epd.serve.async_llm import AsyncLLM, TokenDelta
from epd.serve.prometheus import ServerMetrics
from epd.serve.protocol import CompletionLogprobs, TokenLogprobOut, TopLogprob
from epd.serve.text_stream import Piece, TextStream


class EngineRefusal(Exception):
    """The engine aborted a request: `kind` says whether the request was at fault (INVALID) or not."""

    def __init__(self, reason: str, kind: str):
        super().__init__(reason)
        self.reason, self.kind = reason, kind


class ChoiceRun:
    def __init__(
        self,
        llm: AsyncLLM,
        req: EngineRequest,
        stops: list[str],
        tokenizer,
        index: int,
        prompt_index: int,
        metrics: ServerMetrics,
        base: str,
    ):
        self.llm, self.req, self.tokenizer, self.metrics = llm, req, tokenizer, metrics
        self.index, self.prompt_index, self.base = index, prompt_index, base
        self.text = TextStream(tokenizer, stops)
        self.wants_logprobs = req.sampling.logprobs is not None
        self.finish: Optional[str] = None
        self.prompt_tokens = 0
        self.completion_tokens = 0  # every token the engine generated for this choice
        self.all_logprobs: list[tuple[TokenLogprob, int]] = []
        self._gen = llm.generate(req)
        self._first: Optional[TokenDelta] = None
        self._last: Optional[TokenDelta] = None
        self._t0 = time.time()
        self._t_first: Optional[float] = None
        self._closed = False

    async def start(self) -> Optional[EngineRefusal]:
        """Wait for the first delta; the refusal if the engine aborted the request before any token."""
        self._first = await self._gen.__anext__()
        if self._first.finish_reason == "abort" and not self._first.token_ids:
            self._last = self._first
            self.finish = "abort"
            return self.refusal()
        return None

    def refusal(self) -> EngineRefusal:
        d = self._last
        kind = (d.error_kind if d is not None else None) or INTERNAL
        reason = (d.abort_reason if d is not None else None) or "the engine aborted the request"
        return EngineRefusal(reason, kind if kind in (INVALID, INTERNAL) else INTERNAL)

    async def pieces(self, every_step: bool = False):
        """Text pieces as they become final, with their tokens' logprobs; sets `finish`. With
        `every_step`, a step whose tokens made no final text yet yields an empty piece."""
        delta = self._first
        while True:
            self._last = delta
            self.prompt_tokens = delta.prompt_tokens or self.prompt_tokens
            if delta.token_ids and self._t_first is None:
                self._t_first = time.time()
                self.metrics.ttft.observe(self._t_first - self._t0)
            self.completion_tokens += len(delta.token_ids)
            piece = self.text.add(delta.token_ids, delta.logprobs)
            if self.text.stopped:
                self.finish = "stop"
            elif delta.finish_reason is not None:
                tail = self.text.finish()
                piece = Piece(piece.text + tail.text, piece.logprobs + tail.logprobs)
                self.finish = delta.finish_reason  # stop | length | abort
            self.all_logprobs += piece.logprobs
            if piece.text or piece.logprobs or (every_step and delta.token_ids):
                yield piece
            if self.finish is not None:
                if delta.finish_reason is None:
                    await self.close()  # a stop string ended it early: the engine drops the request
                self._observe()
                return
            delta = await self._gen.__anext__()

    async def collect(self) -> None:
        async for _ in self.pieces():
            pass

    async def close(self) -> None:
        """Abort the engine request if it is still running (idempotent)."""
        if not self._closed:
            self._closed = True
            await self._gen.aclose()

    def _observe(self) -> None:
        self.metrics.requests.labels("aborted" if self.finish == "abort" else "finished").inc()
        if self._t_first is not None and self.completion_tokens > 1:
            self.metrics.tpot.observe((time.time() - self._t_first) / (self.completion_tokens - 1))

    # ---- logprobs in OpenAI's shapes ------------------------------------------------------------
    def _token(self, tok: int) -> str:
        return self.tokenizer.decode([tok])

    def chat_logprobs(self, entries: list[tuple[TokenLogprob, int]]) -> list[TokenLogprobOut]:
        out = []
        for lp, _ in entries:
            s = self._token(lp.token_id)
            top = [TopLogprob(token=self._token(t), logprob=v, bytes=list(self._token(t).encode())) for t, v in lp.top]
            out.append(TokenLogprobOut(token=s, logprob=lp.logprob, bytes=list(s.encode()), top_logprobs=top))
        return out

    def completion_logprobs(self, entries: list[tuple[TokenLogprob, int]]) -> CompletionLogprobs:
        return CompletionLogprobs(
            tokens=[self._token(lp.token_id) for lp, _ in entries],
            token_logprobs=[lp.logprob for lp, _ in entries],
            top_logprobs=[{self._token(t): v for t, v in lp.top} for lp, _ in entries],
            text_offset=[offset for _, offset in entries],
        )
