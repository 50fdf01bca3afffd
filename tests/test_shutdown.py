"""Graceful shutdown of the server: on SIGTERM admission stops (503 + Retry-After, /health draining),
requests in flight finish (or are aborted at the drain bound), then the server and engine stop."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import uvicorn  # noqa: E402  (after the project's imports, as the server module does)

from epd.config import ModelConfig, RunConfig, ServerConfig
from epd.serve.app import build_app
from epd.serve.async_llm import AsyncLLM
from epd.serve.shutdown import DrainingServer
from tests.serving import DEPLOYMENT, _free_port, _wait_drained

BODY = {"messages": [{"role": "user", "content": "count"}], "stream": True, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def llm():
    engine = AsyncLLM(ModelConfig(), DEPLOYMENT, "local")
    yield engine
    engine.close()


def _start(llm, drain_timeout_s: float):
    cfg = dataclasses.replace(RunConfig(deployment=DEPLOYMENT), server=ServerConfig(drain_timeout_s=drain_timeout_s))
    app = build_app(cfg, llm)
    port = _free_port()
    server = DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"), app, llm, drain_timeout_s)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


def _stream_in_background(url: str, max_tokens: int) -> tuple[threading.Thread, dict, threading.Event]:
    got: dict = {"tokens": 0, "finish": None}
    first = threading.Event()

    def run():
        with httpx.stream("POST", url + "/v1/chat/completions", json={**BODY, "max_tokens": max_tokens}, timeout=60) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content"):
                        got["tokens"] += 1
                        first.set()
                    if choice.get("finish_reason"):
                        got["finish"] = choice["finish_reason"]
                if "error" in chunk:
                    got["finish"] = "error"
        first.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, got, first


def test_sigterm_stops_admission_and_lets_requests_in_flight_finish(llm):
    server, thread, url = _start(llm, drain_timeout_s=60)
    stream, got, first = _stream_in_background(url, 400)
    assert first.wait(30), "the stream did not start"
    server.handle_exit(signal.SIGTERM, None)
    refused = httpx.post(url + "/v1/chat/completions", json={**BODY, "stream": False, "max_tokens": 4}, timeout=10)
    assert refused.status_code == 503 and refused.headers.get("retry-after") and "shutting down" in refused.json()["error"]["message"]
    health = httpx.get(url + "/health", timeout=10)
    assert health.status_code == 503 and health.json()["status"] == "draining"
    stream.join(30)
    assert got["finish"] == "length", got  # it ran to its end
    thread.join(30)
    assert not thread.is_alive(), "the server did not stop after draining"
    _wait_drained(llm)


def test_requests_still_running_at_the_drain_bound_are_aborted(llm):
    server, thread, url = _start(llm, drain_timeout_s=0.3)
    stream, got, first = _stream_in_background(url, 3000)
    assert first.wait(30)
    started = time.time()
    server.handle_exit(signal.SIGTERM, None)
    stream.join(30)
    thread.join(30)
    assert not thread.is_alive() and time.time() - started < 15
    assert got["finish"] != "length" and got["tokens"] < 3000, got
    _wait_drained(llm)


def test_python_m_epd_serve_exits_cleanly_on_sigterm(tmp_path):
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(os.getcwd())}
    args = ["backend.kind=local", f"server.port={port}", f"hydra.run.dir={tmp_path}/run"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "epd.serve", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the server did not come up"
            time.sleep(0.2)
        ok = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={**BODY, "stream": False, "max_tokens": 3}, timeout=30)
        assert ok.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        out = proc.stdout.read()
        assert "ready in" in out and "shutting down" in out, out[-2000:]
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
    finally:
        if proc.poll() is None:
            proc.kill()
