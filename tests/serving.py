"""A live server on loopback over an engine, for the server tests."""

import base64
import dataclasses
import io
import socket
import threading
import time

import uvicorn
from PIL import Image

from epd.config import DeploymentConfig, PoolConfig, RunConfig, ServerConfig
from epd.serve.app import build_app

DEPLOYMENT = DeploymentConfig(name="epd", encode=PoolConfig(), prefill=PoolConfig(kv_blocks=256), decode=PoolConfig(kv_blocks=256))


def png_data_url(w=64, h=48, color=(200, 30, 60)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, app):
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _serve(engine, model=None, **server):
    cfg = dataclasses.replace(RunConfig(deployment=DEPLOYMENT), server=ServerConfig(**server))
    if model is not None:
        cfg = dataclasses.replace(cfg, model=model)
    return LiveServer(build_app(cfg, engine))


def _wait_drained(engine, timeout=10.0):
    deadline = time.time() + timeout
    while engine.core.pipeline.num_active or any(i.busy for i in engine.core.pipeline.instances.values()):
        assert time.time() < deadline, f"{engine.core.pipeline.num_active} requests still active"
        time.sleep(0.05)
    for inst in engine.core.pipeline.instances.values():
        inst.assert_drained()  # every block free, or cached with nobody holding it
