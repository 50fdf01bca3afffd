"""Offline API: submit many requests, get every output back."""

from __future__ import annotations

from typing import Optional

from epd.config import BackendConfig, DeploymentConfig, ModelConfig
from epd.request import Request, RequestOutput
from epd.stages.engine import EngineCore


class OfflineLLM:
    def __init__(
        self,
        model: ModelConfig,
        deployment: DeploymentConfig,
        executor: str = "ray",
        backend: Optional[BackendConfig] = None,
        allocation=None,
    ):
        self.core = EngineCore(model, deployment, executor, backend, allocation=allocation)

    def generate(self, requests: list[Request], timeout_s: float = 600.0) -> list[RequestOutput]:
        for req in requests:
            self.core.add_request(req)
        self.core.run_until_idle(timeout_s)
        return [self.core.pipeline.outputs[r.request_id] for r in requests]

    def close(self) -> None:
        self.core.close()

    def __enter__(self) -> OfflineLLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
