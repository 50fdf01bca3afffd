"""Run and model configs composed from conf/ as `python -m epd.run` composes them."""

from __future__ import annotations

from pathlib import Path

from epd.config import ModelConfig, RunConfig

ROOT = Path(__file__).resolve().parent.parent


def run_config(overrides: list[str]) -> RunConfig:
    """The run config `python -m epd.run OVERRIDES...` would run (no output directory made)."""
    from hydra import compose, initialize_config_dir

    from epd.composition import register_configs, to_run_config

    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return to_run_config(compose("config", overrides=[*overrides, "paths.output_dir=unused"]))


def model_config(name: str) -> ModelConfig:
    return run_config([f"model={name}"]).model
