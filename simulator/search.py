"""`+experiment=optimize`: enumerate deployments for a GPU budget, find each one's goodput by
bisection on the arrival rate in the simulator, and rank them."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import random
import time
from pathlib import Path

from epd.config import DeploymentConfig, PoolConfig, RunConfig
from epd.metrics import slo_attainment, timelines
from epd.models.runtime import load_family
from epd.progress import progress
from epd.workload import requests_for
from simulator.backend import SimBackend


def _template(cfg: RunConfig, *names: str) -> PoolConfig:
    pools = cfg.deployment.pools()
    for n in names:
        if n in pools:
            return dataclasses.replace(pools[n], instances=1)
    return PoolConfig()


def candidates(cfg: RunConfig) -> list[DeploymentConfig]:
    """Every E/P/D split of the GPU budget (each stage >= 1), with IRP on/off; PD splits and aggregated as baselines."""
    n = cfg.search.gpus
    enc, pre, dec = (
        _template(cfg, "encode", "encode_prefill", "aggregated"),
        _template(cfg, "prefill", "encode_prefill", "aggregated"),
        _template(cfg, "decode", "aggregated"),
    )
    out = []
    for e in range(1, n - 1):
        for p in range(1, n - e):
            d = n - e - p
            for irp in [False, True] if cfg.search.include_irp and e > 1 else [False]:
                out.append(
                    DeploymentConfig(
                        name="epd",
                        encode=dataclasses.replace(enc, instances=e),
                        prefill=dataclasses.replace(pre, instances=p),
                        decode=dataclasses.replace(dec, instances=d),
                        irp=irp,
                        routing=cfg.deployment.routing,
                        transfer=cfg.deployment.transfer,
                    )
                )
    if cfg.search.include_baselines:
        ep = _template(cfg, "encode_prefill", "prefill", "aggregated")
        for p in range(1, n):
            out.append(
                DeploymentConfig(
                    name="pd",
                    encode_prefill=dataclasses.replace(ep, instances=p),
                    decode=dataclasses.replace(dec, instances=n - p),
                    routing=cfg.deployment.routing,
                )
            )
        agg = _template(cfg, "aggregated", "prefill")
        out.append(DeploymentConfig(name="aggregated", aggregated=dataclasses.replace(agg, instances=n), routing=cfg.deployment.routing))
    return out


def attainment_at(cfg: RunConfig, rate: float) -> tuple[float, int]:
    cfg = dataclasses.replace(cfg, workload=dataclasses.replace(cfg.workload, rate=rate, num_requests=cfg.search.num_requests))
    result = SimBackend(cfg, sample_interval=0).run(requests_for(cfg.workload, load_family(cfg.model)))
    tls = timelines(result.events)
    return slo_attainment(tls, cfg.slo.ttft, cfg.slo.tpot), len(tls)


def goodput_of(cfg: RunConfig, deployment: DeploymentConfig) -> dict:
    """Bisection for the highest rate whose attainment reaches the target (attainment falls with rate)."""
    cfg = dataclasses.replace(cfg, deployment=deployment)
    target, s = cfg.slo.attainment_target, cfg.search
    t0, simulated = time.time(), 0
    att_low, n = attainment_at(cfg, s.rate_low)
    simulated += n
    if att_low < target:
        best, att_best = 0.0, att_low
    else:
        lo, hi, att_best = s.rate_low, s.rate_high, att_low
        att_hi, n = attainment_at(cfg, hi)
        simulated += n
        if att_hi >= target:
            lo, att_best = hi, att_hi
        else:
            for _ in range(s.iterations):
                mid = (lo * hi) ** 0.5  # geometric: rates span orders of magnitude
                att, n = attainment_at(cfg, mid)
                simulated += n
                if att >= target:
                    lo, att_best = mid, att
                else:
                    hi = mid
        best = lo
    return {
        "deployment": deployment.describe() + (" +IRP" if deployment.irp else ""),
        "goodput": best,
        "attainment_at_goodput": att_best,
        "simulated_requests": simulated,
        "seconds": time.time() - t0,
    }


def _job(args):
    return goodput_of(*args)


def run_jobs(fn, jobs: list, processes: int) -> list:
    """`fn(job)` for every job, in order: over `processes` spawned processes (fn must be importable), or here."""
    rows = []
    with progress(len(jobs), "deployments", "dep") as bar:
        if processes > 1:
            with mp.get_context("spawn").Pool(processes) as pool:
                for row in pool.imap(fn, jobs, chunksize=1):
                    rows.append(row)
                    bar.update(1)
        else:
            for job in jobs:
                rows.append(fn(job))
                bar.update(1)
    return rows


def search(cfg: RunConfig) -> tuple[list[dict], float, int]:
    t0 = time.time()
    rows = run_jobs(_job, [(cfg, d) for d in candidates(cfg)], cfg.search.processes)
    rows.sort(key=lambda r: -r["goodput"])
    return rows, time.time() - t0, sum(r["simulated_requests"] for r in rows)


def run_search(cfg: RunConfig, out_dir: Path, resolved: dict) -> float:
    rows, seconds, simulated = search(cfg)
    header = (
        f"goodput search: {cfg.model.name}, {cfg.search.gpus} GPUs ({cfg.hardware.name}), workload {cfg.workload.name}, "
        f"SLO TTFT {cfg.slo.ttft}s TPOT {cfg.slo.tpot}s at {cfg.slo.attainment_target:.0%}"
    )
    lines = [header, f"{'rank':>4}  {'deployment':<16} {'goodput (req/s)':>15} {'attainment':>10}"]
    for i, r in enumerate(rows, 1):
        lines.append(f"{i:>4}  {r['deployment']:<16} {r['goodput']:>15.3f} {r['attainment_at_goodput']:>10.2f}")
    # The simulator's choice against three random candidates (the comparison the EPD paper makes).
    randoms = random.Random(cfg.seed).sample(rows[1:], min(3, len(rows) - 1))
    lines.append(
        f"chosen: {rows[0]['deployment']} {rows[0]['goodput']:.3f} req/s; random: "
        + ", ".join(f"{r['deployment']} {r['goodput']:.3f}" for r in randoms)
    )
    lines.append(
        f"{len(rows)} candidates in {seconds:.1f} s with {cfg.search.processes} processes; "
        f"{simulated} simulated requests ({simulated / max(seconds, 1e-9):.0f} per second)"
    )
    print("\n".join(lines))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "search.json").write_text(
        json.dumps({"rows": rows, "chosen": rows[0], "random": randoms, "seconds": seconds, "simulated_requests": simulated}, indent=2)
    )
    (out_dir / "search.txt").write_text("\n".join(lines) + "\n")
    if cfg.logger.kind == "wandb":
        import wandb

        run = wandb.init(
            project=cfg.logger.project,
            dir=str(out_dir),
            mode=cfg.logger.mode,
            group=cfg.experiment,
            config=resolved,
            tags=["optimize"],
            settings=wandb.Settings(silent=True, console="off"),
        )
        try:
            run.log({"search": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])})
            run.summary["best"] = rows[0]["deployment"]
            run.summary["best_goodput"] = rows[0]["goodput"]
        finally:
            run.finish()
    return rows[0]["goodput"]
