"""`task=compare`: several deployments over a rate sweep, on the engine and in the simulator.

Each deployment's workers start once and serve every rate in turn (after a short offline
warm-up), each rate `compare.repeats` times with workload seeds seed, seed+1, ... Every run is a
full run record under runs/; the comparison is written as compare.json (every run's row, and per
point each metric's mean with its confidence interval over the seeds), compare.md (table +
goodput) and compare.png (SLO attainment vs rate).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
from pathlib import Path

from epd.backends import EngineBackend
from epd.composition import compare_deployments
from epd.config import AllocationConfig, BackendConfig, DeploymentConfig, RunConfig
from epd.engine.executor import ensure_ray
from epd.experiment import format_summary, run_experiment
from epd.metrics import goodput
from epd.stats import mean_ci

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


# The metrics given with an interval over seeds, and the range each lives in.
CI_KEYS = {
    "slo_attainment": (0.0, 1.0),
    "ttft_p50": (0.0, float("inf")),
    "ttft_p90": (0.0, float("inf")),
    "tpot_p50": (0.0, float("inf")),
    "tpot_p90": (0.0, float("inf")),
    "request_throughput": (0.0, float("inf")),
}


def _point_cfg(cfg: RunConfig, dep: DeploymentConfig, rate: float, backend: BackendConfig, alloc: AllocationConfig, seed: int) -> RunConfig:
    return dataclasses.replace(
        cfg,
        allocation=alloc,
        deployment=dep,
        workload=dataclasses.replace(cfg.workload, rate=rate, seed=seed),
        backend=backend,
        task="serve",
    )


def _resolved(resolved: dict, name: str, rate: float, backend: str, seed: int) -> dict:
    r = copy.deepcopy(resolved)
    r["deployment"] = r.get("compare", {}).get("deployments", {}).get(name, r.get("deployment"))
    r.setdefault("workload", {})["rate"] = rate
    r["workload"]["seed"] = seed
    r.setdefault("backend", {})["kind"] = backend
    r["task"] = "serve"
    return r


def _run_dir(out_dir: Path, name: str, rate: float, seed: int, repeated: bool, sim: bool) -> Path:
    return out_dir / "runs" / (f"{name}-rate{rate:g}" + (f"-seed{seed}" if repeated else "") + ("-sim" if sim else ""))


def _row(name: str, layout: str, source: str, rate: float, seed: int, summary: dict) -> dict:
    return {"deployment": name, "layout": layout, "rate": rate, "seed": seed, "source": source, **{k: summary.get(k) for k in COLUMNS}}


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
    seeds = [cfg.workload.seed + i for i in range(cc.repeats)]
    repeated = len(seeds) > 1
    points = [(dname, dep, aname, alloc) for dname, dep in deployments.items() for aname, alloc in allocations.items()]
    for dname, dep, aname, alloc in points:
        name = dname if len(allocations) == 1 else f"{dname}+{aname}"
        row = functools.partial(_row, name, dep.describe())
        if cc.real:
            base = _point_cfg(cfg, dep, cc.rates[0], cfg.backend, alloc, seeds[0])
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
                    for seed in seeds:
                        point = _point_cfg(cfg, dep, rate, cfg.backend, alloc, seed)
                        where = _run_dir(out_dir, name, rate, seed, repeated, sim=False)
                        s = run_experiment(point, where, _resolved(resolved, dname, rate, cfg.backend.kind, seed), engine)
                        print(format_summary(s), flush=True)
                        rows.append(row("engine", rate, seed, s))
        if cc.simulate:
            for rate in cc.rates:
                for seed in seeds:
                    point = _point_cfg(cfg, dep, rate, sim_backend, alloc, seed)
                    where = _run_dir(out_dir, name, rate, seed, repeated, sim=True)
                    rows.append(row("simulator", rate, seed, run_experiment(point, where, _resolved(resolved, dname, rate, "sim", seed))))
    result = summarize(cfg, rows)
    (out_dir / "compare.json").write_text(json.dumps(result, indent=1))
    (out_dir / "compare.md").write_text(compare_markdown(result))
    plot_compare(result, out_dir / "compare.png")
    print(compare_markdown(result))
    return result


def summarize(cfg: RunConfig, rows: list[dict]) -> dict:
    """The comparison from every run's row: per point (deployment, source, rate) each metric's mean and
    interval over seeds; goodput from the mean attainment curve, and per seed with its interval."""
    level = cfg.compare.ci_level
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["deployment"], r["source"], r["rate"]), []).append(r)
    points = []
    for (name, source, rate), runs in groups.items():
        point = {"deployment": name, "layout": runs[0]["layout"], "source": source, "rate": rate, "runs": len(runs)}
        point["num_finished"] = sum(r["num_finished"] or 0 for r in runs)
        point["num_requests"] = sum(r["num_requests"] or 0 for r in runs)
        for key, within in CI_KEYS.items():
            ci = mean_ci([r.get(key) for r in runs], level, within)
            point[key] = None if ci is None else ci.as_dict()
        points.append(point)
    series = sorted({(p["deployment"], p["source"]) for p in points}, key=lambda k: (k[0], k[1] != "engine"))
    target = cfg.slo.attainment_target
    good, good_ci = {}, {}
    for name, source in series:
        mine = [p for p in points if p["deployment"] == name and p["source"] == source]
        good[f"{name}/{source}"] = goodput([(p["rate"], p["slo_attainment"]["mean"]) for p in mine], target)
        runs = [r for r in rows if r["deployment"] == name and r["source"] == source]
        seeds = sorted({r["seed"] for r in runs})
        per_seed = [goodput([(r["rate"], r["slo_attainment"]) for r in runs if r["seed"] == s], target) for s in seeds]
        ci = mean_ci(per_seed, level, (0.0, float("inf")))  # seeds below the lowest rate have no goodput: left out, and listed
        good_ci[f"{name}/{source}"] = {"per_seed": per_seed, **(ci.as_dict() if ci else {})}
    return {
        "experiment": cfg.experiment,
        "devices": _devices(),
        "model": cfg.model.name,
        "workload": cfg.workload.name,
        "slo": {"ttft": cfg.slo.ttft, "tpot": cfg.slo.tpot},
        "attainment_target": cfg.slo.attainment_target,
        "arrival": cfg.workload.arrival,
        "ci_level": level,
        "rows": rows,
        "points": points,
        "goodput": good,
        "goodput_ci": good_ci,
    }


def _devices() -> list[str]:
    try:
        import torch

        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or ["cpu"]
    except Exception:
        return ["unknown"]


def compare_markdown(result: dict) -> str:
    """One row per run when each point ran once; otherwise one row per point with each metric's mean
    and interval over its runs (the runs' own rows stay in compare.json)."""

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
    ]
    points = result.get("points") or []
    repeated = any(p["runs"] > 1 for p in points)
    if repeated:
        level = result.get("ci_level", 0.95)

        def ci(v, fmt):
            if v is None:
                return "-"
            return f"{fmt(v['mean'])} [{fmt(v['lo'])}, {fmt(v['hi'])}]" if v["n"] > 1 else fmt(v["mean"])

        def pct(x):
            return f"{x:.0%}"

        lines += [
            f"Each cell: mean over the runs [{level:.0%} interval, Student t over runs].",
            "",
            "| deployment | source | rate (req/s) | runs | SLO attainment | TTFT p50 (ms) | TTFT p90 (ms) | TPOT p50 (ms) "
            "| TPOT p90 (ms) | finished |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in points:
            lines.append(
                f"| {p['deployment']} ({p['layout']}) | {p['source']} | {rate(p)} | {p['runs']} | {ci(p['slo_attainment'], pct)} | "
                + " | ".join(ci(p[k], ms) for k in ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90"))
                + f" | {p['num_finished']}/{p['num_requests']} |"
            )
    else:
        lines += [
            "| deployment | source | rate (req/s) | SLO attainment | TTFT p50 (ms) | TTFT p90 (ms) | TPOT p50 (ms) | TPOT p90 (ms) "
            "| finished | completion (s) | role switches | MM GB/s | KV GB/s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["rows"]:
            lines.append(
                f"| {r['deployment']} ({r['layout']}) | {r['source']} | {rate(r)} | {r['slo_attainment']:.0%} | {ms(r['ttft_p50'])} | "
                f"{ms(r['ttft_p90'])} | {ms(r['tpot_p50'])} | {ms(r['tpot_p90'])} | {r['num_finished']}/{r['num_requests']} "
                f"| {r.get('duration') or 0:.2f} | {r.get('role_switches') or 0} "
                f"| {gbps(r.get('mm_transfer_GBps_p50'))} | {gbps(r.get('kv_transfer_GBps_p50'))} |"
            )
        lines += ["", "Transfer bandwidth: median over transfers of >= 16 MiB."]
    if repeated:
        lines += ["", "| deployment | goodput (req/s) | per seed: mean [interval] (each seed) |", "|---|---|---|"]
    else:
        lines += ["", "| deployment | goodput (req/s) |", "|---|---|"]
    for key, g in result["goodput"].items():
        cell = f"| {key} | {'below the lowest rate' if g is None else f'{g:.2f}'} |"
        if repeated:
            gc = result.get("goodput_ci", {}).get(key, {})
            seeds = ", ".join("<lowest" if v is None else f"{v:.2f}" for v in gc.get("per_seed", []))
            cell += (f" {gc['mean']:.2f} [{gc['lo']:.2f}, {gc['hi']:.2f}]" if "mean" in gc else " -") + f" ({seeds}) |"
        lines.append(cell)
    return "\n".join(lines) + "\n"


def plot_compare(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    points = result["points"]
    names = sorted({p["deployment"] for p in points})
    for i, name in enumerate(names):
        for source, style in (("engine", "-o"), ("simulator", "--x")):
            pts = sorted((p["rate"], p["slo_attainment"]) for p in points if p["deployment"] == name and p["source"] == source)
            if pts:
                rates, att = [r for r, _ in pts], [a["mean"] for _, a in pts]
                err = [[a["mean"] - a["lo"] for _, a in pts], [a["hi"] - a["mean"] for _, a in pts]]
                ax.errorbar(rates, att, yerr=err, fmt=style, color=f"C{i}", capsize=3, label=f"{name} ({source})")
    ax.axhline(result["attainment_target"], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{result['model']}, {result['workload']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
