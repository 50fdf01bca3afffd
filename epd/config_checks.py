"""Every value of a run's config with a range or a set of choices, checked before anything runs: one
message naming each bad key, its value and what it may be (`python -m epd.run` prints it and exits
without a traceback or an output directory)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any

from epd.allocation.policies import POLICIES
from epd.config import TRANSFER_BACKENDS, RunConfig

TASKS = ("serve", "profile", "optimize", "compare", "regime")
ARRIVALS = ("poisson", "gamma", "constant", "trace", "offline")
BACKENDS = ("ray", "local", "sim", "online")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    def __init__(self, problems: list[str]):
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _Checks:
    def __init__(self):
        self.problems: list[str] = []

    def choice(self, key: str, value, choices) -> None:
        if value not in choices:
            self.problems.append(f"{key}={value!r}: must be one of {', '.join(map(str, choices))}")

    def at_least(self, key: str, value, low, strict: bool = False) -> None:
        if not _num(value) or value < low or (strict and value == low):
            self.problems.append(f"{key}={value!r}: must be {'>' if strict else '>='} {low}")

    def within(self, key: str, value, low, high, low_open: bool = False) -> None:
        if not _num(value) or value < low or value > high or (low_open and value == low):
            self.problems.append(f"{key}={value!r}: must be in {'(' if low_open else '['}{low}, {high}]")

    def optional_at_least(self, key: str, value, low) -> None:
        if value is not None:
            self.at_least(key, value, low)


def check_run_config(cfg: RunConfig) -> None:
    """Raise ConfigError listing every value out of its range or choices."""
    c = _Checks()
    c.choice("task", cfg.task, TASKS)
    m = cfg.model
    c.choice("model.load_format", m.load_format, ("dummy", "hf"))
    c.choice("model.dtype", m.dtype, DTYPES)
    c.choice("model.image_resize", m.image_resize, ("host", "device"))
    c.choice("model.image_decode", m.image_decode, ("host", "device"))
    if m.image_decode == "device" and m.image_resize != "device":
        c.problems.append("model.image_decode=device needs model.image_resize=device (decoded images stay on the GPU)")
    c.at_least("model.max_tiles", m.max_tiles, 1)
    c.at_least("model.step_graph_tokens", m.step_graph_tokens, 0)
    c.at_least("model.vision_graph_tiles", m.vision_graph_tiles, 0)
    w = cfg.workload
    c.choice("workload.kind", w.kind, ("synthetic", "dataset"))
    c.choice("workload.arrival", w.arrival, ARRIVALS)
    if w.arrival in ("poisson", "gamma", "constant"):
        c.at_least("workload.rate", w.rate, 0, strict=True)
    if w.arrival == "gamma":
        c.at_least("workload.cv", w.cv, 0, strict=True)
    c.at_least("workload.num_requests", w.num_requests, 0)
    c.at_least("workload.images_per_request", w.images_per_request, 0)
    c.optional_at_least("workload.images_per_request_max", w.images_per_request_max, w.images_per_request)
    c.at_least("workload.image_width", w.image_width, 1)
    c.at_least("workload.image_height", w.image_height, 1)
    c.at_least("workload.prompt_tokens", w.prompt_tokens, 0)
    c.optional_at_least("workload.prompt_tokens_max", w.prompt_tokens_max, w.prompt_tokens)
    c.at_least("workload.output_tokens", w.output_tokens, 1)
    c.optional_at_least("workload.output_tokens_max", w.output_tokens_max, w.output_tokens)
    c.at_least("workload.temperature", w.temperature, 0)
    c.within("workload.top_p", w.top_p, 0, 1, low_open=True)
    c.at_least("workload.top_k", w.top_k, 0)
    if w.kind == "dataset" and not w.dataset_path:
        c.problems.append("workload.kind=dataset needs workload.dataset_path (a JSONL file)")
    if w.arrival == "trace" and not w.trace_path:
        c.problems.append("workload.arrival=trace needs workload.trace_path")
    s = cfg.slo
    c.at_least("slo.ttft", s.ttft, 0, strict=True)
    c.at_least("slo.tpot", s.tpot, 0, strict=True)
    c.within("slo.attainment_target", s.attainment_target, 0, 1, low_open=True)
    a = cfg.allocation
    c.choice("allocation.policy", a.policy, POLICIES.names())
    c.at_least("allocation.interval_s", a.interval_s, 0, strict=True)
    c.at_least("allocation.hysteresis", a.hysteresis, 1)
    c.at_least("allocation.patience", a.patience, 1)
    c.at_least("allocation.cooldown_s", a.cooldown_s, 0)
    c.at_least("allocation.window", a.window, 8)
    c.at_least("allocation.switch_cost_s", a.switch_cost_s, 0)
    b = cfg.backend
    c.choice("backend.kind", b.kind, BACKENDS)
    c.choice("backend.latency_model", b.latency_model, ("roofline", "profiled"))
    c.at_least("backend.timeout_s", b.timeout_s, 0, strict=True)
    c.at_least("backend.worker_deadline_factor", b.worker_deadline_factor, 1)
    c.choice("backend.placement", b.placement, ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    c.optional_at_least("backend.num_cpus", b.num_cpus, 1)
    c.at_least("backend.sim_encoder_scale", b.sim_encoder_scale, 0, strict=True)
    c.at_least("server.client_retries", cfg.server.client_retries, 0)
    c.at_least("server.drain_timeout_s", cfg.server.drain_timeout_s, 0)
    c.at_least("server.max_inflight_bytes", cfg.server.max_inflight_bytes, 1)
    c.choice("logger.kind", cfg.logger.kind, ("wandb", "none"))
    c.choice("logger.mode", cfg.logger.mode, ("offline", "online", "disabled"))
    c.choice("deployment.transfer", cfg.deployment.transfer, TRANSFER_BACKENDS)
    h = cfg.hardware
    for key in ("peak_flops", "memory_bandwidth", "link_bandwidth", "memory_bytes"):
        c.at_least(f"hardware.{key}", getattr(h, key), 0, strict=True)
    for key in ("compute_efficiency", "memory_efficiency"):
        c.within(f"hardware.{key}", getattr(h, key), 0, 1, low_open=True)
    c.at_least("hardware.state_passes", h.state_passes, 0)
    c.within("hardware.vision_efficiency", h.vision_efficiency, 0, 1)  # 0: the LM's compute_efficiency
    for key in ("step_overhead", "rpc_latency", "step_floor", "linear_layer_floor", "link_latency", "encode_floor"):
        c.at_least(f"hardware.{key}", getattr(h, key), 0)
    if cfg.task == "compare":
        if not cfg.compare.rates or any(not _num(r) or r <= 0 for r in cfg.compare.rates):
            c.problems.append(f"compare.rates={list(cfg.compare.rates)}: must be positive rates")
        c.choice("compare.sim_latency_model", cfg.compare.sim_latency_model, ("roofline", "profiled"))
        c.at_least("compare.warmup_requests", cfg.compare.warmup_requests, 0)
        c.at_least("compare.repeats", cfg.compare.repeats, 1)
        if not _num(cfg.compare.ci_level) or not 0 < cfg.compare.ci_level < 1:
            c.problems.append(f"compare.ci_level={cfg.compare.ci_level!r}: must be in (0, 1)")
    if cfg.task == "regime":
        r = cfg.regime
        c.at_least("regime.gpus", r.gpus, 2)
        c.within("regime.reserve_fraction", r.reserve_fraction, 0, 1)
        for key in ("encoder_scales", "images_per_request", "memory_gb"):
            values = getattr(r, key)
            if not values or any(not _num(v) or v <= 0 for v in values):
                c.problems.append(f"regime.{key}={list(values)}: must be a non-empty list of positive numbers")
    try:
        cfg.deployment.validate()
    except ValueError as exc:
        c.problems.append(str(exc))
    if c.problems:
        raise ConfigError(c.problems)


def unknown_override(arg: str) -> str | None:
    """For a command-line override `a.b.c=value`, a message naming the key if the config has no such
    key (with the nearest ones), instead of Hydra's hint to append it with `+`; None if it exists or
    is not a plain override (`+x=`, `~x`, `hydra.*`, flags, group choices are left to Hydra)."""
    if arg.startswith(("-", "+", "~")) or "=" not in arg:
        return None
    key = arg.split("=", 1)[0]
    parts = key.split(".")
    if parts[0] == "hydra":
        return None
    node: Any = RunConfig
    for depth, part in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            return None  # a dict or list field (compare.deployments, workload.phases): free-form below
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            where = ".".join(parts[:depth]) or "the config"
            near = difflib.get_close_matches(part, list(fields), n=3)
            hint = f"; did you mean {', '.join('.'.join([*parts[:depth], n]) for n in near)}?" if near else ""
            return f"{key}: {where} has no key {part!r}{hint} (a new key is added with +{key}=..., rarely what you want)"
        hints = typing.get_type_hints(node)
        node = hints[part]
        if typing.get_origin(node) is typing.Union:
            node = next((a for a in typing.get_args(node) if a is not type(None)), node)
    return None
