"""`task=regime`: where EPD beats PD and aggregated serving, by the simulator.

For every encoder cost scale x images per request x GPU memory, the goodput (bisection on the rate, as
`task=optimize` finds it) of every E/P/D split, every PD split and aggregated instances on the same GPUs,
each pool's KV blocks made from the memory its weights leave: a table, a JSON record and a map per
memory size of which family wins and by how much. The encoder/LM cost ratio on the map's axis is an
image's tower FLOPs over the LM's prefill FLOPs for its tokens (`ModelShape.encoder_to_lm_ratio`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

from epd.config import POOL_ROLES, DeploymentConfig, PoolConfig, Role, RunConfig
from epd.models.runtime import load_family
from simulator.search import candidates, goodput_of, run_jobs
from simulator.shapes import ModelShape

FAMILIES = ("epd", "pd", "aggregated")
TIE = 0.06  # goodputs this close are a tie: `regime_map` brackets each within 5% (7 geometric steps over 0.1-64 req/s)


def pool_in_memory(name: str, pool: PoolConfig, shape: ModelShape, memory_bytes: float, reserve: float) -> Optional[PoolConfig]:
    """`pool` with the KV blocks that fit beside its weights, MM blocks and (a hybrid LM) state pool on its GPUs
    (None: they do not fit, or there is no room for a single KV block where the pool prefills or decodes)."""
    roles = POOL_ROLES[name]
    weights = shape.dtype_bytes * (
        (shape.vision_params if Role.ENCODE in roles else 0) + (shape.lm_params if {Role.PREFILL, Role.DECODE} & set(roles) else 0)
    )
    mm = pool.mm_blocks * pool.mm_block_tokens * shape.mm_bytes_per_token
    free = pool.tp * memory_bytes * (1 - reserve) - weights - mm
    if free < 0:
        return None
    if not {Role.PREFILL, Role.DECODE} & set(roles):
        return pool
    free -= (pool.state_slot_count + 1) * shape.state_bytes_per_seq  # a hybrid LM's state pool (+ the graphs' scratch slot)
    blocks = int(free // (pool.kv_block_size * shape.kv_bytes_per_token))
    return dataclasses.replace(pool, kv_blocks=blocks) if blocks > 0 else None


def deployment_in_memory(dep: DeploymentConfig, shape: ModelShape, memory_bytes: float, reserve: float) -> Optional[DeploymentConfig]:
    pools = {}
    for name, pool in dep.pools().items():
        fitted = pool_in_memory(name, pool, shape, memory_bytes, reserve)
        if fitted is None:
            return None
        pools[name] = fitted
    return dataclasses.replace(dep, **pools)


def point_config(cfg: RunConfig, scale: float, images: int, memory_gb: float) -> RunConfig:
    return dataclasses.replace(
        cfg,
        backend=dataclasses.replace(cfg.backend, kind="sim", sim_encoder_scale=scale),
        workload=dataclasses.replace(cfg.workload, images_per_request=images, images_per_request_max=images),
        hardware=dataclasses.replace(cfg.hardware, memory_bytes=memory_gb * 1e9),
        search=dataclasses.replace(cfg.search, gpus=cfg.regime.gpus),
    )


def _goodput(args) -> dict:
    cfg, dep, fitted = args
    if fitted is None:
        return {"deployment": dep.describe() + (" +IRP" if dep.irp else ""), "goodput": 0.0, "fits": False}
    return {**goodput_of(cfg, fitted), "fits": True}


def regime_points(cfg: RunConfig) -> list[dict]:
    r = cfg.regime
    family = load_family(cfg.model)
    base = ModelShape.of(family, cfg.model.dtype)
    tokens = family.num_image_tokens(cfg.workload.image_width, cfg.workload.image_height)
    jobs, keys = [], []
    for memory_gb in r.memory_gb:
        for scale in r.encoder_scales:
            shape = base.with_encoder_scale(scale)
            for images in r.images_per_request:
                point = point_config(cfg, scale, images, memory_gb)
                for dep in candidates(point):
                    jobs.append((point, dep, deployment_in_memory(dep, shape, memory_gb * 1e9, r.reserve_fraction)))
                    keys.append((memory_gb, scale, images, shape.encoder_to_lm_ratio(tokens), dep.name))
    results = run_jobs(_goodput, jobs, cfg.search.processes)
    points: dict[tuple, dict] = {}
    for (memory_gb, scale, images, ratio, kind), row in zip(keys, results):
        p = points.setdefault(
            (memory_gb, scale, images),
            {"memory_gb": memory_gb, "encoder_scale": scale, "encoder_to_lm_ratio": ratio, "images_per_request": images, "candidates": []},
        )
        p["candidates"].append({"family": kind, **row})
    out = []
    for p in points.values():
        for kind in FAMILIES:
            mine = [c for c in p["candidates"] if c["family"] == kind and c["fits"]]
            best = max(mine, key=lambda c: c["goodput"], default=None)
            p[kind] = {"deployment": best["deployment"], "goodput": best["goodput"]} if best else None
        scores = {k: p[k]["goodput"] for k in FAMILIES if p[k] is not None}
        top = max(scores.values(), default=0.0)
        p["winner"] = "=".join(k for k in FAMILIES if top > 0 and scores.get(k, -1.0) >= top * (1 - TIE)) or None
        baseline = max((scores.get(k, 0.0) for k in ("pd", "aggregated")), default=0.0)
        p["epd_over_best_baseline"] = scores["epd"] / baseline if "epd" in scores and baseline > 0 else None
        out.append(p)
    return out


def table(points: list[dict], rate_high: float) -> str:
    """One row per point; a goodput at the search's highest rate is a floor (shown >=)."""
    lines = [
        "| GPU memory | encoder/LM cost | images | best EPD (req/s) | best PD | aggregated | winner | EPD / best baseline |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(p, kind):
        c = p[kind]
        if c is None:
            return "does not fit"
        return f"{c['deployment']} {'>=' if c['goodput'] >= rate_high else ''}{c['goodput']:.2f}"

    for p in points:
        ratio = p["epd_over_best_baseline"]
        lines.append(
            f"| {p['memory_gb']:g} GB | {p['encoder_to_lm_ratio']:.3f} (x{p['encoder_scale']:g}) | {p['images_per_request']} | "
            f"{cell(p, 'epd')} | {cell(p, 'pd')} | {cell(p, 'aggregated')} | {p['winner'] or '-'} | "
            f"{'-' if ratio is None else f'{ratio:.2f}'} |"
        )
    return "\n".join(lines)


def plot(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    memories = sorted({p["memory_gb"] for p in points})
    scales = sorted({p["encoder_scale"] for p in points})
    images = sorted({p["images_per_request"] for p in points})
    fig, axes = plt.subplots(1, len(memories), figsize=(4.2 * len(memories), 3.8), squeeze=False)
    for i, (ax, mem) in enumerate(zip(axes[0], memories)):
        grid = np.full((len(scales), len(images)), np.nan)
        for p in points:
            if p["memory_gb"] != mem:
                continue
            at = scales.index(p["encoder_scale"]), images.index(p["images_per_request"])
            if p["epd_over_best_baseline"]:
                grid[at] = np.log2(p["epd_over_best_baseline"])
            elif p["winner"] == "epd":  # the baselines meet the SLO at no rate
                grid[at] = 2.0
        im = ax.imshow(grid, origin="lower", cmap="RdBu", vmin=-2, vmax=2, aspect="auto")
        for p in (q for q in points if q["memory_gb"] == mem):
            y, x = scales.index(p["encoder_scale"]), images.index(p["images_per_request"])
            label = (p["winner"] or "-").replace("aggregated", "agg").upper().replace("AGG", "agg")
            ratio = p["epd_over_best_baseline"]
            text = f"{label}\n{ratio:.2f}" if ratio else (f"{label}\nonly" if p["winner"] == "epd" else label)
            ax.text(x, y, text, ha="center", va="center", fontsize=8)
        ratios = {p["encoder_scale"]: p["encoder_to_lm_ratio"] for p in points}
        ax.set_xticks(range(len(images)), [str(i) for i in images])
        ax.set_yticks(range(len(scales)), [f"{ratios[s]:.2g}" for s in scales])
        ax.set_xlabel("images per request")
        if i == 0:
            ax.set_ylabel("encoder / LM FLOPs per image")
        ax.set_title(f"{mem:g} GB per GPU")
    fig.colorbar(im, ax=axes[0].tolist(), label="log2(EPD goodput / best of PD, aggregated)")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def run_regime(cfg: RunConfig, out_dir: Path, resolved: dict) -> Optional[float]:
    t0 = time.time()
    points = regime_points(cfg)
    seconds = time.time() - t0
    title = (
        f"{cfg.model.name} on {cfg.regime.gpus} x {cfg.hardware.name} (simulated, latency model {cfg.backend.latency_model}), "
        f"workload {cfg.workload.name}, SLO TTFT {cfg.slo.ttft}s TPOT {cfg.slo.tpot}s at {cfg.slo.attainment_target:.0%}"
    )
    text = f"{title}\n\n{table(points, cfg.search.rate_high)}\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "regime.md").write_text(text)
    (out_dir / "regime.json").write_text(json.dumps({"config": resolved, "seconds": seconds, "points": points}, indent=1, default=str))
    plot(points, out_dir / "regime.png", title)
    print(text)
    print(f"  {len(points)} points in {seconds:.0f} s -> {out_dir}/regime.md, regime.json, regime.png")
    wins = [p for p in points if p["winner"] and "epd" in p["winner"].split("=")]
    return len(wins) / len(points) if points else None
