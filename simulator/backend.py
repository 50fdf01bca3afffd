"""`backend=sim`: the experiment's workload through the simulator instead of the real engine."""

from __future__ import annotations

from epd.backends import RunResult
from epd.config import RunConfig
from epd.models.runtime import load_family
from epd.models.tokenizer import load_tokenizer
from epd.request import Request
from simulator.latency import LatencyModel, ProfiledModel, RooflineModel
from simulator.shapes import ModelShape
from simulator.sim import Simulation


def make_latency_model(cfg: RunConfig, shape: ModelShape) -> LatencyModel:
    roofline = RooflineModel(shape, cfg.hardware, resize_on_device=cfg.model.image_resize == "device")
    if cfg.backend.latency_model == "roofline":
        return roofline
    if cfg.backend.latency_model == "profiled":
        if not cfg.backend.profile_path:
            raise ValueError("backend.latency_model=profiled needs backend.profile_path")
        return ProfiledModel.load(cfg.backend.profile_path, fallback=roofline)
    raise ValueError(f"unknown backend.latency_model {cfg.backend.latency_model!r} (roofline, profiled)")


class SimBackend:
    def __init__(self, cfg: RunConfig, sample_interval: float = 0.25):
        self.cfg = cfg
        self.sample_interval = sample_interval
        self.family = load_family(cfg.model)
        self.shape = ModelShape.of(self.family, cfg.model.dtype)
        self.latency = make_latency_model(cfg, self.shape)

    def run(self, requests: list[Request]) -> RunResult:
        tokenizer = load_tokenizer(self.cfg.model, {self.family.image_token_id, *range(4)})
        from epd.allocation import make_allocation

        return Simulation(
            self.cfg.deployment,
            self.family,
            self.shape,
            self.latency,
            self.sample_interval,
            tokenizer,
            self.cfg.hardware.shared_cores,
            allocation=make_allocation(self.cfg),
            switch_cost_s=self.cfg.allocation.switch_cost_s,
        ).run(requests)
