"""Model configs by name, composed from conf/ as `python -m epd.run model=NAME` composes them."""

from __future__ import annotations

from pathlib import Path

from epd.config import ModelConfig

ROOT = Path(__file__).resolve().parent.parent


def model_config(name: str) -> ModelConfig:
    from hydra import compose, initialize_config_dir

    from epd.composition import register_configs, to_run_config

    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return to_run_config(compose("config", overrides=[f"model={name}", "paths.output_dir=unused"])).model
