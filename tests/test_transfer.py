"""Block copies (csrc extension and torch fallback) and the transfer backends on CPU.

`nccl` runs its point-to-point path over gloo here; tensor parallelism likewise all-reduces over
gloo. `ipc` needs CUDA: on CPU it must refuse clearly (bench/multi_gpu.py runs it on GPUs).
"""

import logging
import random

import pytest
import torch

from epd.cache.block_copy import block_runs, copy_blocks, copy_blocks_torch
from epd.config import DeploymentConfig, PoolConfig
from epd.csrc import block_ops
from tests.helpers import EPD, MODEL, PD, reference, run, workload


def test_extension_builds_and_coalesces_runs():
    ops = block_ops()
    assert ops is not None, "the C++ part of csrc/ must build wherever a compiler is present"
    pairs = ([4, 5, 6, 9, 1, 2], [0, 1, 2, 7, 3, 4])
    assert ops.coalesce_runs(*pairs) == [(4, 0, 3), (9, 7, 1), (1, 3, 2)]
    assert block_runs(*pairs) == [(4, 0, 3), (9, 7, 1), (1, 3, 2)]


@pytest.mark.parametrize("shape,dim", [((3, 2, 10, 4, 2, 8), 2), ((12, 16, 24), 0)], ids=["kv", "mm"])
def test_extension_copy_equals_torch(shape, dim):
    rng = random.Random(0)
    src = torch.randn(shape)
    n = shape[dim]
    for _ in range(5):
        k = rng.randint(1, n)
        s_blocks, d_blocks = rng.sample(range(n), k), rng.sample(range(n), k)
        a, b = torch.zeros(shape), torch.zeros(shape)
        copy_blocks(src, a, s_blocks, d_blocks, dim)
        copy_blocks_torch(src, b, s_blocks, d_blocks, dim)
        assert torch.equal(a, b)
        for s, d in zip(s_blocks, d_blocks):
            assert torch.equal(a.select(dim, d), src.select(dim, s))


def test_extension_rejects_bad_blocks():
    src, dst = torch.zeros(4, 6, 2), torch.zeros(4, 3, 2)
    with pytest.raises(RuntimeError, match="destination block 3..3 outside 0..2"):
        copy_blocks(src, dst, [0], [3], 1)
    with pytest.raises(RuntimeError, match="shapes differ"):
        copy_blocks(src, torch.zeros(5, 3, 2), [0], [0], 1)
    with pytest.raises((RuntimeError, ValueError), match="2 source blocks but 1 destination"):
        copy_blocks(src, dst, [0, 1], [0], 1)


def test_build_survives_a_killed_builder():
    """A build killed half-way leaves torch's lock file behind; the next build must not wait on it forever."""
    from epd.csrc import _build_dir

    (_build_dir(False) / "lock").write_text("")
    block_ops.cache_clear()
    assert block_ops() is not None


def test_fallback_when_extension_unavailable(monkeypatch, caplog):
    monkeypatch.setenv("EPD_CSRC", "0")
    block_ops.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="epd.csrc"):
            assert block_ops() is None
        assert "pure-torch" in caplog.text
        src, dst = torch.randn(2, 5, 3), torch.zeros(2, 5, 3)
        copy_blocks(src, dst, [1, 2], [3, 4], 1)  # the torch path
        assert torch.equal(dst[:, 3:5], src[:, 1:3])
    finally:
        monkeypatch.delenv("EPD_CSRC")
        block_ops.cache_clear()


@pytest.fixture(scope="module")
def expected():
    reqs = workload()
    return dict(zip([r.request_id for r in reqs], reference(reqs)))


def _with(dep: DeploymentConfig, **kw) -> DeploymentConfig:
    return DeploymentConfig(**{**dep.__dict__, **kw})


@pytest.mark.parametrize("dep", [EPD, PD], ids=["epd", "pd"])
def test_push_transfer_matches_single_process(ray_cluster, expected, dep):
    """The nccl backend's point-to-point path (gloo on CPU) between Ray actors."""
    outs, _, events = run(_with(dep, transfer="nccl"), workload())
    assert {k: v.token_ids for k, v in outs.items()} == expected
    kinds = {e.kind.value for e in events}
    assert {"kv_transfer_begin", "kv_transfer_end"} <= kinds
    if dep is EPD:
        assert {"mm_transfer_begin", "mm_transfer_end"} <= kinds


def test_tensor_parallel_equals_tp1(ray_cluster, expected):
    """tp=2 for prefill and decode (gloo all-reduce), nccl transfers between the ranks."""
    dep = _with(
        EPD,
        transfer="nccl",
        prefill=PoolConfig(kv_blocks=64, tp=2),
        decode=PoolConfig(kv_blocks=64, max_decode_seqs=3, tp=2),
    )
    outs, info, _ = run(dep, workload())
    assert {k: v.token_ids for k, v in outs.items()} == expected
    from epd.models.runtime import ModelRuntime

    lm = {i["worker"]: i for i in info if i["lm_weight_bytes"]}
    full = ModelRuntime(MODEL, {"lm"})
    kv = full.allocate_kv_cache(64 + 1, 16)
    # each rank holds half the attention/MLP weights and half the KV heads
    assert lm["prefill-0"]["kv_cache_bytes"] == kv.numel() * kv.element_size() // 2
    assert lm["prefill-0"]["lm_weight_bytes"] < full.weight_bytes()["lm"]


def test_tensor_parallel_aggregated(ray_cluster, expected):
    dep = DeploymentConfig(name="aggregated", aggregated=PoolConfig(instances=1, kv_blocks=64, tp=2))
    outs, _, _ = run(dep, workload())
    assert {k: v.token_ids for k, v in outs.items()} == expected


def test_ipc_needs_cuda(ray_cluster):
    with pytest.raises(Exception, match="ipc needs CUDA caches"):
        run(_with(EPD, transfer="ipc"), workload(2))
    import time

    deadline = time.time() + 20  # every actor and the placement group give their CPUs back
    while ray_cluster.available_resources().get("CPU", 0) < ray_cluster.cluster_resources()["CPU"] and time.time() < deadline:
        time.sleep(0.2)
    assert ray_cluster.available_resources().get("CPU", 0) == ray_cluster.cluster_resources()["CPU"]


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"transfer": "rdma"}, "deployment.transfer must be one of"),
        ({"encode": PoolConfig(tp=2)}, "encode pools use tp: 1"),
        ({"prefill": PoolConfig(tp=2)}, "must share one tp"),
        ({"prefill": PoolConfig(tp=2), "decode": PoolConfig(tp=2)}, "needs deployment.transfer=ipc or nccl"),
        ({"transfer": "ipc", "decode": PoolConfig(kv_block_size=32)}, "kv_block_size of prefill .16. and decode .32. must match"),
    ],
)
def test_deployment_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        _with(EPD, **kw).validate()


def test_tp_needs_ray():
    from epd.engine.executor import make_executor

    dep = DeploymentConfig(name="aggregated", aggregated=PoolConfig(tp=2))
    with pytest.raises(ValueError, match="needs backend=ray"):
        make_executor("local", dep, MODEL)


def test_pulls_merge_by_sender():
    from epd.transfer.base import TransferHandle, merge_by_sender

    pulls = [
        (TransferHandle("encode-0", "mm", [3, 4], 100), [10, 11, 12]),
        (TransferHandle("encode-1", "mm", [0], 20), [20]),
        (TransferHandle("encode-0", "mm", [7], 30), [30]),
    ]
    merged = {h.worker: (h.blocks, dst) for h, dst in merge_by_sender(pulls)}
    # the receiver's first blocks for each pull, in order, one copy per sender
    assert merged == {"encode-0": ([3, 4, 7], [10, 11, 30]), "encode-1": ([0], [20])}
