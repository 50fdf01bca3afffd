"""`backend=online`: drive the OpenAI-compatible server over HTTP with the workload's arrivals and
score it from the client's side, in the same event vocabulary, so online and offline runs compare.

Without `server.url` a server is started on loopback for the run (the real engine behind it).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import threading
import time
from typing import Optional

from epd.config import RunConfig
from epd.images import load_image
from epd.lifetime import EventLog
from epd.lifetime import LifetimeEvent as Ev
from epd.metrics import Timeline, percentile, timelines
from epd.request import ImageInput, Request, RequestOutput
from epd.run_result import RunResult, batch_rows, batch_stats
from epd.serve.timing import PHASES, ServerTimings
from epd.video import encode_video


def data_url(image: ImageInput) -> str:
    """A data URL of the image as a client would send it: its own bytes, or a procedural image encoded
    as JPEG (what cameras and phones send; a 12 MP PNG takes seconds to deflate)."""
    if image.data is not None:
        raw, mime = image.data, _mime(image.data)
    elif image.path is not None:
        with open(image.path, "rb") as f:
            raw = f.read()
        mime = _mime(raw)
    else:
        buf = io.BytesIO()
        load_image(image).save(buf, format="JPEG", quality=92)
        raw, mime = buf.getvalue(), "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def _mime(raw: bytes) -> str:
    if raw.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if raw.startswith(b"RIFF") and raw[8:12] == b"WEBP":
        return "image/webp"
    return "image/png"


def chat_body(req: Request) -> dict:
    if req.prompt is not None:
        text = req.prompt
    else:  # one character per prompt token: the byte-level tokenizer's count, near enough for others
        n = len(req.prompt_token_ids or ())
        text = ("lorem ipsum dolor sit amet " * (n // 27 + 1))[:n]
    videos = [
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(encode_video(v)).decode()}}
        for v in req.videos
    ]
    content = videos + [{"type": "image_url", "image_url": {"url": data_url(im)}} for im in req.images] + [{"type": "text", "text": text}]
    sp = req.sampling
    return {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": sp.max_tokens,
        "temperature": sp.temperature,
        "top_p": sp.top_p,
        "seed": sp.seed,
        "ignore_eos": sp.ignore_eos,
        **({"answer_tokens": sp.answer_tokens} if sp.answer_tokens is not None else {}),
        "stream": True,
        # Usage on every chunk and a chunk per engine step: tokens are timed even where their text is
        # held back (an incomplete character, or a vocabulary that decodes to nothing).
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }


class _LocalServer:
    """The engine behind a uvicorn server on a free loopback port, for the length of one run."""

    def __init__(self, cfg: RunConfig):
        import uvicorn

        from epd.serve.app import build_app
        from epd.serve.async_llm import AsyncLLM

        started = time.time()
        self.llm = AsyncLLM(
            cfg.model, cfg.deployment, "local" if cfg.backend.kind == "local" else "ray", cfg.backend, retain_finished=False
        )
        self.startup_s = time.time() - started  # time to ready, as the engine backends report it
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        app = build_app(cfg, self.llm)
        self.timings = app.state.timings
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("the loopback server did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.llm.close()


class OnlineBackend:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    def run(self, requests: list[Request]) -> RunResult:
        local: Optional[_LocalServer] = None if self.cfg.server.url else _LocalServer(self.cfg)
        url = self.cfg.server.url or local.url
        try:
            workers = local.llm.core.worker_info() if local else []
            events, outputs, client_start = drive_elsewhere(self.cfg, url, requests)
            if local is None:
                return RunResult(events, outputs, workers, [])
            core = local.llm.core
            return RunResult(
                events,
                outputs,
                workers,
                [],
                startup_s=local.startup_s,
                warmup_s=core.warmup_s,
                start_phases=core.start_phases(),
                server_split=server_split(timelines(events), timelines(core.pipeline.events), local.timings, client_start, core.origin),
                batch_stats=batch_stats(core.batches),
                batches=batch_rows(core.batches, core.origin),
            )
        finally:
            if local:
                local.close()


def server_split(
    client: dict[str, Timeline],
    engine: dict[str, Timeline],
    timings: Optional[ServerTimings] = None,
    client_start: Optional[float] = None,
    engine_origin: Optional[float] = None,
) -> dict[str, float]:
    """Each request's TTFT and TPOT as the client saw them, split into the engine's part (from the request's
    arrival in the engine to its first token / its tokens) and what lies outside the engine (HTTP, request
    parsing and image decoding in the server, the stream back): p50 and p90 of each part, over the
    requests both sides timed. Engine ids are chatcmpl-<client id>-<random>-<prompt>-<choice>.

    With the server's phase marks and both clocks' origins (one host: one wall clock), the outside part is
    split further, along the request's way (each from the phase before): `to_app` (the client's issue to
    the server handing the request to the app: serialisation, connection, headers), `body` (the app
    taking the body), `parse` (JSON and validation), `render` (prompt and images checked, the engine
    given the request), `stream` (the engine's first token to the server handing its chunk over:
    detokenising, the event loop) and `wire` (that chunk to the client's parsed token)."""
    by_client: dict[str, Timeline] = {}
    for eid, tl in engine.items():
        rid = eid.removeprefix("chatcmpl-").rsplit("-", 3)[0]
        if rid in client and tl.ttft is not None:
            by_client.setdefault(rid, tl)  # n > 1: the first choice stands for the request
    names = ("engine_ttft", "outside_ttft", "engine_tpot", "outside_tpot", "to_app", "body", "parse", "render", "stream", "wire")
    parts: dict[str, list[float]] = {name: [] for name in names}
    phased = timings is not None and client_start is not None and engine_origin is not None
    for rid, tl in by_client.items():
        c = client[rid]
        if c.ttft is not None:
            parts["engine_ttft"].append(tl.ttft)
            parts["outside_ttft"].append(c.ttft - tl.ttft)
            marks = timings.get(rid) if phased else {}
            if all(k in marks for k in PHASES):
                issued = client_start + c.at(Ev.ISSUED)
                way = [issued, marks["received"], marks["body_end"], marks["handler"], marks["submitted"]]
                parts["to_app"].append(way[1] - way[0])
                parts["body"].append(way[2] - way[1])
                parts["parse"].append(way[3] - way[2])
                parts["render"].append(way[4] - way[3])
                parts["stream"].append(marks["first_chunk"] - (engine_origin + tl.at(Ev.FIRST_TOKEN)))
                parts["wire"].append(client_start + c.at(Ev.FIRST_TOKEN) - marks["first_chunk"])
        if c.tpot is not None and tl.tpot is not None:
            parts["engine_tpot"].append(tl.tpot)
            parts["outside_tpot"].append(c.tpot - tl.tpot)
    out: dict[str, float] = {"server_split_requests": len(parts["engine_ttft"])}
    for name, values in parts.items():
        if values:
            out[f"server_{name}_p50"], out[f"server_{name}_p90"] = percentile(values, 50), percentile(values, 90)
    return out


def drive_elsewhere(cfg: RunConfig, url: str, requests: list[Request]) -> tuple[EventLog, dict[str, RequestOutput], float]:
    """The client in a process of its own, as real clients are: in the server's process its request
    encoding and stream parsing would take the interpreter from the server and the engine's driver
    (the loopback run's TPOT p90 was 5x the engine's)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_drive_sync, cfg, url, requests).result()


def _drive_sync(cfg: RunConfig, url: str, requests: list[Request]) -> tuple[EventLog, dict[str, RequestOutput], float]:
    return asyncio.run(drive(cfg, url, requests))


async def drive(cfg: RunConfig, url: str, requests: list[Request]) -> tuple[EventLog, dict[str, RequestOutput], float]:
    """Sends a workload's requests at their arrival times and times each token from the client's side;
    event times count from the returned start (wall clock)."""
    import httpx

    events, outputs = EventLog(), {}
    headers = {"Authorization": f"Bearer {cfg.server.api_key}"} if cfg.server.api_key else {}
    # images encoded and bodies serialised before the clock starts: the client's own JSON work is not the server's
    bodies = {r.request_id: json.dumps(chat_body(r)).encode() for r in requests}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=cfg.backend.timeout_s, limits=limits) as client:
        start = time.time()

        async def one(req: Request) -> None:
            delay = start + req.arrival_time - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            rid = req.request_id
            events.emit(time.time() - start, rid, Ev.ISSUED, num_images=len(req.images))
            pieces, usage, finish, timed = [], None, None, 0
            try:
                for attempt in range(cfg.server.client_retries + 1):
                    # X-Request-Id: the server's engine ids start with chatcmpl-<rid>, to match its events with ours
                    headers = {"X-Request-Id": rid, "Content-Type": "application/json"}
                    async with client.stream("POST", "/v1/chat/completions", content=bodies[rid], headers=headers) as resp:
                        if resp.status_code in (429, 503) and attempt < cfg.server.client_retries:
                            await asyncio.sleep(float(resp.headers.get("retry-after", "1")))  # refused for now: try again
                            continue
                        if resp.status_code != 200:
                            reason = (await resp.aread()).decode(errors="replace")[:300]
                            kind = "refused" if resp.status_code in (429, 503) else "failed"
                            raise RuntimeError(f"{kind}: HTTP {resp.status_code}: {reason}")
                        async for line in resp.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            chunk = json.loads(line[6:])
                            now = time.time() - start
                            if chunk.get("usage"):
                                usage = chunk["usage"]
                            for choice in chunk.get("choices", []):
                                if choice["delta"].get("content"):
                                    pieces.append(choice["delta"]["content"])
                                finish = choice.get("finish_reason") or finish
                            # Each token the chunk accounts for (a server without per-chunk usage: one per text piece).
                            count = chunk["usage"]["completion_tokens"] if chunk.get("usage") and chunk.get("choices") else len(pieces)
                            for _ in range(count - timed):
                                events.emit(now, rid, Ev.FIRST_TOKEN if timed == 0 else Ev.TOKEN)
                                timed += 1
                    break
                if finish == "abort":
                    raise RuntimeError("failed: the server aborted the request while streaming it")
                n_out = usage["completion_tokens"] if usage else len(pieces)
                events.emit(time.time() - start, rid, Ev.FINISHED, num_output_tokens=n_out, finish_reason=finish)
                outputs[rid] = RequestOutput(rid, [], "".join(pieces), finish, None, usage["prompt_tokens"] if usage else 0)
            except Exception as exc:  # refused or broken: an aborted request, the run goes on
                events.emit(time.time() - start, rid, Ev.ABORTED, reason=str(exc))
                outputs[rid] = RequestOutput(rid, [], None, "abort", str(exc))

        await asyncio.gather(*(one(r) for r in requests))
    return events, outputs, start
