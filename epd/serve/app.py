"""The OpenAI-compatible HTTP server: `/v1/chat/completions` and `/v1/completions` (streaming and not,
n choices, logprobs), `/v1/models`, `/health`, `/metrics`.

Every error is OpenAI's error JSON: a malformed or unsupported request gets a 4xx naming the field,
an unknown model 404, an oversized body 413, overload 429 with Retry-After; a failure inside the
engine is a 500 that shows no internals. Tokenisation and image decoding run off the event loop and
off the engine's thread; a client that goes away, streaming or not, has its requests aborted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from epd.config import RunConfig
from epd.request import INTERNAL, MAX_SEED, SamplingParams
from epd.request import Request as EngineRequest
from epd.serve.async_llm import AsyncLLM
from epd.serve.choice import ChoiceRun, EngineRefusal
from epd.serve.images import BadImage, resolve_image, resolve_video
from epd.serve.middleware import ApiKey, BodyLimit
from epd.serve.prometheus import ServerMetrics
from epd.serve.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChoiceMessage,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
)
from epd.serve.timing import BodyTimer, ServerTimings

log = logging.getLogger(__name__)
MAX_STOPS, MAX_STOP_CHARS = 16, 1000
ERRORS = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 413: {"model": ErrorResponse}}
ERRORS |= {429: {"model": ErrorResponse}, 500: {"model": ErrorResponse}}


def error(status: int, message: str, kind: str = "invalid_request_error", param: Optional[str] = None, code=None, headers=None):
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class BadRequest(Exception):
    def __init__(self, message: str, param: Optional[str] = None, status: int = 400, code: Optional[str] = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


def build_app(cfg: RunConfig, llm: AsyncLLM) -> FastAPI:
    srv = cfg.server
    model_name = srv.served_model_name or cfg.model.name
    metrics = ServerMetrics()
    tokenizer = llm.core.pipeline.tokenizer
    app = FastAPI(title="EPD", version="0.1.0", description="OpenAI-compatible serving of multimodal models with disaggregated E/P/D")
    app.add_middleware(BodyLimit, limit=srv.max_body_bytes)
    if srv.api_key:
        app.add_middleware(ApiKey, key=srv.api_key)
    timings = app.state.timings = ServerTimings()  # by X-Request-Id: where a client's TTFT goes (loadgen's server_split)
    app.add_middleware(BodyTimer, timings=timings)  # added last: outermost, sees the request first
    state = {"inflight": 0, "inflight_bytes": 0, "started": int(time.time())}
    # Shutting down (SIGTERM, `epd.serve.shutdown`): new requests get 503 while those in flight finish.
    app.state.draining = False
    app.state.inflight = lambda: state["inflight"]

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_req: Request, exc: RequestValidationError):
        first = most_specific(exc.errors())
        where = field_path(first.get("loc", ()))
        kind = first.get("type")
        if kind == "json_invalid":
            return error(400, f"malformed JSON: {first.get('ctx', {}).get('error', first.get('msg'))}")
        if kind == "extra_forbidden":
            return error(400, f"unsupported parameter {where!r}: this server does not implement it", param=where or None)
        return error(400, f"{where or 'body'}: {first.get('msg', 'invalid')}", param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_req: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error(exc.status_code, str(exc.detail), kind=kind, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def on_crash(_req: Request, exc: Exception):
        log.exception("request failed")
        return error(500, "the server failed while handling this request", kind="server_error")

    @app.get("/health")
    async def health():
        pipe = llm.core.pipeline
        lost = sorted(i.id for i in pipe.instances.values() if i.failed)
        unserved = sorted(r.value for r, insts in pipe.by_role.items() if not insts)  # no worker left: its requests fail
        status = "draining" if app.state.draining else "degraded" if lost else "ok"
        body = {"status": status, "inflight": state["inflight"], "inflight_bytes": state["inflight_bytes"]}
        body |= {"active_requests": pipe.num_active, "lost_workers": lost, "stages_without_workers": unserved}
        return JSONResponse(body, status_code=503 if app.state.draining or unserved else 200)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(llm.core.pipeline), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        return ModelList(data=[ModelCard(id=model_name, created=state["started"])])

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERRORS)
    async def chat(body: ChatCompletionRequest, request: Request):
        return await serve(body, request, chat=True)

    @app.post("/v1/completions", response_model=Completion, responses=ERRORS)
    async def completions(body: CompletionRequest, request: Request):
        return await serve(body, request, chat=False)

    async def serve(body: Union[ChatCompletionRequest, CompletionRequest], request: Request, chat: bool):
        timed_id = request.headers.get("x-request-id")
        timings.mark(timed_id, "handler")
        if app.state.draining:
            metrics.requests.labels("rejected").inc()
            return error(503, "the server is shutting down; send this request elsewhere", kind="server_error", headers={"Retry-After": "5"})
        if state["inflight"] >= srv.max_concurrent_requests:
            metrics.requests.labels("rejected").inc()
            return error(
                429,
                f"server is at its limit of {srv.max_concurrent_requests} concurrent requests; retry later",
                kind="rate_limit_error",
                headers={"Retry-After": "1"},
            )
        state["inflight"] += 1
        metrics.inflight.set(state["inflight"])
        runs: list[ChoiceRun] = []
        prompts: list = []
        streaming = False
        try:
            if body.model is not None and body.model != model_name:
                raise BadRequest(
                    f"the model {body.model!r} does not exist; this server serves {model_name!r}", "model", 404, "model_not_found"
                )
            client_id = client_request_id(request.headers.get("x-request-id"))
            sampling, stops = sampling_params(body, chat, cfg)
            rendered = await asyncio.to_thread(render_chat if chat else render_prompts, body, cfg, tokenizer)
            admit_bytes(state, payload_bytes(rendered), srv.max_inflight_bytes)
            prompts = rendered  # holds its bytes in the server's count from here on
            runs = start_runs(llm, prompts, sampling, body, stops, tokenizer, metrics, client_id)
            timings.mark(timed_id, "submitted")
            refusal = await first_refusal(runs)
            if refusal is not None:
                raise refusal
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                continuous = bool(body.stream_options and body.stream_options.continuous_usage_stats)
                streaming = True  # the stream owns the runs and the inflight slot now
                first = lambda: timings.mark(timed_id, "first_chunk")  # noqa: E731
                return StreamingResponse(
                    sse(runs, chat, include_usage, model_name, prompts, state, metrics, continuous, first), media_type="text/event-stream"
                )
            done = await collect_unless_disconnected(runs, request)
            if not done:
                return Response(status_code=499)  # nobody is listening
            return respond(runs, chat, model_name, prompts)
        except Overloaded as exc:
            metrics.requests.labels("rejected").inc()
            return error(429, str(exc), kind="rate_limit_error", headers={"Retry-After": "1"})
        except BadRequest as exc:
            metrics.requests.labels("invalid").inc()
            kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
            return error(exc.status, str(exc), param=exc.param, code=exc.code, kind=kind)
        except EngineRefusal as exc:
            metrics.requests.labels("invalid" if exc.kind != INTERNAL else "failed").inc()
            if exc.kind == INTERNAL:
                log.error("engine failed a request: %s", exc.reason)
                return error(500, "the engine failed while serving this request", kind="server_error")
            return error(400, exc.reason)
        finally:
            if not streaming:
                await asyncio.gather(*(r.close() for r in runs))
                release(state, metrics, payload_bytes(prompts))

    return app


_BRANCHES = {"str", "int", "float", "bool", "list", "dict", "none"}


def most_specific(errors) -> dict:
    """Of a union's errors, the one that went deepest into the value (the branch the client meant)."""
    return max(errors, key=lambda e: (len(field_path(e.get("loc", ())).split(".")), e.get("type") != "missing")) if errors else {}


def field_path(loc) -> str:
    """'messages.0.content.1.image_url.url' from pydantic's location, without its union branch labels."""
    parts = []
    for p in loc:
        p = str(p)
        if p == "body" and not parts or "[" in p or p in _BRANCHES or (parts and parts[-1] == p):
            continue
        parts.append(p)
    return ".".join(parts)


def release(state: dict, metrics: ServerMetrics, nbytes: int = 0) -> None:
    state["inflight"] -= 1
    state["inflight_bytes"] -= nbytes
    metrics.inflight.set(state["inflight"])


class Overloaded(Exception):
    """The server holds as many bytes of requests as it may: 429, retry later."""


def payload_bytes(prompts) -> int:
    """What a request's prompts hold in memory while it runs: its images' and video frames' encoded bytes
    (pixels are made on the E worker, batch by batch) and its token ids."""
    frames = lambda videos: sum(len(f.data or b"") for v in videos for f in v.frames)  # noqa: E731
    return sum(8 * len(ids) + sum(len(im.data or b"") for im in images) + frames(videos) for ids, images, videos in prompts)


def admit_bytes(state: dict, nbytes: int, limit: int) -> None:
    """Count `nbytes` in, or refuse: 413 for a request that could never fit, 429 while others hold the room."""
    if nbytes > limit:
        raise BadRequest(f"the request holds {nbytes} bytes of images and prompt; this server takes at most {limit}", None, 413)
    if state["inflight_bytes"] + nbytes > limit:
        raise Overloaded(f"server holds {state['inflight_bytes']} of its {limit} bytes of requests in flight; retry later")
    state["inflight_bytes"] += nbytes


# ---- requests -> engine requests -------------------------------------------------------------
def sampling_params(body: Union[ChatCompletionRequest, CompletionRequest], chat: bool, cfg: RunConfig):
    """The engine's sampling parameters for one choice (the seed is set per choice), and the stop strings."""
    if body.stream_options is not None and not body.stream:
        raise BadRequest("stream_options is only allowed with stream=true", "stream_options")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(not s for s in stops):
        raise BadRequest("stop strings must not be empty", "stop")
    if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise BadRequest(f"at most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} characters", "stop")
    bias = []
    for key, value in (body.logit_bias or {}).items():
        try:
            bias.append((int(key), float(value)))
        except ValueError as exc:
            raise BadRequest(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from exc
    if chat:
        if body.top_logprobs is not None and not body.logprobs:
            raise BadRequest("top_logprobs needs logprobs=true", "top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if body.response_format is not None and body.response_format.type != "text":
            raise BadRequest(f"response_format {body.response_format.type!r} is not supported (only 'text')", "response_format")
        if body.tools:
            raise BadRequest("tools are not supported by this server", "tools")
        if body.tool_choice not in (None, "none", "auto"):
            raise BadRequest("tool_choice needs tools, which this server does not support", "tool_choice")
        max_tokens = body.max_completion_tokens or body.max_tokens
    else:
        logprobs = body.logprobs
        if body.echo:
            raise BadRequest("echo is not supported", "echo")
        if body.suffix is not None:
            raise BadRequest("suffix is not supported", "suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise BadRequest("best_of other than n is not supported", "best_of")
        max_tokens = body.max_tokens
    try:
        sampling = SamplingParams(
            max_tokens=max_tokens or cfg.server.default_max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(body.top_k or 0, 0),
            ignore_eos=body.ignore_eos,
            answer_tokens=body.answer_tokens,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            min_tokens=body.min_tokens,
            repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            logit_bias=tuple(bias),
            logprobs=logprobs,
            seed=body.seed if body.seed is not None else 0,
        )
        sampling.validate()
    except ValueError as exc:
        raise BadRequest(str(exc), str(exc).split(" ")[0]) from exc
    return sampling, stops


def render_chat(body: ChatCompletionRequest, cfg: RunConfig, tokenizer) -> list[tuple[list[int], tuple, tuple]]:
    """Messages -> one (prompt token ids, images, videos). Images and videos are spliced in by the model
    family, in order (videos first)."""
    lines, images, videos = [], [], []
    for i, msg in enumerate(body.messages):
        parts = [] if msg.content is None else ([msg.content] if isinstance(msg.content, str) else msg.content)
        texts = []
        for j, part in enumerate(parts):
            if isinstance(part, str):
                texts.append(part)
            elif part.type == "text":
                texts.append(part.text)
            elif part.type == "video_url":
                _take(
                    videos, "video", part.video_url.url, resolve_video, cfg.server.max_videos_per_request, cfg, f"messages.{i}.content.{j}"
                )
            else:
                _take(
                    images, "image", part.image_url.url, resolve_image, cfg.server.max_images_per_request, cfg, f"messages.{i}.content.{j}"
                )
        lines.append(f"{msg.role}: {' '.join(texts)}")
    return [(tokenizer.encode("\n".join(lines) + "\nassistant:"), tuple(images), tuple(videos))]


def _take(found: list, kind: str, url: str, resolve, limit: int, cfg: RunConfig, where: str) -> None:
    """One image or video part resolved into `found`, or a 400 naming the part: too many of them, or bad."""
    if len(found) >= limit:
        raise BadRequest(f"more than {limit} {kind}s in one request; this server takes at most {limit}", where)
    try:
        found.append(resolve(url, cfg.server))
    except BadImage as exc:
        raise BadRequest(str(exc), f"{where}.{kind}_url") from exc


def render_prompts(body: CompletionRequest, cfg: RunConfig, tokenizer) -> list[tuple[list[int], tuple, tuple]]:
    prompt = body.prompt
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = list(prompt)
    if not prompts:
        raise BadRequest("prompt must not be empty", "prompt")
    return [(tokenizer.encode(p) if isinstance(p, str) else list(p), (), ()) for p in prompts]


REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def client_request_id(value: Optional[str]) -> Optional[str]:
    """The client's X-Request-Id (as vLLM takes it): the response's id becomes chatcmpl-<it>, and the engine's
    request ids start with that, so a client's record can be matched with the engine's events."""
    if value is None:
        return None
    if not REQUEST_ID.fullmatch(value):
        raise BadRequest("X-Request-Id must be 1-128 characters of letters, digits and . _ : -", "X-Request-Id")
    return value


def start_runs(llm, prompts, sampling: SamplingParams, body, stops, tokenizer, metrics, client_id: Optional[str] = None) -> list[ChoiceRun]:
    """n choices per prompt, each its own engine request; seeds seed, seed+1, ... (random without a seed).
    Engine ids carry a random part even under a client's id: two requests with one id stay two requests."""
    base = f"{'chatcmpl' if isinstance(body, ChatCompletionRequest) else 'cmpl'}-{client_id or uuid.uuid4().hex[:24]}"
    unique = f"{base}-{uuid.uuid4().hex[:8]}" if client_id else base
    runs = []
    for p, (ids, images, videos) in enumerate(prompts):
        for i in range(body.n):
            if body.seed is not None:
                seed = (body.seed + i + MAX_SEED + 1) % (2 * (MAX_SEED + 1)) - (MAX_SEED + 1)
            else:
                seed = uuid.uuid4().int % MAX_SEED
            req = EngineRequest(
                f"{unique}-{p}-{i}", prompt_token_ids=tuple(ids), images=images, sampling=replace(sampling, seed=seed), videos=videos
            )
            runs.append(ChoiceRun(llm, req, stops, tokenizer, p * body.n + i, p, metrics, base))
    return runs


async def first_refusal(runs: list[ChoiceRun]) -> Optional[EngineRefusal]:
    """Start every choice; the first that the engine refused outright, if any."""
    refusals = await asyncio.gather(*(r.start() for r in runs))
    return next((r for r in refusals if r is not None), None)


async def collect_unless_disconnected(runs: list[ChoiceRun], request: Request) -> bool:
    """Run every choice to its end; False (with the choices aborted) if the client left first."""
    task = asyncio.ensure_future(asyncio.gather(*(r.collect() for r in runs)))
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.2)
        if done:
            task.result()
            return True
        if await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return False


# ---- responses ---------------------------------------------------------------------------------
def usage(runs: list[ChoiceRun], prompts) -> Usage:
    """Each prompt counted once (its choices share it), every generated token counted."""
    prompt = sum(next((r.prompt_tokens for r in runs if r.prompt_index == p and r.prompt_tokens), 0) for p in range(len(prompts)))
    completion = sum(r.completion_tokens for r in runs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def respond(runs: list[ChoiceRun], chat: bool, model: str, prompts) -> Union[ChatCompletion, Completion, JSONResponse]:
    failed = next((r for r in runs if r.finish == "abort"), None)
    if failed is not None:
        raise failed.refusal()
    created = int(time.time())
    if chat:
        choices = [
            Choice(
                index=r.index,
                message=ChoiceMessage(content=r.text.output),
                finish_reason=r.finish,
                logprobs=ChoiceLogprobs(content=r.chat_logprobs(r.all_logprobs)) if r.wants_logprobs else None,
            )
            for r in runs
        ]
        return ChatCompletion(id=runs[0].base, created=created, model=model, choices=choices, usage=usage(runs, prompts))
    choices = [
        CompletionChoice(
            index=r.index,
            text=r.text.output,
            finish_reason=r.finish,
            logprobs=r.completion_logprobs(r.all_logprobs) if r.wants_logprobs else None,
        )
        for r in runs
    ]
    return Completion(id=runs[0].base, created=created, model=model, choices=choices, usage=usage(runs, prompts))


async def sse(
    runs: list[ChoiceRun],
    chat: bool,
    include_usage: bool,
    model: str,
    prompts,
    state: dict,
    metrics: ServerMetrics,
    continuous: bool = False,  # stream_options.continuous_usage_stats
    on_first_token: Optional[Callable[[], None]] = None,  # told as each chunk accounting for tokens is handed over
):
    """Server-sent events of every choice as its text becomes final; on disconnect, every choice aborts."""
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"
    sent = {r.index: 0 for r in runs}  # tokens of each choice that the chunks so far account for

    def chunk(choices: list[dict], use: Optional[Usage] = None) -> str:
        body = {"id": runs[0].base, "object": kind, "created": created, "model": model, "choices": choices}
        if use is None and continuous:
            prompt = usage(runs, prompts).prompt_tokens
            use = Usage(prompt_tokens=prompt, completion_tokens=sum(sent.values()), total_tokens=prompt + sum(sent.values()))
        if use is not None:
            body["usage"] = use.model_dump()
        return f"data: {json.dumps(body)}\n\n"

    queue: asyncio.Queue = asyncio.Queue()

    async def pump(run: ChoiceRun) -> None:
        try:
            async for piece in run.pieces(every_step=continuous):
                await queue.put((run, piece, run.completion_tokens))
        finally:
            await queue.put((run, None, run.completion_tokens))

    tasks = [asyncio.ensure_future(pump(r)) for r in runs]
    try:
        if chat:
            yield chunk(
                [{"index": r.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None} for r in runs]
            )
        open_runs = len(runs)
        while open_runs:
            run, piece, sent[run.index] = await queue.get()
            if piece is None:
                open_runs -= 1
                finish = "abort" if run.finish is None else run.finish
                yield chunk([{"index": run.index, **({"delta": {}} if chat else {"text": ""}), "logprobs": None, "finish_reason": finish}])
                continue
            entry = {"index": run.index, "finish_reason": None}
            if chat:
                entry["delta"] = {"content": piece.text}
                entry["logprobs"] = {"content": [x.model_dump() for x in run.chat_logprobs(piece.logprobs)]} if run.wants_logprobs else None
            else:
                entry["text"] = piece.text
                entry["logprobs"] = run.completion_logprobs(piece.logprobs).model_dump() if run.wants_logprobs else None
            if on_first_token is not None and sent[run.index] > 0:  # the chunk accounts for a token (its text may be held back)
                on_first_token()
            yield chunk([entry])
        if include_usage:
            yield chunk([], usage(runs, prompts))
        yield "data: [DONE]\n\n"
    finally:  # also when the client disconnects: closing the generators aborts the engine requests
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(r.close() for r in runs))
        release(state, metrics, payload_bytes(prompts))
