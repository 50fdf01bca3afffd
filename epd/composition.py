"""Hydra's side of the configs: the typed schemas registered in its ConfigStore, and composed configs
turned into the frozen dataclasses of `epd.config` (nothing below the entry points sees OmegaConf)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from epd.config import (
    AllocationConfig,
    BackendConfig,
    CompareConfig,
    DeploymentConfig,
    HardwareConfig,
    LoggerConfig,
    ModelConfig,
    PathsConfig,
    RunConfig,
    ServerConfig,
    SLOConfig,
    WorkloadConfig,
)


def compare_deployments(cc: CompareConfig) -> dict[str, DeploymentConfig]:
    """compare.deployments typed and checked (a misspelt key or a bad value names the deployment)."""
    out = {}
    for name, raw in cc.deployments.items():
        try:
            node = OmegaConf.merge(_schema(DeploymentConfig), raw)
            dep = OmegaConf.to_object(node)
            dep.validate()
        except Exception as exc:
            raise ValueError(f"compare.deployments.{name}: {exc}") from exc
        out[name] = dep
    return out


def _schema(node_type: type) -> DictConfig:
    """A structured node Hydra can merge into: frozen dataclasses make read-only nodes."""
    node = OmegaConf.structured(node_type)

    def unlock(n: DictConfig) -> None:
        n._set_flag("readonly", None)
        for key in n.keys():
            child = n._get_node(key)
            if isinstance(child, DictConfig):
                unlock(child)

    unlock(node)
    return node


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    if not OmegaConf.has_resolver("epd_root"):  # the project checkout, for files shipped with it
        OmegaConf.register_new_resolver("epd_root", lambda: str(Path(__file__).resolve().parent.parent))

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=_schema(RunConfig))
    for group, node_type in [
        ("model", ModelConfig),
        ("deployment", DeploymentConfig),
        ("workload", WorkloadConfig),
        ("slo", SLOConfig),
        ("allocation", AllocationConfig),
        ("hardware", HardwareConfig),
        ("backend", BackendConfig),
        ("logger", LoggerConfig),
        ("paths", PathsConfig),
        ("server", ServerConfig),
    ]:
        # in a group of their own, so Hydra's choices and --help list only real options
        cs.store(group="schema", name=group, node=_schema(node_type))


def to_run_config(cfg: DictConfig) -> RunConfig:
    run_cfg = OmegaConf.to_object(cfg)
    assert isinstance(run_cfg, RunConfig), type(run_cfg)
    run_cfg.deployment.validate()
    return run_cfg
