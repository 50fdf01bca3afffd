"""Simulator fidelity: the same seeded workloads on the real engine and in the simulator.

    .venv/bin/python bench/fidelity.py [--rates 2 4 8] [--requests 40] [--out experiments/fidelity_cpu]

Profiles the engine on this machine first (the simulator's latency models are fitted to it), then
runs deployments epd, pd and aggregated at each rate on both backends and compares P50/P90 TTFT and
TPOT. Writes results.json and README.md (the table) into --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from epd.composition import register_configs, to_run_config  # noqa: E402
from epd.experiment import run_experiment  # noqa: E402
from epd.profiling import run_profile  # noqa: E402

METRICS = ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90")


def config(overrides: list[str], out: Path):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return to_run_config(compose("config", overrides=[*overrides, f"paths.output_dir={out}", "logger=none"]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--deployments", nargs="+", default=["epd", "pd", "aggregated"])
    ap.add_argument("--out", default=str(ROOT / "experiments" / "fidelity_cpu"))
    args = ap.parse_args()
    out = Path(args.out)
    runs = out / "runs"
    register_configs()
    profile_path = out / "profile.json"
    run_profile(config(["+experiment=profile"], runs / "profile"), runs / "profile", {})
    profile_path.write_text((runs / "profile" / "profile.json").read_text())
    rows = []
    for dep in args.deployments:
        for rate in args.rates:
            common = [f"deployment={dep}", f"workload.rate={rate}", f"workload.num_requests={args.requests}"]
            res = {}
            for backend, extra in (("ray", []), ("sim", ["backend.latency_model=profiled", f"backend.profile_path={profile_path}"])):
                run_dir = runs / f"{dep}-{rate:g}-{backend}"
                cfg = config([*common, f"backend={backend}", *extra], run_dir)
                res[backend] = run_experiment(cfg, run_dir, {"overrides": [*common, f"backend={backend}", *extra]})
            row = {"deployment": res["ray"]["deployment"], "rate": rate}
            for m in METRICS:
                eng, sim = res["ray"][m], res["sim"][m]
                row[f"{m}_engine"], row[f"{m}_sim"] = eng, sim
                row[f"{m}_err"] = abs(sim - eng) / eng if eng else None
            rows.append(row)
            print(json.dumps(row))
    write(out, rows, args)


def write(out: Path, rows: list[dict], args) -> None:
    errs = [r[f"{m}_err"] for r in rows for m in METRICS if r[f"{m}_err"] is not None]
    within = sum(e <= 0.15 for e in errs)
    (out / "results.json").write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2))
    lines = [
        "# Simulator fidelity on CPU (tiny LLaVA)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {platform.system()}, recorded {time.strftime('%Y-%m-%d')}.",
        f"Command: `.venv/bin/python bench/fidelity.py --rates {' '.join(f'{r:g}' for r in args.rates)} --requests {args.requests}`",
        "",
        "Engine = real engine on a local Ray cluster; sim = simulator with latency models fitted by `+experiment=profile`",
        "on the same machine just before (`profile.json`). Times in ms; err = |sim - engine| / engine.",
        "",
        "| deployment | rate | " + " | ".join(f"{m} eng / sim (err)" for m in METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for r in rows:
        cells = []
        for m in METRICS:
            e, s, err = r[f"{m}_engine"], r[f"{m}_sim"], r[f"{m}_err"]
            cells.append(f"{e * 1e3:.1f} / {s * 1e3:.1f} ({err * 100:.0f}%)" if err is not None else "-")
        lines.append(f"| {r['deployment']} | {r['rate']:g} | " + " | ".join(cells) + " |")
    lines += ["", f"{within} of {len(errs)} figures within 15% of the engine's."]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
