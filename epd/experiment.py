"""One experiment run: workload -> backend -> events -> summary, record and W&B."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from epd.backends import make_backend
from epd.config import RunConfig
from epd.metrics import summarize
from epd.models.runtime import load_family
from epd.tracking import make_logger, write_record
from epd.workload import requests_for

log = logging.getLogger(__name__)


def make_requests(cfg: RunConfig):
    workload = cfg.workload
    if cfg.backend.kind == "sim" and workload.image_format != "procedural":
        # The simulator reads an image's size, never its pixels, and charges the decode an encoded image
        # costs: the same requests without making the files.
        workload = dataclasses.replace(workload, image_format="procedural")
    return requests_for(workload, load_family(cfg.model))


def run_experiment(cfg: RunConfig, out_dir: Path, resolved: dict, backend=None) -> dict:
    """Run cfg's workload on `backend` (default: a fresh one from cfg.backend), record and log it."""
    requests = make_requests(cfg)
    print(format_header(cfg, len(requests)), flush=True)
    desc = cfg.deployment.describe()
    arrivals = "offline" if cfg.workload.arrival == "offline" else f"{cfg.workload.rate:g} req/s"
    name = f"{cfg.deployment.name} {desc} @ {arrivals} ({cfg.backend.kind})"  # W&B: named by deployment and rate
    tags = [cfg.experiment, cfg.deployment.name, desc, cfg.backend.kind, cfg.allocation.policy, cfg.model.name, cfg.workload.name]
    logger = make_logger(cfg.logger, out_dir, name, cfg.experiment, [*tags, f"rate={arrivals}"], resolved)
    exit_code = 1
    try:
        result = (backend or make_backend(cfg)).run(requests)
        summary = summarize(result.events, cfg.slo.ttft, cfg.slo.tpot, desc, result.timelines())
        summary.update(
            experiment=cfg.experiment,
            backend=cfg.backend.kind,
            model=cfg.model.name,
            workload=cfg.workload.name,
            rate=None if cfg.workload.arrival == "offline" else cfg.workload.rate,
            arrival=cfg.workload.arrival,
            allocation=cfg.allocation.policy,
            transfer=cfg.deployment.transfer,
            hardware=cfg.hardware.name,
            engine_startup_s=result.startup_s,  # time to ready
            engine_warmup_s=result.warmup_s,
            **{f"engine_start_{k}_s": v for k, v in result.start_phases.items()},
            **result.batch_stats,
            **result.server_split,
        )
        write_record(out_dir, resolved, result, summary)
        logger.log_run(summary, result)
        exit_code = 0
        return summary
    finally:
        logger.finish(exit_code)


def describe_arrivals(w) -> str:
    """'poisson 2 req/s', or 'offline (all at once)': a rate is named only where it applies."""
    if w.arrival == "offline":
        return "offline (all at once)"
    if w.arrival == "trace":
        return f"trace {w.trace_path}"
    return f"{w.arrival} {w.rate:g} req/s"


def format_header(cfg: RunConfig, num_requests: int) -> str:
    """Every choice that changes the result, before the run starts."""
    backend = {"ray": "real engine on Ray", "local": "real engine in one process", "sim": "simulated", "online": "over HTTP"}
    return (
        f"EPD run: model={cfg.model.name} | deployment={cfg.deployment.name} {cfg.deployment.describe()} | "
        f"allocation={cfg.allocation.policy} | transfer={cfg.deployment.transfer} | hardware={cfg.hardware.name} | "
        f"backend={cfg.backend.kind} ({backend.get(cfg.backend.kind, cfg.backend.kind)})\n"
        f"  workload   {cfg.workload.name}: {num_requests} requests, {describe_arrivals(cfg.workload)}"
    )


def format_summary(s: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{v * 1000:.1f} ms"

    clock = "simulated s" if s["backend"] == "sim" else "s"
    lines = [
        f"EPD run: {s['model']} | {s['deployment']} | backend={s['backend']} | workload={s['workload']}",
        f"  requests   {s['num_finished']}/{s['num_requests']} finished, {s['num_aborted']} aborted, {s['duration']:.2f} {clock}",
        f"  TTFT       mean {ms(s['ttft_mean'])}  p50 {ms(s['ttft_p50'])}  p90 {ms(s['ttft_p90'])}  p99 {ms(s['ttft_p99'])}",
        f"  TPOT       mean {ms(s['tpot_mean'])}  p50 {ms(s['tpot_p50'])}  p90 {ms(s['tpot_p90'])}  p99 {ms(s['tpot_p99'])}",
        f"  E2E        p50 {ms(s['e2e_p50'])}  p90 {ms(s['e2e_p90'])}",
        f"  SLO        {s['slo_attainment'] * 100:.1f}% within TTFT {s['slo_ttft']} s and TPOT {s['slo_tpot']} s",
        f"  throughput {s['request_throughput']:.2f} req/s, {s['output_throughput']:.1f} output tok/s",
    ]
    if s.get("kernels_compiled_in_run"):  # a cost of the engine's start, not of serving: the run's latencies carry it
        lines.append(f"  warning    {s['kernels_compiled_in_run']} kernels compiled inside the run's batches (batches.jsonl: compiled)")
    return "\n".join(lines)
