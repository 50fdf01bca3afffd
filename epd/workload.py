"""Workloads: seeded arrival processes and request generators (synthetic, JSONL dataset)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from epd.config import WorkloadConfig
from epd.request import ImageInput, Request, SamplingParams, VideoInput
from epd.stages.model_view import ModelView


def arrival_times(cfg: WorkloadConfig, n: int, rng: np.random.Generator) -> list[float]:
    if cfg.arrival == "offline":
        return [0.0] * n
    if cfg.arrival == "trace":
        return _trace(cfg, n)
    if cfg.rate <= 0:
        raise ValueError(f"workload.rate must be > 0 for {cfg.arrival} arrivals, got {cfg.rate}")
    if cfg.arrival == "poisson":
        gaps = rng.exponential(1.0 / cfg.rate, n)
    elif cfg.arrival == "gamma":
        if cfg.cv <= 0:
            raise ValueError(f"workload.cv must be > 0, got {cfg.cv}")
        shape = 1.0 / cfg.cv**2
        gaps = rng.gamma(shape, 1.0 / (cfg.rate * shape), n)
    elif cfg.arrival == "constant":
        gaps = np.full(n, 1.0 / cfg.rate)
    else:
        raise ValueError(f"unknown workload.arrival {cfg.arrival!r} (poisson, gamma, constant, trace, offline)")
    times = np.cumsum(gaps) - gaps[0]  # the first request arrives at 0
    return [float(t) for t in times]


def _trace(cfg: WorkloadConfig, n: int) -> list[float]:
    if not cfg.trace_path:
        raise ValueError("workload.arrival=trace needs workload.trace_path (one arrival time in seconds per line)")
    lines = [ln for ln in Path(cfg.trace_path).read_text().splitlines() if ln.strip()]
    times = sorted(float(json.loads(ln)["arrival_time"]) if ln.lstrip().startswith("{") else float(ln) for ln in lines)
    if len(times) < n:
        raise ValueError(f"trace {cfg.trace_path} has {len(times)} arrivals, the workload asks for {n}")
    return [t - times[0] for t in times[:n]]


def _draw(rng: np.random.Generator, low: int, high: int | None) -> int:
    return int(low if high is None or high <= low else rng.integers(low, high + 1))


def _sampling(cfg: WorkloadConfig, max_tokens: int, seed: int, answer: Optional[int] = None) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        seed=seed,
        ignore_eos=cfg.ignore_eos,
        answer_tokens=answer,
    )


def output_length(cfg: WorkloadConfig, rng: np.random.Generator) -> tuple[int, int]:
    """(max_tokens, answer length or 0) of one request."""
    if cfg.output_dist == "uniform":
        n = _draw(rng, cfg.output_tokens, cfg.output_tokens_max)
        cap = max(n, cfg.output_tokens_max or n)
    elif cfg.output_dist == "lognormal":
        if cfg.output_sigma <= 0 or cfg.output_tokens < 1:
            raise ValueError(f"lognormal lengths need output_tokens >= 1 and output_sigma > 0, got {cfg.output_tokens}, {cfg.output_sigma}")
        cap = cfg.output_tokens_max or 8 * cfg.output_tokens
        mu = np.log(cfg.output_tokens) - cfg.output_sigma**2 / 2  # the mean is output_tokens (before the cap)
        n = int(min(cap, max(1, round(float(rng.lognormal(mu, cfg.output_sigma))))))
    else:
        raise ValueError(f"workload.output_dist must be uniform or lognormal, got {cfg.output_dist!r}")
    return (cap, n) if cfg.answer_lengths else (n, 0)


def _check_mix(cfg: WorkloadConfig) -> None:
    for name in ("long_prompt_share", "repeat_image_share"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"workload.{name} must be in [0, 1], got {getattr(cfg, name)}")
    if cfg.answer_lengths and cfg.ignore_eos:
        raise ValueError("workload.answer_lengths ends requests with EOS: it needs ignore_eos: false")
    if cfg.image_pool < 1 or cfg.system_prompts < 1:
        raise ValueError(f"workload.image_pool and workload.system_prompts must be >= 1, got {cfg.image_pool}, {cfg.system_prompts}")


def image_cache_dir(cfg: WorkloadConfig) -> str:
    return cfg.image_cache_dir or os.environ.get("EPD_IMAGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "epd", "images")


def _encode_images(cfg: WorkloadConfig, reqs: list[Request]) -> list[Request]:
    """Requests with their procedural images replaced by encoded files (made once, in parallel: PIL
    encodes without the GIL), before any clock starts."""
    from concurrent.futures import ThreadPoolExecutor

    from epd.images import encoded_image

    folder = image_cache_dir(cfg)
    todo = sorted({(im.width, im.height, im.seed) for r in reqs for im in r.images})
    with ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1))) as pool:
        paths = dict(zip(todo, pool.map(lambda k: encoded_image(*k, folder), todo)))
    return [dataclasses.replace(r, images=tuple(ImageInput(path=paths[im.width, im.height, im.seed]) for im in r.images)) for r in reqs]


def synthetic(cfg: WorkloadConfig, vocab_size: int, reserved_ids: set[int], image_token: Optional[int] = None) -> list[Request]:
    """`image_token`: the model's placeholder id; with a system prompt the images are marked after it
    (None: the images come first, before the system prompt)."""
    _check_mix(cfg)
    if cfg.image_format not in ("procedural", "jpeg"):
        raise ValueError(f"workload.image_format must be procedural or jpeg, got {cfg.image_format!r}")
    rng = np.random.default_rng(cfg.seed)
    mix = np.random.default_rng([cfg.seed, 1])  # the mix's draws apart: a workload without one keeps its requests
    times = arrival_times(cfg, cfg.num_requests, rng)
    text_ids = np.array([i for i in range(4, vocab_size) if i not in reserved_ids])
    systems = [tuple(int(x) for x in mix.choice(text_ids, cfg.system_prompt_tokens)) for _ in range(cfg.system_prompts)]
    reqs = []
    for i, t in enumerate(times):
        n_img = _draw(rng, cfg.images_per_request, cfg.images_per_request_max)
        n_prompt = _draw(rng, cfg.prompt_tokens, cfg.prompt_tokens_max)
        max_tokens, answer = output_length(cfg, rng)
        if cfg.long_prompt_share and mix.random() < cfg.long_prompt_share:
            n_prompt = cfg.long_prompt_tokens
        images = []
        for k in range(n_img):
            seed = cfg.seed * 100_003 + i * 97 + k
            if cfg.repeat_image_share and mix.random() < cfg.repeat_image_share:
                seed = (1 << 40) + int(mix.integers(cfg.image_pool))  # one of the popular pictures
            images.append(ImageInput(width=cfg.image_width, height=cfg.image_height, seed=seed))
        videos = tuple(
            VideoInput(
                tuple(
                    ImageInput(width=cfg.image_width, height=cfg.image_height, seed=(2 << 40) + i * 997 + v * 101 + f)
                    for f in range(cfg.video_frames)
                ),
                cfg.video_fps,
            )
            for v in range(cfg.videos_per_request)
        )
        system = systems[int(mix.integers(cfg.system_prompts))] if cfg.system_prompt_tokens else ()
        if (
            system and images and image_token is not None
        ):  # as chat templates lay it out: the system prompt, then the images, then the user's text
            system = system + (image_token,) * len(images)
        reqs.append(
            Request(
                request_id=f"req-{i:05d}",
                arrival_time=t,
                prompt_token_ids=system + tuple(int(x) for x in rng.choice(text_ids, n_prompt)),
                images=tuple(images),
                sampling=_sampling(cfg, max_tokens, cfg.seed * 100_003 + i, answer or None),
                videos=videos,
            )
        )
    return _encode_images(cfg, reqs) if cfg.image_format == "jpeg" else reqs


def dataset(cfg: WorkloadConfig) -> list[Request]:
    """JSONL rows: {"prompt": str, "images": [path, ...], "max_tokens": int}; paths relative to the file."""
    if not cfg.dataset_path:
        raise ValueError("workload.kind=dataset needs workload.dataset_path")
    path = Path(cfg.dataset_path)
    if not path.exists():
        raise FileNotFoundError(f"workload dataset not found: {path}")
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    rng = np.random.default_rng(cfg.seed)
    times = arrival_times(cfg, cfg.num_requests, rng)
    reqs = []
    for i, t in enumerate(times):
        row = rows[i % len(rows)]
        images = tuple(ImageInput(path=str((path.parent / p).resolve())) for p in row.get("images", []))
        reqs.append(
            Request(
                request_id=f"req-{i:05d}",
                arrival_time=t,
                prompt=row["prompt"],
                images=images,
                sampling=_sampling(cfg, int(row.get("max_tokens", cfg.output_tokens)), cfg.seed * 100_003 + i),
            )
        )
    return reqs


def phased(cfg: WorkloadConfig, vocab_size: int, reserved_ids: set[int], image_token: Optional[int] = None) -> list[Request]:
    """Phases in sequence: each is this workload with some fields overridden, after the previous one."""
    known = {f.name for f in dataclasses.fields(WorkloadConfig)} - {"phases"}
    out: list[Request] = []
    start = 0.0
    for k, phase in enumerate(cfg.phases):
        bad = set(phase) - known
        if bad:
            raise ValueError(f"workload.phases[{k}]: unknown fields {sorted(bad)}")
        sub = dataclasses.replace(cfg, **{"seed": cfg.seed * 1000 + k, **phase, "phases": []})
        reqs = build_workload(sub, vocab_size, reserved_ids, image_token)
        for r in reqs:
            out.append(dataclasses.replace(r, request_id=f"p{k}-{r.request_id}", arrival_time=start + r.arrival_time))
        if reqs:
            start += max(r.arrival_time for r in reqs) + (1.0 / sub.rate if sub.arrival != "offline" and sub.rate > 0 else 0.0)
    return out


def build_workload(cfg: WorkloadConfig, vocab_size: int, reserved_ids: set[int], image_token: Optional[int] = None) -> list[Request]:
    if cfg.phases:
        return phased(cfg, vocab_size, reserved_ids, image_token)
    if cfg.num_requests < 1:
        raise ValueError(f"workload.num_requests must be >= 1, got {cfg.num_requests}")
    if cfg.kind == "synthetic":
        return synthetic(cfg, vocab_size, reserved_ids, image_token)
    if cfg.kind == "dataset":
        return dataset(cfg)
    raise ValueError(f"unknown workload.kind {cfg.kind!r} (synthetic, dataset)")


def requests_for(cfg: WorkloadConfig, model: ModelView) -> list[Request]:
    """The workload for `model`: text tokens avoid its image placeholder, BOS and EOS ids (the placeholder
    appears only as the marker of where an image goes, behind a system prompt)."""
    text = model.text_config()
    reserved = {model.image_token_id, text.bos_token_id, text.eos_token_id}
    return build_workload(cfg, text.vocab_size, reserved, model.image_token_id)
