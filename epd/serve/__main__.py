"""`python -m epd.serve [overrides]`: the OpenAI-compatible server over the engine (same Hydra config as epd.run)."""

from __future__ import annotations

import os
import time

import hydra
from omegaconf import DictConfig

from epd.composition import register_configs, to_run_config

register_configs()


@hydra.main(version_base="1.3", config_path="../../conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    import uvicorn

    from epd.serve.app import build_app
    from epd.serve.async_llm import AsyncLLM
    from epd.serve.shutdown import DrainingServer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_cfg = to_run_config(cfg)
    executor = "local" if run_cfg.backend.kind == "local" else "ray"
    started = time.time()
    # The engine warms up inside AsyncLLM: the server (and /health) comes up only once it is ready.
    llm = AsyncLLM(run_cfg.model, run_cfg.deployment, executor, run_cfg.backend, retain_finished=False)
    warm = f"warm-up {llm.core.warmup_s:.1f} s" if llm.core.warmup_s is not None else "no warm-up"
    print(f"engine {run_cfg.deployment.describe()} ready in {time.time() - started:.1f} s ({warm})", flush=True)
    try:
        llm.core.reset_clock()
        app = build_app(run_cfg, llm)
        config = uvicorn.Config(app, host=run_cfg.server.host, port=run_cfg.server.port, log_level="info", timeout_graceful_shutdown=5)
        DrainingServer(config, app, llm, run_cfg.server.drain_timeout_s).run()
    finally:
        llm.close()


if __name__ == "__main__":
    main()
