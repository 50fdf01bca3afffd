"""`python -m epd.run`: Hydra composition, the CLI end to end, records, W&B offline runs, multirun."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from epd.composition import register_configs, to_run_config
from epd.config import RunConfig
from epd.metrics import SUMMARY_KEYS

ROOT = Path(__file__).resolve().parent.parent
CONF = str(ROOT / "conf")


def _compose(overrides):
    register_configs()
    with initialize_config_dir(CONF, version_base="1.3"):
        # outside a Hydra run there is no ${hydra:runtime.output_dir} to resolve
        return compose("config", overrides=[*overrides, "paths.output_dir=unused"])


def test_default_composes_into_frozen_dataclasses():
    cfg = to_run_config(_compose([]))
    assert isinstance(cfg, RunConfig)
    assert cfg.model.name == "tiny-llava" and cfg.deployment.describe() == "1E1P1D" and cfg.backend.kind == "ray"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.workload.rate = 3.0


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")))
def test_every_experiment_composes(name):
    to_run_config(_compose([f"+experiment={name}"]))


@pytest.mark.parametrize("group", ["model", "deployment", "workload", "slo", "hardware", "backend"])
def test_every_group_option_composes(group):
    for option in sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml")):
        to_run_config(_compose([f"{group}={option}"]))


def test_pool_overrides_from_the_command_line():
    cfg = to_run_config(_compose(["deployment.encode.instances=3", "deployment=epd"]))
    assert cfg.deployment.describe() == "3E1P1D"
    cfg = to_run_config(_compose(["deployment=pd", "deployment.encode_prefill.instances=2"]))
    assert cfg.deployment.describe() == "2EP1D"


def _compose_error(overrides) -> str:
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as info:
        _compose(overrides)
    return f"{info.value} {info.value.__cause__}"


def test_bad_overrides_fail_at_compose_time():
    assert "could not be converted to Float" in _compose_error(["workload.rate=abc"])
    assert "ratee" in _compose_error(["workload.ratee=2"])
    assert "nope" in _compose_error(["deployment=nope"])
    assert "instancez" in _compose_error(["deployment.encode.instancez=2"])


def _epd_run(args, tmp_path, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "RAY_AUTH_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "epd.run", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def _check_record(run_dir: Path, n_requests: int) -> dict:
    for name in ("config.yaml", "events.jsonl", "outputs.jsonl", "summary.json", "requests.jsonl", "workers.json"):
        assert (run_dir / name).exists(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(SUMMARY_KEYS) <= summary.keys()
    assert summary["num_requests"] == n_requests
    outputs = [json.loads(ln) for ln in (run_dir / "outputs.jsonl").read_text().splitlines()]
    assert len(outputs) == n_requests and all(o["token_ids"] for o in outputs if o["finish_reason"] != "abort")
    return summary


def test_cli_real_engine_with_wandb_offline(tmp_path):
    proc = _epd_run(["workload.num_requests=5", "workload.rate=4", f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SLO" in proc.stdout and "1E1P1D" in proc.stdout
    # quiet and legible: every choice named up front, W&B and Ray keep their notices to themselves
    assert "allocation=static | transfer=object_store | hardware=cpu | backend=ray" in proc.stdout
    assert "ready in" in proc.stdout and "W&B        offline run" in proc.stdout
    assert "wandb:" not in proc.stdout + proc.stderr and "Token authentication" not in proc.stderr
    summary = _check_record(tmp_path / "run", 5)
    assert summary["engine_startup_s"] > 0 and summary["allocation"] == "static"
    assert summary["num_finished"] == 5 and summary["backend"] == "ray"
    # the run's batch records: on CPU nothing compiles; the driver's turnaround comes from them
    assert summary["kernels_compiled_in_run"] == 0 and "kernels compiled" not in proc.stdout
    assert summary["driver_turnarounds"] > 0 and summary["driver_return_p50_ms"] >= 0 and summary["driver_send_p50_ms"] >= 0
    batches = [json.loads(ln) for ln in (tmp_path / "run" / "batches.jsonl").read_text().splitlines()]
    assert batches and all(b["compiled"] == 0 for b in batches)
    workers = json.loads((tmp_path / "run" / "workers.json").read_text())
    assert {tuple(w["roles"]) for w in workers} == {("encode",), ("prefill",), ("decode",)}
    offline = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))


def test_cli_simulator_and_dataset(tmp_path):
    proc = _epd_run(["backend=sim", "logger=none", "workload=sample_dataset", "deployment=pd", f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _check_record(tmp_path / "run", 8)
    assert summary["backend"] == "sim" and summary["deployment"] == "1EP1D" and summary["num_finished"] == 8
    assert (tmp_path / "run" / "batches.jsonl").read_text() and summary["batches_decode"] > 0  # as the engine keeps them


def test_multirun_three_jobs_three_records_three_wandb_runs(tmp_path):
    """A sweep: each job its own record and W&B run (the engine in-process; Ray runs are tested elsewhere)."""
    proc = _epd_run(
        [
            "-m",
            "+experiment=smoke",
            "backend=local",
            "workload.num_requests=3",
            "workload.arrival=poisson",
            "workload.rate=1,2,4",
            f"hydra.sweep.dir={tmp_path}/sweep",
        ],
        tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted((tmp_path / "sweep").glob("[0-9]*"))
    assert len(jobs) == 3
    rates = [_check_record(j, 3)["rate"] for j in jobs]
    assert rates == [1.0, 2.0, 4.0]
    runs = [list((j / "wandb").glob("offline-run-*")) for j in jobs]
    assert all(len(r) == 1 for r in runs) and len({r[0].name for r in runs}) == 3
    # one table across the jobs at the end of the sweep, also written beside them
    assert "Sweep of 3 jobs" in proc.stdout and "workload.rate=4" in (tmp_path / "sweep" / "sweep.md").read_text()


def test_a_failed_job_does_not_stop_the_sweep(tmp_path):
    proc = _epd_run(["-m", "backend=sim", "logger=none", "workload.num_requests=4,0,4", f"hydra.sweep.dir={tmp_path}/sweep"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted((tmp_path / "sweep").glob("[0-9]*"))
    assert (jobs[1] / "FAILED").exists() and not (jobs[1] / "summary.json").exists()
    for job in (jobs[0], jobs[2]):  # the jobs around the failed one ran in full
        summary = _check_record(job, 4)
        assert summary["num_finished"] == 4 and summary["backend"] == "sim"


def test_out_of_range_values_are_refused_before_anything_runs(tmp_path):
    bad = ["workload.rate=-1", "slo.ttft=0", "allocation.policy=smart", "model.image_decode=device", "model.vision_graph_tiles=-1"]
    proc = _epd_run([*bad, f"hydra.run.dir={tmp_path}/run"], tmp_path, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    for key in ("workload.rate=-1.0: must be > 0", "slo.ttft=0.0: must be > 0", "allocation.policy='smart': must be one of",
                "model.image_decode=device needs model.image_resize=device", "model.vision_graph_tiles=-1: must be >= 0"):  # fmt: skip
        assert key in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()  # no empty output directory left behind


def test_regime_map_composes_and_refuses_a_grid_it_cannot_run(tmp_path):
    """`+experiment=regime_map` is a real composition (task=regime, simulator); a one-GPU map or an empty
    axis is refused by name before anything runs."""
    proc = _epd_run(
        ["+experiment=regime_map", "regime.gpus=1", "regime.memory_gb=[]", "backend.sim_encoder_scale=0", f"hydra.run.dir={tmp_path}/run"],
        tmp_path,
        timeout=60,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
    for key in ("regime.gpus=1: must be >= 2", "regime.memory_gb=[]: must be a non-empty list", "backend.sim_encoder_scale=0"):
        assert key in proc.stderr, proc.stderr


def test_a_misspelt_key_is_named_with_its_nearest_keys(tmp_path):
    proc = _epd_run(["workload.ratee=3", "deployment.encode.instanses=2", f"hydra.run.dir={tmp_path}/run"], tmp_path, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
    assert "did you mean workload.rate?" in proc.stderr and "did you mean deployment.encode.instances?" in proc.stderr


def test_schemas_are_not_offered_as_choices(tmp_path):
    proc = _epd_run(["model=tiny-qwen"], tmp_path, timeout=60)
    assert proc.returncode != 0 and "tiny-llava" in proc.stderr and "_schema" not in proc.stderr


def test_cli_bad_override_exits_with_a_clear_message(tmp_path):
    proc = _epd_run(["workload.rate=abc"], tmp_path, timeout=60)
    assert proc.returncode != 0 and "could not be converted to Float" in proc.stderr


def test_compare_runs_every_deployment_on_engine_and_simulator(tmp_path):
    """`task=compare`: EPD vs PD vs aggregated, two rates, two seeds each, engine (workers kept up across
    rates) and simulator; every metric given with its interval over the seeds."""
    proc = _epd_run(
        ["+experiment=compare_tiny", "logger=none", "workload.num_requests=3", "compare.rates=[2.0,4.0]", "compare.repeats=2"]
        + ["workload.seed=5", f"hydra.run.dir={tmp_path}/run"],
        tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "run"
    result = json.loads((out / "compare.json").read_text())
    runs = sorted((r["deployment"], r["source"], r["rate"], r["seed"]) for r in result["rows"])
    want = [(d, s, r, seed) for d in ("epd", "pd", "aggregated") for s in ("engine", "simulator") for r in (2.0, 4.0) for seed in (5, 6)]
    assert runs == sorted(want)
    assert all(r["num_finished"] == 3 for r in result["rows"])
    for p in result["points"]:
        mine = [r for r in result["rows"] if (r["deployment"], r["source"], r["rate"]) == (p["deployment"], p["source"], p["rate"])]
        att = p["slo_attainment"]
        assert p["runs"] == att["n"] == 2 and att["mean"] == pytest.approx(sum(r["slo_attainment"] for r in mine) / 2)
        assert 0 <= att["lo"] <= att["mean"] <= att["hi"] <= 1
        assert p["ttft_p90"]["lo"] <= p["ttft_p90"]["mean"] <= p["ttft_p90"]["hi"]
    series = {f"{d}/{s}" for d in ("epd", "pd", "aggregated") for s in ("engine", "simulator")}
    assert set(result["goodput"]) == set(result["goodput_ci"]) == series
    assert all(len(g["per_seed"]) == 2 for g in result["goodput_ci"].values())
    md = (out / "compare.md").read_text()
    assert (out / "compare.png").stat().st_size > 0 and "| epd (1E1P1D) | engine | 2 | 2 |" in md and "95% interval" in md
    table = [ln for ln in md.splitlines() if ln.startswith("| epd (1E1P1D) |")]
    assert table and all(ln.count("|") == 11 for ln in table)  # ten cells each
    for d in ("epd", "pd", "aggregated"):  # every run is a full run record
        for seed in (5, 6):
            _check_record(out / "runs" / f"{d}-rate2-seed{seed}", 3)


def test_role_switching_experiment(tmp_path):
    """`+experiment=role_switching`, smaller: static vs the queue policy on a shifting offline workload."""
    phases = "[{num_requests:6,images_per_request:4,output_tokens:2},{num_requests:16,images_per_request:1,output_tokens:160}]"
    proc = _epd_run(
        [
            "+experiment=role_switching",
            "backend=local",  # switching on Ray workers: test_allocation.py
            "logger=none",
            f"workload.phases={phases}",
            "compare.simulate=false",
            "compare.repeats=1",
            "+compare.allocations.queue.min_pressure=0.4",  # this short run's decode queue must count as pressure
            f"hydra.run.dir={tmp_path}/run",
        ],
        tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "compare.json").read_text())
    rows = {r["deployment"]: r for r in result["rows"]}
    assert set(rows) == {"epd+static", "epd+queue"}
    assert all(r["num_finished"] == 22 for r in rows.values())
    assert rows["epd+static"]["role_switches"] == 0
    assert rows["epd+queue"]["role_switches"] >= 1  # the queue policy moved a worker as the mix shifted
    queue_run = tmp_path / "run" / "runs" / "epd+queue-rate1"
    ends = [json.loads(ln) for ln in (queue_run / "events.jsonl").read_text().splitlines() if '"role_switch_end"' in ln]
    assert ends and all("failed" not in e.get("data", e) for e in ends)
    assert (queue_run / "stage_load.jsonl").exists()


def test_compare_rejects_a_bad_deployment(tmp_path):
    proc = _epd_run(
        ["+experiment=compare_tiny", "logger=none", "+compare.deployments.epd.encode.instanses=2", f"hydra.run.dir={tmp_path}/r"], tmp_path
    )
    assert proc.returncode != 0 and "compare.deployments.epd" in proc.stderr and "instanses" in proc.stderr


def test_simulator_stays_close_to_the_recorded_4gpu_engine_run(tmp_path):
    """The GPU roofline (host preprocessing and step overhead included) against the engine's 4 x H200
    run recorded in experiments/paper_e2e_4gpu (a run its calibration did not use): TTFT and TPOT
    p50 within 20%, attainment within 10 points, at every deployment and rate. That engine scheduled
    one batch at a time, so the simulation does too."""
    recorded = ROOT / "experiments" / "paper_e2e_4gpu" / "internvl_0.5-2" / "compare.json"
    engine = {(r["deployment"], r["rate"]): r for r in json.loads(recorded.read_text())["rows"] if r["source"] == "engine"}
    proc = _epd_run(
        ["+experiment=paper_e2e_4gpu", "hardware=h200", "compare.real=false", "compare.repeats=1", "workload.num_requests=24"]
        + ["logger=none", f"hydra.run.dir={tmp_path}/run"]
        + [f"+compare.deployments.{d}.async_scheduling=false" for d in ("epd_2e1p1d", "pd_3p1d", "aggregated_4")],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sim = {(r["deployment"], r["rate"]): r for r in json.loads((tmp_path / "run" / "compare.json").read_text())["rows"]}
    assert sim.keys() == engine.keys()
    for key, e in engine.items():
        s = sim[key]
        for metric in ("ttft_p50", "tpot_p50"):
            assert abs(s[metric] - e[metric]) < 0.2 * e[metric], (key, metric, s[metric], e[metric])
        assert abs(s["slo_attainment"] - e["slo_attainment"]) <= 0.1, (key, s["slo_attainment"], e["slo_attainment"])


def test_simulator_stays_close_to_the_recorded_async_4gpu_engine_run(tmp_path):
    """The H100 roofline (efficiencies and per-step cost measured on one H100, not on this run) against
    the engine's 4 x H100 gpu4_epd run with async scheduling in bench/results/h100-2026-11-28: TPOT p50
    within 15%, TTFT p50 within 30% (the roofline's single prefill efficiency is generous to short
    prompts), attainment within 10 points."""
    recorded = json.loads((ROOT / "bench" / "results" / "h100-2026-11-28" / "gpu4_epd_r4" / "summary.json").read_text())
    overrides = ["+experiment=gpu4_epd", "hardware=h100", "backend.kind=sim", "logger=none", "workload.num_requests=200"]
    proc = _epd_run([*overrides, "workload.rate=4", f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sim = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert abs(sim["tpot_p50"] - recorded["tpot_p50"]) < 0.15 * recorded["tpot_p50"], (sim["tpot_p50"], recorded["tpot_p50"])
    assert abs(sim["ttft_p50"] - recorded["ttft_p50"]) < 0.30 * recorded["ttft_p50"], (sim["ttft_p50"], recorded["ttft_p50"])
    assert abs(sim["slo_attainment"] - recorded["slo_attainment"]) <= 0.1


def test_paper_workload_arrives_as_jpeg_files_except_in_the_simulator(tmp_path):
    """The engine and the server get the paper workload's photos as JPEG files (decoded as a client's
    would be); the simulator, which reads only sizes, the same requests without the files."""
    from epd.experiment import make_requests

    small = ["+experiment=gpu4_epd", "model=tiny-llava", "workload.num_requests=3", "workload.image_width=320", "workload.image_height=240"]
    small.append(f"workload.image_cache_dir={tmp_path}")
    real = make_requests(to_run_config(_compose(small)))
    sim = make_requests(to_run_config(_compose([*small, "backend=sim"])))
    assert real and all(im.path and im.path.endswith(".jpg") for r in real for im in r.images)
    assert all(im.is_procedural for r in sim for im in r.images)

    def shape(reqs):
        return [(r.request_id, r.prompt_token_ids, len(r.images)) for r in reqs]

    assert shape(real) == shape(sim)
    assert len(list(tmp_path.glob("*.jpg"))) == sum(len(r.images) for r in real)
