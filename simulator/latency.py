"""Stage latency models behind one interface: roofline (from FLOPs/bytes and a hardware spec) or
profiled (fitted on measurements of the real engine)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from epd.config import HardwareConfig
from simulator.shapes import ModelShape


@dataclass(frozen=True)
class EncodeShape:
    tiles: int  # tower forwards in the batch (images, or tiles for tiling models)
    attention_flops: float = 0.0  # native-resolution towers: the images' attention (`ModelShape.image_attention_flops`)


@dataclass(frozen=True)
class PrefillShape:
    lens: tuple[int, ...]  # new tokens per sequence
    starts: tuple[int, ...] = ()  # tokens each already has in the KV cache (chunked prefill; empty: none)

    @property
    def tokens(self) -> int:
        return sum(self.lens)

    @property
    def square(self) -> int:
        """Twice the causal attention pairs: n^2 for a fresh prompt, n^2 + 2ns for a chunk after s tokens."""
        starts = self.starts or (0,) * len(self.lens)
        return sum(n * n + 2 * n * s for n, s in zip(self.lens, starts))


@dataclass(frozen=True)
class DecodeShape:
    batch: int
    context: int  # total tokens attended over by the batch


class LatencyModel:
    # The engine's cost per batch beyond compute: `overhead` on the worker, between back-to-back batches
    # (what is left with async scheduling); `rpc` the driver round trip, which a worker scheduled one
    # batch at a time waits out between batches.
    overhead: float = 0.0
    rpc: float = 0.0

    def encode(self, s: EncodeShape) -> float:
        raise NotImplementedError

    def preprocess(self, images: list[tuple[float, int]], threads: int) -> float:
        """Host time to prepare a batch's images, each (source megapixels, tiles), on `threads` cores.
        0 unless the model leaves it out of `encode` (a profile measured it inside its encode spans)."""
        return 0.0

    def device_prep(self, images: list[tuple[float, int]]) -> float:
        """GPU time to decode and resize a batch's images before its tower (image_decode/resize=device)."""
        return 0.0

    def prefill(self, s: PrefillShape) -> float:
        raise NotImplementedError

    def decode(self, s: DecodeShape) -> float:
        raise NotImplementedError

    def transfer(self, nbytes: float) -> float:
        raise NotImplementedError


class RooflineModel(LatencyModel):
    def __init__(self, shape: ModelShape, hw: HardwareConfig, resize_on_device: bool = False, decode_on_device: bool = False):
        self.m, self.hw = shape, hw
        self.resize_on_device = resize_on_device or decode_on_device  # model.image_resize=device: the host only decodes
        self.decode_on_device = decode_on_device  # model.image_decode=device: the host passes JPEG bytes on
        self.flops = hw.peak_flops * hw.compute_efficiency
        self.vision_flops = hw.peak_flops * (hw.vision_efficiency or hw.compute_efficiency)
        self.bw = hw.memory_bandwidth * hw.memory_efficiency
        self.overhead, self.rpc = hw.step_overhead, hw.rpc_latency
        # the fixed device time of an LM step: the step's own, and a hybrid LM's linear layers' extra kernels
        self.floor = hw.step_floor + shape.linear_layers * hw.linear_layer_floor
        self.state_bytes = hw.state_passes * shape.state_bytes_per_seq  # each pass reads and writes it

    def _time(self, flops: float, nbytes: float, rate: float = 0.0) -> float:
        return max(flops / (rate or self.flops), nbytes / self.bw)

    def encode(self, s: EncodeShape) -> float:
        act = s.tiles * (self.m.pixels_per_tile * 3 * 4 + self.m.tokens_per_tile * self.m.mm_bytes_per_token)
        flops = s.tiles * self.m.vision_flops_per_tile + s.attention_flops
        return self.hw.encode_floor + self._time(flops, self.m.vision_params * self.m.dtype_bytes + act, self.vision_flops)

    def preprocess(self, images: list[tuple[float, int]], threads: int) -> float:
        hw = self.hw
        if self.decode_on_device:
            return 0.0
        if self.resize_on_device:
            costs = [mp * hw.decode_s_per_mpixel for mp, _ in images]
        else:
            costs = [mp * (hw.decode_s_per_mpixel + hw.preprocess_s_per_mpixel) + tiles * hw.preprocess_s_per_tile for mp, tiles in images]
        if not costs:
            return 0.0
        return max(max(costs), sum(costs) / max(1, threads))  # images in parallel, one per core

    def device_prep(self, images: list[tuple[float, int]]) -> float:
        hw, total = self.hw, 0.0
        for mp, tiles in images:
            if self.decode_on_device:
                total += mp * hw.device_decode_s_per_mpixel
            if self.resize_on_device:
                total += mp * hw.device_resize_s_per_mpixel + tiles * hw.device_resize_s_per_tile
        return total

    def prefill(self, s: PrefillShape) -> float:
        flops = s.tokens * self.m.lm_flops_per_token + 0.5 * s.square * self.m.attn_flops_coeff + len(s.lens) * self.m.head_flops
        nbytes = self.m.lm_params * self.m.dtype_bytes + (s.tokens + sum(s.starts)) * self.m.kv_bytes_per_token
        nbytes += 2 * len(s.lens) * self.state_bytes  # a hybrid LM's state, read and written per sequence
        return self.floor + self._time(flops, nbytes)

    def decode(self, s: DecodeShape) -> float:
        flops = s.batch * (self.m.lm_flops_per_token + self.m.head_flops) + s.context * self.m.attn_flops_coeff
        nbytes = self.m.lm_params * self.m.dtype_bytes + s.context * self.m.kv_bytes_per_token + 2 * s.batch * self.state_bytes
        return self.floor + self._time(flops, nbytes)

    def transfer(self, nbytes: float) -> float:
        return self.hw.link_latency + nbytes / self.hw.link_bandwidth


# Features of each stage's fitted model: encode a + b*tiles; prefill a + b*tokens + c*sum(len^2) + d*seqs;
# decode a + b*batch + c*context; transfer a + b*bytes.
FEATURES = {
    "encode": lambda r: [1.0, r["tiles"]],
    "prefill": lambda r: [1.0, r["tokens"], r["square"], r["seqs"]],
    "decode": lambda r: [1.0, r["batch"], r["context"]],
    "transfer": lambda r: [1.0, r["bytes"]],
}


def fit(rows: list[dict]) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Least squares on relative error per stage (rows weighted by 1/measured time, so short batches
    count as much as long ones); returns (coefficients, mean relative error). Coefficients may come out
    negative where features are correlated; predictions are floored at zero."""
    coeffs, errors = {}, {}
    for stage, feats in FEATURES.items():
        data = [r for r in rows if r["stage"] == stage]
        if not data:
            continue
        x = np.array([feats(r) for r in data], dtype=float)
        y = np.array([r["seconds"] for r in data], dtype=float)
        w = 1.0 / np.maximum(y, 1e-9)
        sol, *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
        pred = np.maximum(x @ sol, 0.0)
        coeffs[stage] = [float(c) for c in sol]
        errors[stage] = float(np.mean(np.abs(pred - y) / np.maximum(y, 1e-9)))
    return coeffs, errors


class ProfiledModel(LatencyModel):
    def __init__(
        self,
        coeffs: dict[str, list[float]],
        overhead: float = 0.0,
        fallback: LatencyModel | None = None,
        slowdown: float = 1.0,
        rpc: float = 0.0,
    ):
        self.c, self.overhead, self.fallback, self.slowdown, self.rpc = coeffs, overhead, fallback, slowdown, rpc

    @staticmethod
    def load(path: str, fallback: LatencyModel | None = None) -> ProfiledModel:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"latency profile not found: {p} (make one with +experiment=profile)")
        data = json.loads(p.read_text())
        coeffs, _ = fit(data["rows"])
        # A profile from before "rpc" was split out holds the whole per-batch cost in "overhead".
        return ProfiledModel(coeffs, data.get("overhead", 0.0), fallback, data.get("slowdown", 1.0), data.get("rpc", 0.0))

    def _eval(self, stage: str, row: dict, fallback) -> float:
        if stage not in self.c:
            if self.fallback is None:
                raise KeyError(f"the profile has no {stage} measurements")
            return fallback()
        scale = 1.0 if stage == "transfer" else self.slowdown  # compute as the engine's workers see it
        return max(float(np.dot(self.c[stage], FEATURES[stage](row))), 0.0) * scale

    def encode(self, s: EncodeShape) -> float:
        return self._eval("encode", {"tiles": s.tiles}, lambda: self.fallback.encode(s))

    def prefill(self, s: PrefillShape) -> float:
        row = {"tokens": s.tokens, "square": s.square, "seqs": len(s.lens)}
        return self._eval("prefill", row, lambda: self.fallback.prefill(s))

    def decode(self, s: DecodeShape) -> float:
        return self._eval("decode", {"batch": s.batch, "context": s.context}, lambda: self.fallback.decode(s))

    def transfer(self, nbytes: float) -> float:
        return self._eval("transfer", {"bytes": nbytes}, lambda: self.fallback.transfer(nbytes))
