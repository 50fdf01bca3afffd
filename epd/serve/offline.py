"""Offline API: submit many requests, get every output back."""

from __future__ import annotations

from typing import Optional, Union

from epd.config import BackendConfig, DeploymentConfig, EngineConfig, ModelConfig
from epd.engine.core import EngineCore
from epd.request import Request, RequestOutput
from epd.stages.admission import check_identity


class OfflineLLM:
    def __init__(
        self,
        model: Union[EngineConfig, ModelConfig],
        deployment: Optional[DeploymentConfig] = None,
        executor: str = "ray",
        backend: Optional[BackendConfig] = None,
        allocation=None,
    ):
        """An EngineConfig, or its fields (model, deployment, executor, backend)."""
        self.core = EngineCore(EngineConfig.of(model, deployment, executor, backend), allocation=allocation)

    def generate(self, requests: list[Request], timeout_s: float = 600.0, on_finished=None) -> list[RequestOutput]:
        """Outputs in the order of `requests`. Ids must be unique among them and among requests still
        active; a finished request is forgotten once returned, so its id may be used again.
        `on_finished(n)`: told as n more of them end (a progress bar). The engine's events
        (`core.pipeline.events`) are this call's."""
        for r in requests:
            check_identity(r)
        ids = [r.request_id for r in requests]
        dups = sorted({i for i in ids if ids.count(i) > 1})
        if dups:
            raise ValueError(f"duplicate request ids: {dups[:10]}; nothing was submitted")
        active = sorted(i for i in ids if i in self.core.pipeline.states and not self.core.pipeline.states[i].done)
        if active:
            raise ValueError(f"request ids still active in the engine: {active[:10]}; nothing was submitted")
        # Each call is a run of its own: its events, load samples and clock start afresh, so a process
        # that calls generate for weeks holds one call's worth (after a call that timed out, requests
        # may still be active: then this call's run shares theirs).
        if not self.core.has_work():
            self.core.new_run()
        for req in requests:
            self.core.add_request(req)
        self.core.run_until_idle(timeout_s, on_finished)
        outputs = [self.core.pipeline.outputs[r.request_id] for r in requests]
        for rid in ids:
            self.core.pipeline.forget(rid)
        return outputs

    def close(self) -> None:
        self.core.close()

    def __enter__(self) -> OfflineLLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
