import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session; executors reuse it and leave it running."""
    import ray

    if not ray.is_initialized():
        # "local": this process's own cluster, not another test process's that Ray would find on the host
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def engine(ray_cluster):
    """An AsyncLLM (tiny LLaVA, EPD on Ray) per server test module; gone before other modules need
    the cluster's CPUs."""
    from epd.config import RunConfig
    from epd.serve.async_llm import AsyncLLM
    from tests.serving import DEPLOYMENT

    llm = AsyncLLM(RunConfig().model, DEPLOYMENT, "ray")
    yield llm
    llm.close()
