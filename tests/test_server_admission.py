"""Admission by bytes: the images and prompts of the requests in flight are bounded by
`server.max_inflight_bytes` as well as by their count."""

from __future__ import annotations

import base64
import dataclasses
import io
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from epd.config import ModelConfig, RunConfig, ServerConfig
from epd.serve.app import build_app
from epd.serve.async_llm import AsyncLLM
from tests.serving import DEPLOYMENT, LiveServer, _wait_drained


def _noisy_png(w: int, h: int, seed: int) -> str:
    """A PNG that does not compress: its bytes are about 3 * w * h."""
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _body(url: str, max_tokens: int, stream: bool = False) -> dict:
    content = [{"type": "text", "text": "what is it"}, {"type": "image_url", "image_url": {"url": url}}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}


@pytest.fixture(scope="module")
def live():
    llm = AsyncLLM(ModelConfig(), DEPLOYMENT, "local")
    cfg = dataclasses.replace(RunConfig(deployment=DEPLOYMENT), server=ServerConfig(max_inflight_bytes=100_000))
    server = LiveServer(build_app(cfg, llm))
    yield server, llm
    server.stop()
    llm.close()


def test_a_request_larger_than_the_byte_bound_is_413(live):
    server, llm = live
    r = httpx.post(server.url + "/v1/chat/completions", json=_body(_noisy_png(200, 200, 1), 2), timeout=30)
    assert r.status_code == 413 and "bytes" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health").json()["inflight_bytes"] == 0


def test_bytes_in_flight_refuse_with_429_until_released(live):
    server, llm = live
    holder_done = threading.Event()
    first = threading.Event()

    def holder():  # ~60 KB of image held while it streams 300 tokens
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=_body(_noisy_png(140, 140, 2), 300, True), timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    first.set()
        holder_done.set()

    t = threading.Thread(target=holder, daemon=True)
    t.start()
    assert first.wait(30)
    assert httpx.get(server.url + "/health").json()["inflight_bytes"] > 50_000
    refused = httpx.post(server.url + "/v1/chat/completions", json=_body(_noisy_png(140, 140, 3), 2), timeout=30)
    assert refused.status_code == 429 and refused.headers.get("retry-after"), refused.text
    small = httpx.post(server.url + "/v1/chat/completions", json=_body(_noisy_png(20, 20, 4), 2), timeout=30)
    assert small.status_code == 200  # what fits beside it is served
    assert holder_done.wait(60)
    deadline = time.time() + 10
    while httpx.get(server.url + "/health").json()["inflight_bytes"] and time.time() < deadline:
        time.sleep(0.05)
    assert httpx.get(server.url + "/health").json()["inflight_bytes"] == 0
    again = httpx.post(server.url + "/v1/chat/completions", json=_body(_noisy_png(140, 140, 3), 2), timeout=30)
    assert again.status_code == 200
    _wait_drained(llm)


def test_a_server_engine_holds_only_bounded_state(monkeypatch):
    """As the server runs it (`retain_finished=False`), the engine keeps no finished request's state or
    output, and only the latest events and load samples, however many requests pass."""
    import asyncio

    import epd.serve.async_llm as async_llm
    from epd.request import ImageInput, Request, SamplingParams

    monkeypatch.setattr(async_llm, "SERVER_EVENTS", 120)
    llm = AsyncLLM(ModelConfig(), DEPLOYMENT, "local", retain_finished=False)
    try:

        async def one(i: int) -> int:
            req = Request(f"s{i}", prompt_token_ids=(10 + i % 50, 11), images=(ImageInput(width=60, height=40, seed=i),))
            req = dataclasses.replace(req, sampling=SamplingParams(max_tokens=4, ignore_eos=True))
            return sum([len(d.token_ids) async for d in llm.generate(req)])

        async def run_all() -> list[int]:
            return await asyncio.gather(*(one(i) for i in range(40)))

        assert asyncio.run(run_all()) == [4] * 40
        _wait_drained(llm)
        deadline = time.time() + 10
        while llm.core.pipeline.states and time.time() < deadline:
            time.sleep(0.05)
        assert not llm.core.pipeline.states and not llm.core.pipeline.outputs
        assert len(llm.core.pipeline.events) == 120  # 40 requests made ~600; the latest 120 are kept
        assert llm.core.timeseries.maxlen == async_llm.SERVER_SAMPLES
    finally:
        llm.close()


def test_offline_generate_calls_hold_one_calls_worth():
    """Each OfflineLLM.generate call is a run of its own: after many calls the engine holds no request
    state or output and only the last call's events."""
    from epd.lifetime import LifetimeEvent as Ev
    from epd.request import Request, SamplingParams
    from epd.serve.offline import OfflineLLM

    with OfflineLLM(ModelConfig(), DEPLOYMENT, "local") as llm:
        for call in range(5):
            reqs = [
                Request(f"c{call}-{i}", prompt_token_ids=(10 + i, 11), sampling=SamplingParams(max_tokens=3, ignore_eos=True))
                for i in range(6)
            ]
            assert [len(o.token_ids) for o in llm.generate(reqs)] == [3] * 6
            finished = {e.request_id for e in llm.core.pipeline.events if e.kind == Ev.FINISHED}
            assert finished == {r.request_id for r in reqs}  # this call's requests only
        assert not llm.core.pipeline.states and not llm.core.pipeline.outputs


def test_health_says_degraded_when_a_worker_is_lost():
    """A lost worker makes /health 'degraded' (200 while its stage has a sibling); a stage with no
    worker left makes it a 503 naming the stage."""
    from epd.config import DeploymentConfig, PoolConfig

    dep = DeploymentConfig(name="epd", encode=PoolConfig(instances=2), prefill=PoolConfig(), decode=PoolConfig())
    llm = AsyncLLM(ModelConfig(), dep, "local")
    server = LiveServer(build_app(RunConfig(deployment=dep), llm))
    try:
        assert httpx.get(server.url + "/health").json()["status"] == "ok"
        pipe = llm.core.pipeline
        pipe.lose_instance(pipe.instances["encode-1"], "killed", time.time())
        r = httpx.get(server.url + "/health")
        assert r.status_code == 200 and r.json()["status"] == "degraded" and r.json()["lost_workers"] == ["encode-1"]
        pipe.lose_instance(pipe.instances["decode-0"], "killed", time.time())
        r = httpx.get(server.url + "/health")
        assert r.status_code == 503 and r.json()["stages_without_workers"] == ["decode"]
    finally:
        server.stop()
        llm.close()
