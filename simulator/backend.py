"""`backend=sim`: the experiment's workload through the simulator instead of the real engine."""

from __future__ import annotations

import dataclasses
import functools

from epd.allocation import make_allocation
from epd.allocation.load import STAGES
from epd.config import RunConfig
from epd.metrics import summarize
from epd.models.runtime import load_family
from epd.models.tokenizer import load_tokenizer
from epd.request import Request
from epd.run_result import RunResult
from simulator.latency import LatencyModel, ProfiledModel, RooflineModel
from simulator.shapes import ModelShape
from simulator.sim import Simulation


def make_latency_model(cfg: RunConfig, shape: ModelShape) -> LatencyModel:
    model = cfg.model
    roofline = RooflineModel(shape, cfg.hardware, model.image_resize == "device", model.image_decode == "device")
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
        if cfg.backend.sim_encoder_scale != 1.0:
            self.shape = self.shape.with_encoder_scale(cfg.backend.sim_encoder_scale)
        self.latency = make_latency_model(cfg, self.shape)

    def run(self, requests: list[Request]) -> RunResult:
        tokenizer = load_tokenizer(self.cfg.model, {self.family.image_token_id, *range(4)})
        return Simulation(
            self.cfg.deployment,
            self.family,
            self.shape,
            self.latency,
            self.sample_interval,
            tokenizer,
            self.cfg.hardware.shared_cores,
            allocation=make_allocation(self.cfg, functools.partial(best_split, self.cfg)),
            switch_cost_s=self.cfg.allocation.switch_cost_s,
        ).run(requests)


def best_split(run: RunConfig, requests: list, workers: int) -> dict[str, int]:
    """Simulate every E/P/D split of `workers` single-role workers on `requests`; the best by SLO
    attainment, then by end-to-end latency (median and P90). The simulated allocation policy's search."""
    pools = {s: getattr(run.deployment, s) for s in STAGES}
    best, best_key = None, None
    for e in range(1, workers - 1):
        for p in range(1, workers - e):
            d = workers - e - p
            counts = {"encode": e, "prefill": p, "decode": d}
            dep = dataclasses.replace(run.deployment, **{s: dataclasses.replace(pools[s], instances=n) for s, n in counts.items()})
            static = dataclasses.replace(run.allocation, policy="static")
            cfg = dataclasses.replace(run, deployment=dep, backend=dataclasses.replace(run.backend, kind="sim"), allocation=static)
            result = SimBackend(cfg).run(requests)
            s = summarize(result.events, run.slo.ttft, run.slo.tpot, dep.describe())
            key = (s["slo_attainment"], -((s["e2e_p50"] or 0.0) + (s["e2e_p90"] or 0.0)))
            if best_key is None or key > best_key:
                best, best_key = counts, key
    return best
