"""`python -m epd.run [+experiment=NAME] [overrides]`: compose the config, run, record, log.

This is the only module that sees Hydra's DictConfig; everything below gets frozen dataclasses.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from epd.composition import register_configs, to_run_config
from epd.config_checks import check_run_config, unknown_override

log = logging.getLogger("epd")
register_configs()


def _refuse(exc: Exception, out_dir: Path, multirun: bool) -> None:
    """A configuration that cannot run: its message on stderr, no traceback; a single run's output
    directory (Hydra's bookkeeping only) is removed, a sweep's job is marked FAILED."""
    print(f"epd.run: {exc}", file=sys.stderr, flush=True)
    if multirun:
        (out_dir / "FAILED").write_text(f"{exc}\n")
        return None
    if out_dir.exists() and all(p.name == ".hydra" or p.suffix == ".log" for p in out_dir.iterdir()):
        logging.shutdown()
        shutil.rmtree(out_dir, ignore_errors=True)
    sys.exit(2)


def _shutdown_ray() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> Optional[float]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir).resolve()
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        run_cfg = to_run_config(cfg)
        check_run_config(run_cfg)
    except ValueError as exc:  # a value out of range or choices: say which, leave nothing behind
        return _refuse(exc, out_dir, multirun)
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        if run_cfg.task == "profile":
            from epd.profiling import run_profile

            run_profile(run_cfg, out_dir, resolved)
            return None
        if run_cfg.task == "optimize":
            from simulator.search import run_search

            return run_search(run_cfg, out_dir, resolved)
        if run_cfg.task == "regime":
            from simulator.regime import run_regime

            return run_regime(run_cfg, out_dir, resolved)
        if run_cfg.task == "compare":
            from epd.compare import run_compare

            result = run_compare(run_cfg, out_dir, resolved)
            print(f"  record     {out_dir}")
            return max((g for g in result["goodput"].values() if g is not None), default=None)
        if run_cfg.task != "serve":
            raise ValueError(f"unknown task {run_cfg.task!r} (serve, profile, optimize, compare, regime)")
        from epd.experiment import format_summary, run_experiment  # torch and transformers: only once the config holds

        summary = run_experiment(run_cfg, out_dir, resolved)
        print(format_summary(summary))
        print(f"  record     {out_dir}")
        return summary["slo_attainment"]
    except Exception:
        if not multirun:
            raise
        # In a sweep one failed job must not stop the others: record it and go on.
        log.exception("job %s failed", hc.job.num)
        (out_dir / "FAILED").write_text("see the job's log\n")
        return None
    finally:
        _shutdown_ray()


def _check_overrides(argv: list[str]) -> None:
    """Misspelt keys named before Hydra composes (its own message suggests appending them with +)."""
    problems = [p for p in map(unknown_override, argv) if p]
    if problems:
        print("epd.run: " + "\n  ".join(["unknown configuration keys:", *problems]), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _check_overrides(sys.argv[1:])
    main()
