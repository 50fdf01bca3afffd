"""The OpenAI-compatible HTTP server: `/v1/chat/completions` (streaming and not), `/v1/models`,
`/health`, `/metrics`; bad input gets a 4xx naming the problem, overload a 429 with Retry-After."""

from __future__ import annotations

import json
import time
import uuid
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from epd.config import RunConfig
from epd.request import Request as EngineRequest
from epd.request import SamplingParams
from epd.serve.async_llm import AsyncLLM
from epd.serve.images import BadImage, resolve_image
from epd.serve.prometheus import ServerMetrics
from epd.serve.protocol import ChatCompletion, ChatCompletionRequest, Choice, ChoiceMessage, ModelCard, ModelList, Usage


def error(status: int, message: str, kind: str = "invalid_request_error", param: Optional[str] = None, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


class BadRequest(Exception):
    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


def build_app(cfg: RunConfig, llm: AsyncLLM) -> FastAPI:
    srv = cfg.server
    model_name = srv.served_model_name or cfg.model.name
    metrics = ServerMetrics()
    app = FastAPI(title="EPD", version="0.1.0", description="OpenAI-compatible serving of multimodal models with disaggregated E/P/D")
    state = {"inflight": 0, "started": int(time.time())}

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_req: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return error(400, f"malformed JSON: {first.get('msg')}")
        return error(400, f"{where or 'body'}: {first.get('msg', 'invalid')}", param=where or None)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if srv.api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {srv.api_key}":
                return error(401, "missing or wrong API key (Authorization: Bearer ...)", kind="authentication_error")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "inflight": state["inflight"], "active_requests": llm.core.pipeline.num_active}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(llm.core.pipeline), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        return ModelList(data=[ModelCard(id=model_name, created=state["started"])])

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses={400: {}, 401: {}, 429: {}})
    async def chat(body: ChatCompletionRequest):
        if state["inflight"] >= srv.max_concurrent_requests:
            metrics.requests.labels("rejected").inc()
            return error(
                429,
                f"server is at its limit of {srv.max_concurrent_requests} concurrent requests; retry later",
                kind="rate_limit_error",
                headers={"Retry-After": "1"},
            )
        try:
            req, stops = to_engine_request(body, cfg)
        except BadRequest as exc:
            metrics.requests.labels("invalid").inc()
            return error(400, str(exc), param=exc.param)
        state["inflight"] += 1
        metrics.inflight.set(state["inflight"])
        stream = Completion(llm, req, stops, metrics, model_name)
        try:
            first = await stream.start()
        except Exception:
            stream.release(state)
            raise
        if first is not None:  # refused by the engine before any token: a 400 with its reason
            stream.release(state)
            metrics.requests.labels("invalid").inc()
            return error(400, first)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream.sse(state, include_usage), media_type="text/event-stream")
        try:
            text, finish = await stream.collect()
        finally:
            stream.release(state)
        usage = stream.usage()
        return ChatCompletion(
            id=stream.id,
            created=stream.created,
            model=model_name,
            choices=[Choice(message=ChoiceMessage(content=text), finish_reason=finish)],
            usage=usage,
        )

    return app


def render_chat(body: ChatCompletionRequest, cfg: RunConfig):
    """Messages -> (prompt text, images). Images are spliced in by the model family, in order."""
    lines, images = [], []
    for i, msg in enumerate(body.messages):
        parts = [] if msg.content is None else ([msg.content] if isinstance(msg.content, str) else msg.content)
        texts = []
        for j, part in enumerate(parts):
            if isinstance(part, str):
                texts.append(part)
            elif part.type == "text":
                texts.append(part.text)
            elif part.type == "image_url":
                try:
                    images.append(resolve_image(part.image_url.url, cfg.server))
                except BadImage as exc:
                    raise BadRequest(str(exc), f"messages.{i}.content.{j}.image_url") from exc
            else:
                raise BadRequest(f"content part type {part.type!r} is not supported (text, image_url)", f"messages.{i}.content.{j}.type")
        lines.append(f"{msg.role}: {' '.join(texts)}")
    if len(images) > cfg.server.max_images_per_request:
        raise BadRequest(f"{len(images)} images in one request; this server takes at most {cfg.server.max_images_per_request}")
    return "\n".join(lines) + "\nassistant:", tuple(images)


def to_engine_request(body: ChatCompletionRequest, cfg: RunConfig) -> tuple[EngineRequest, list[str]]:
    prompt, images = render_chat(body, cfg)
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(not s for s in stops):
        raise BadRequest("stop strings must not be empty", "stop")
    sampling = SamplingParams(
        max_tokens=body.max_completion_tokens or body.max_tokens or cfg.server.default_max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        seed=body.seed if body.seed is not None else uuid.uuid4().int % (2**62),
        ignore_eos=body.ignore_eos,
    )
    return EngineRequest(f"chatcmpl-{uuid.uuid4().hex[:24]}", prompt=prompt, images=images, sampling=sampling), stops


class Completion:
    """One request's stream of tokens, decoded to text with stop strings applied."""

    def __init__(self, llm: AsyncLLM, req: EngineRequest, stops: list[str], metrics: ServerMetrics, model: str):
        self.llm, self.req, self.stops, self.metrics, self.model = llm, req, stops, metrics, model
        self.id, self.created = req.request_id, int(time.time())
        self.tokens: list[int] = []
        self.sent = ""
        self.finish: Optional[str] = None
        self._gen = llm.generate(req)
        self._first = None
        self._t0 = time.time()
        self._t_first: Optional[float] = None
        self._released = False

    async def start(self) -> Optional[str]:
        """Wait for the first delta; returns the refusal reason if the engine aborted the request at once."""
        self._first = await self._gen.__anext__()
        if self._first.finish_reason == "abort" and not self._first.token_ids:
            return self._first.abort_reason or "request refused by the engine"
        return None

    async def deltas(self):
        """Text pieces as they become final; sets `finish`."""
        tokenizer = self.llm.core.pipeline.tokenizer
        delta = self._first
        while True:
            if delta.token_ids and self._t_first is None:
                self._t_first = time.time()
                self.metrics.ttft.observe(self._t_first - self._t0)
            self.tokens.extend(delta.token_ids)
            text = tokenizer.decode(self.tokens)
            for s in self.stops:
                cut = text.find(s)
                if cut >= 0:
                    text, self.finish = text[:cut], "stop"
            if self.finish is None and delta.finish_reason is not None:
                self.finish = "length" if delta.finish_reason == "length" else delta.finish_reason
            if text.endswith("\ufffd") and self.finish is None:  # an unfinished UTF-8 sequence: wait for more
                text = text[:-1]
            if len(text) > len(self.sent):
                piece, self.sent = text[len(self.sent) :], text
                yield piece
            if self.finish is not None:
                if delta.finish_reason is None:
                    await self._gen.aclose()  # a stop string ended it early: the engine drops the request
                self._observe()
                return
            delta = await self._gen.__anext__()

    def _observe(self) -> None:
        outcome = "aborted" if self.finish == "abort" else "finished"
        self.metrics.requests.labels(outcome).inc()
        if self._t_first is not None and len(self.tokens) > 1:
            self.metrics.tpot.observe((time.time() - self._t_first) / (len(self.tokens) - 1))

    async def collect(self) -> tuple[str, str]:
        async for _ in self.deltas():
            pass
        return self.sent, self.finish or "stop"

    def usage(self) -> Usage:
        out = self.llm.core.pipeline.outputs.get(self.id)
        prompt = out.prompt_tokens if out else 0
        return Usage(prompt_tokens=prompt, completion_tokens=len(self.tokens), total_tokens=prompt + len(self.tokens))

    def release(self, state: dict) -> None:
        if not self._released:
            self._released = True
            state["inflight"] -= 1
            self.metrics.inflight.set(state["inflight"])

    def _chunk(self, delta: dict, finish: Optional[str], usage: Optional[Usage] = None) -> str:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if usage is None else [],
        }
        if usage is not None:
            body["usage"] = usage.model_dump()
        return f"data: {json.dumps(body)}\n\n"

    async def sse(self, state: dict, include_usage: bool):
        try:
            yield self._chunk({"role": "assistant", "content": ""}, None)
            async for piece in self.deltas():
                yield self._chunk({"content": piece}, None)
            yield self._chunk({}, self.finish)
            if include_usage:
                yield self._chunk({}, None, self.usage())
            yield "data: [DONE]\n\n"
        finally:  # also on client disconnect: closing the generator aborts the engine request
            await self._gen.aclose()
            self.release(state)
