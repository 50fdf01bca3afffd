"""`task=compare`: several deployments over a rate sweep, on the engine and in the simulator.

Each deployment's workers start once and serve every rate in turn (after a short offline
warm-up). Every point is a full run record under runs/; the comparison is written as
compare.json, compare.md (table + goodput) and compare.png (SLO attainment vs rate).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
from pathlib import Path

from epd.backends import EngineBackend
from epd.composition import compare_deployments
from epd.config import AllocationConfig, BackendConfig, DeploymentConfig, RunConfig
from epd.engine.executor import ensure_ray
from epd.experiment import format_summary, run_experiment
from epd.metrics import goodput

log = logging.getLogger(__name__)
COLUMNS = (
    "slo_attainment",
    "ttft_p50",
    "ttft_p90",
    "tpot_p50",
    "tpot_p90",
    "request_throughput",
    "num_finished",
    "num_requests",
    "mm_transfer_GBps_p50",
    "kv_transfer_GBps_p50",
    "duration",
    "ttft_mean",
    "tpot_mean",
    "role_switches",
    "role_switch_mean_s",
)


def _allocations(cfg: RunConfig) -> dict[str, AllocationConfig]:
    if not cfg.compare.allocations:
        return {cfg.allocation.policy: cfg.allocation}
    out = {}
    for name, raw in cfg.compare.allocations.items():
        try:
            out[name] = dataclasses.replace(cfg.allocation, **dict(raw))
        except TypeError as exc:
            raise ValueError(f"compare.allocations.{name}: {exc}") from exc
    return out


def _point_cfg(cfg: RunConfig, dep: DeploymentConfig, rate: float, backend: BackendConfig, alloc: AllocationConfig) -> RunConfig:
    return dataclasses.replace(
        cfg,
        allocation=alloc,
        deployment=dep,
        workload=dataclasses.replace(cfg.workload, rate=rate),
        backend=backend,
        task="serve",
    )


def _resolved(resolved: dict, name: str, rate: float, backend: str) -> dict:
    r = copy.deepcopy(resolved)
    r["deployment"] = r.get("compare", {}).get("deployments", {}).get(name, r.get("deployment"))
    r.setdefault("workload", {})["rate"] = rate
    r.setdefault("backend", {})["kind"] = backend
    r["task"] = "serve"
    return r


def run_compare(cfg: RunConfig, out_dir: Path, resolved: dict) -> dict:
    cc = cfg.compare
    if not cc.deployments:
        raise ValueError("task=compare needs compare.deployments (name -> deployment)")
    deployments = compare_deployments(cc)
    rows: list[dict] = []
    sim_backend = dataclasses.replace(cfg.backend, kind="sim", latency_model=cc.sim_latency_model, profile_path=cc.sim_profile_path)
    if cc.real and cfg.backend.kind == "ray":
        ensure_ray(cfg.backend, list(deployments.values()))  # one cluster for every deployment (run.py shuts it down)
    allocations = _allocations(cfg)
    points = [(dname, dep, aname, alloc) for dname, dep in deployments.items() for aname, alloc in allocations.items()]
    for dname, dep, aname, alloc in points:
        name = dname if len(allocations) == 1 else f"{dname}+{aname}"
        if cc.real:
            base = _point_cfg(cfg, dep, cc.rates[0], cfg.backend, alloc)
            engine = EngineBackend(base)
            # Workers stay up across rates, unless they may switch roles (each rate then starts from the deployment).
            session = engine.session() if alloc.policy == "static" else contextlib.nullcontext(engine)
            with session:
                if cc.warmup_requests and alloc.policy == "static":
                    from epd.experiment import make_requests

                    warm = make_requests(
                        dataclasses.replace(base, workload=dataclasses.replace(base.workload, arrival="offline", phases=[]))
                    )
                    engine.run([dataclasses.replace(r, request_id=f"warmup-{r.request_id}") for r in warm[: cc.warmup_requests]])
                for rate in cc.rates:
                    point = _point_cfg(cfg, dep, rate, cfg.backend, alloc)
                    s = run_experiment(
                        point, out_dir / "runs" / f"{name}-rate{rate:g}", _resolved(resolved, dname, rate, cfg.backend.kind), engine
                    )
                    print(format_summary(s), flush=True)
                    rows.append(
                        {"deployment": name, "layout": dep.describe(), "rate": rate, "source": "engine", **{k: s.get(k) for k in COLUMNS}}
                    )
        if cc.simulate:
            for rate in cc.rates:
                point = _point_cfg(cfg, dep, rate, sim_backend, alloc)
                s = run_experiment(point, out_dir / "runs" / f"{name}-rate{rate:g}-sim", _resolved(resolved, dname, rate, "sim"))
                rows.append(
                    {"deployment": name, "layout": dep.describe(), "rate": rate, "source": "simulator", **{k: s.get(k) for k in COLUMNS}}
                )
    result = {
        "experiment": cfg.experiment,
        "devices": _devices(),
        "model": cfg.model.name,
        "workload": cfg.workload.name,
        "slo": {"ttft": cfg.slo.ttft, "tpot": cfg.slo.tpot},
        "attainment_target": cfg.slo.attainment_target,
        "arrival": cfg.workload.arrival,
        "rows": rows,
        "goodput": {
            f"{name}/{source}": goodput(
                [(r["rate"], r["slo_attainment"]) for r in rows if r["deployment"] == name and r["source"] == source],
                cfg.slo.attainment_target,
            )
            for name in {r["deployment"] for r in rows}
            for source in ("engine", "simulator")
            if any(r["deployment"] == name and r["source"] == source for r in rows)
        },
    }
    (out_dir / "compare.json").write_text(json.dumps(result, indent=1))
    (out_dir / "compare.md").write_text(compare_markdown(result))
    plot_compare(result, out_dir / "compare.png")
    print(compare_markdown(result))
    return result


def _devices() -> list[str]:
    try:
        import torch

        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or ["cpu"]
    except Exception:
        return ["unknown"]


def compare_markdown(result: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{v * 1000:.0f}"

    def gbps(v):
        return "-" if v is None else f"{v:.0f}"

    def rate(r):  # an offline run has every request at t=0: no rate
        return "offline" if result.get("arrival") == "offline" else f"{r['rate']:g}"

    lines = [
        f"Devices: {', '.join(sorted(set(result.get('devices', []))))} x {len(result.get('devices', []))}",
        "",
        f"SLO: TTFT {result['slo']['ttft']} s, TPOT {result['slo']['tpot']} s; goodput = highest rate with "
        f"attainment >= {result['attainment_target']:.0%}",
        "",
        "| deployment | source | rate (req/s) | SLO attainment | TTFT p50 (ms) | TTFT p90 (ms) | TPOT p50 (ms) | TPOT p90 (ms) | finished "
        "| completion (s) | role switches | MM GB/s | KV GB/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['deployment']} ({r['layout']}) | {r['source']} | {rate(r)} | {r['slo_attainment']:.0%} | {ms(r['ttft_p50'])} | "
            f"{ms(r['ttft_p90'])} | {ms(r['tpot_p50'])} | {ms(r['tpot_p90'])} | {r['num_finished']}/{r['num_requests']} "
            f"| {r.get('duration') or 0:.2f} | {r.get('role_switches') or 0} "
            f"| {gbps(r.get('mm_transfer_GBps_p50'))} | {gbps(r.get('kv_transfer_GBps_p50'))} |"
        )
    lines += ["", "Transfer bandwidth: median over transfers of >= 16 MiB.", "", "| deployment | goodput (req/s) |", "|---|---|"]
    for key, g in result["goodput"].items():
        lines.append(f"| {key} | {'below the lowest rate' if g is None else f'{g:.2f}'} |")
    return "\n".join(lines) + "\n"


def plot_compare(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    names = sorted({r["deployment"] for r in result["rows"]})
    for i, name in enumerate(names):
        for source, style in (("engine", "-o"), ("simulator", "--x")):
            pts = sorted((r["rate"], r["slo_attainment"]) for r in result["rows"] if r["deployment"] == name and r["source"] == source)
            if pts:
                ax.plot(*zip(*pts), style, color=f"C{i}", label=f"{name} ({source})")
    ax.axhline(result["attainment_target"], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{result['model']}, {result['workload']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
