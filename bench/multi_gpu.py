"""Multi-GPU checks and ceilings, run on a machine with 2+ GPUs:

    python bench/multi_gpu.py --out DIR [--parts p2p tp engine]   (engine = engine_tiny + engine_llava)

p2p     the card's peer-to-peer ceiling (cudaMemcpyPeer through torch) next to the csrc kernel's
        batched block copy reading a peer GPU's KV cache, for 16-256 MB.
tp      LLaVA-1.5-7B LM prefill logits, tp=2 over NCCL (two processes) against tp=1.
engine  the engine across GPUs (Ray, one GPU per worker) with ipc and nccl transfers: the tiny
        model in float32 must give the single-GPU engine's greedy tokens exactly; LLaVA-1.5-7B
        (bf16) reports token agreement and the bandwidth of every transfer of >= 16 MB.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.configs import model_config  # noqa: E402
from epd.config import DeploymentConfig, ModelConfig, PoolConfig  # noqa: E402
from epd.csrc import block_ops  # noqa: E402

MB = 1 << 20


def _time_cuda(fn, repeats: int = 10) -> float:
    """Median wall time of fn with every GPU synchronised around it (copies span two devices)."""

    def sync():
        for d in range(torch.cuda.device_count()):
            torch.cuda.synchronize(d)

    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _p2p_pair(a: int, b: int, size: int, ops) -> dict:
    src = torch.empty(size, dtype=torch.uint8, device=a)
    dst = torch.empty(size, dtype=torch.uint8, device=b)
    t = _time_cuda(lambda: dst.copy_(src))  # also enables peer access between a and b
    row = {"src": a, "dst": b, "bytes": size, "memcpy_peer_GBps": size / t / 1e9}
    if ops is not None and ops.has_cuda():
        ops.enable_peer_access(b, a)  # the kernel runs on b and reads a's memory
        # A LLaVA-7B-shaped KV cache (8 MiB per 16-token block), blocks scattered on both sides.
        blocks = size // (8 * MB)
        kv_src = torch.randn(32, 2, 4 * blocks, 16, 32, 128, device=a).to(torch.bfloat16)
        kv_dst = torch.empty(32, 2, 4 * blocks, 16, 32, 128, dtype=torch.bfloat16, device=b)
        sb = torch.randperm(4 * blocks)[:blocks].tolist()
        db = torch.randperm(4 * blocks)[:blocks].tolist()
        with torch.cuda.device(b):
            tk = _time_cuda(lambda: ops.copy_blocks_cuda(kv_src.data_ptr(), 4 * blocks, kv_dst, sb, db, 2))
        row["kernel_GBps"] = size / tk / 1e9
        row["kernel_vs_ceiling"] = row["kernel_GBps"] / row["memcpy_peer_GBps"]
        row["kernel_exact"] = all(torch.equal(kv_dst[:, :, d].cpu(), kv_src[:, :, s].cpu()) for s, d in zip(sb, db))
        del kv_src, kv_dst
        # An MM cache (one outer slice, 512 KiB per 64-token block): parallelism comes from chunking alone.
        mb = size // (512 * 1024)
        mm_src = torch.randn(2 * mb, 64, 4096, device=a).to(torch.bfloat16)
        mm_dst = torch.empty(2 * mb, 64, 4096, dtype=torch.bfloat16, device=b)
        ms, md = list(range(mb)), list(range(mb, 2 * mb))
        with torch.cuda.device(b):
            tm = _time_cuda(lambda: ops.copy_blocks_cuda(mm_src.data_ptr(), 2 * mb, mm_dst, ms, md, 0))
        row["mm_kernel_GBps"] = size / tm / 1e9
        row["mm_kernel_exact"] = torch.equal(mm_dst[mb:].cpu(), mm_src[:mb].cpu())
    return row


def p2p() -> dict:
    n = torch.cuda.device_count()
    ops = block_ops()
    rows = []
    for b in range(1, n):
        for size in (16 * MB, 64 * MB, 256 * MB):
            rows.append(_p2p_pair(0, b, size, ops))
            torch.cuda.empty_cache()
    return {"extension_cuda": bool(ops is not None and ops.has_cuda()), "rows": rows}


def _tp_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from epd.models.generate import lm_step
    from epd.models.runtime import ModelRuntime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=2, device_id=torch.device(f"cuda:{rank}"))
    cfg = model_config("llava-1.5-7b")
    rt = ModelRuntime(cfg, {"lm"}, f"cuda:{rank}")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 30000, (n,), generator=g).tolist() for n in (600, 37, 1200, 5)]
    tables, start = [], 0
    for p in prompts:
        n = -(-len(p) // 16)
        tables.append(list(range(start, start + n)))
        start += n

    def logits():
        kv = rt.allocate_kv_cache(start, 16)
        return lm_step(rt, kv, prompts, [0] * len(prompts), tables, 16).float()

    ref = logits()
    rt.shard_lm(rank, 2, dist.group.WORLD)
    got = logits()
    if rank == 0:
        scale = ref.abs().max().item()
        res = {
            "max_abs_diff": (got - ref).abs().max().item(),
            "max_abs_logit": scale,
            "rel_diff": (got - ref).abs().max().item() / scale,
            "top1_agree": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "weights_per_rank_GB": rt.weight_bytes()["lm"] / 1e9,
        }
        Path(out).write_text(json.dumps(res))
    dist.destroy_process_group()


def tp() -> dict:
    import torch.multiprocessing as mp

    from epd.distributed import free_port

    out = "/tmp/epd_tp.json"
    mp.spawn(_tp_rank, args=(free_port(), out), nprocs=2, join=True)
    return json.loads(Path(out).read_text())


def _requests(n: int, images: int, width: int, height: int, max_tokens: int):
    from epd.request import ImageInput, Request, SamplingParams

    return [
        Request(
            f"r{i}",
            prompt_token_ids=tuple(range(100 + i, 122 + i)),
            images=tuple(ImageInput(width=width, height=height, seed=10 * i + k) for k in range(1 + (i + images - 1) % images)),
            sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        )
        for i in range(n)
    ]


def _run(model, dep, reqs, executor):
    from epd.serve.offline import OfflineLLM

    with OfflineLLM(model, dep, executor) as llm:
        llm.generate([dataclasses.replace(r, request_id="warm-" + r.request_id) for r in reqs[:2]])  # compile, graphs
        t0 = time.time()
        outs = llm.generate(reqs)
        wall = time.time() - t0
        llm.core.drain_check()
        events = list(llm.core.pipeline.events)
    outs = [o for o in outs if not o.request_id.startswith("warm-")]
    return {o.request_id: o.token_ids for o in outs}, events, wall


def _bandwidth(events) -> dict:
    """Transfers of >= 16 MiB (the engine's events carry their bytes), in GB/s."""
    from epd.metrics import transfer_bandwidth

    return {
        k: {"n": len(v), "median_GBps": statistics.median(v) / 1e9 if v else None, "max_GBps": max(v) / 1e9 if v else None}
        for k, v in transfer_bandwidth(events).items()
    }


def engine(models: tuple[str, ...] = ("tiny", "llava")) -> dict:
    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    gpus = torch.cuda.device_count()
    res: dict = {}
    try:
        if "tiny" in models:
            _engine_tiny(gpus, res)
        if "llava" in models:
            _engine_llava(gpus, res)
    finally:
        ray.shutdown()
    return res


def _engine_tiny(gpus: int, res: dict) -> None:
    tiny = ModelConfig(seed=1, device="cuda", cuda_graphs=False)
    reqs = _requests(12, 3, 640, 480, 12)
    single = DeploymentConfig(name="aggregated", aggregated=PoolConfig(kv_blocks=512, mm_blocks=256))
    ref, _, _ = _run(tiny, single, reqs, "local")
    gpu = dict(num_gpus=1, num_cpus=2)
    epd = DeploymentConfig(
        name="epd",
        encode=PoolConfig(instances=max(1, gpus - 2), mm_blocks=256, kv_blocks=1, **gpu),
        prefill=PoolConfig(kv_blocks=512, **gpu),
        decode=PoolConfig(kv_blocks=512, **gpu),
    )
    for transfer in ("ipc", "nccl"):
        dep = DeploymentConfig(**{**epd.__dict__, "transfer": transfer})
        got, _, _ = _run(tiny, dep, reqs, "ray")
        res[f"tiny_fp32_{transfer}_identical"] = got == ref
    if gpus >= 4:
        tp2 = DeploymentConfig(
            name="epd",
            transfer="ipc",
            encode=PoolConfig(instances=1, mm_blocks=256, kv_blocks=1, **gpu),
            prefill=PoolConfig(kv_blocks=512, tp=2, **gpu),
            decode=PoolConfig(kv_blocks=512, tp=1, **gpu),
        )
        try:
            tp2.validate()
        except ValueError:  # P and D share one tp: 1E + 1P(tp2) + 1D(tp2) needs 5 GPUs; use PD instead
            tp2 = DeploymentConfig(
                name="pd",
                transfer="ipc",
                encode_prefill=PoolConfig(kv_blocks=512, mm_blocks=256, tp=2, **gpu),
                decode=PoolConfig(kv_blocks=512, tp=2, **gpu),
            )
        got, _, _ = _run(tiny, tp2, reqs, "ray")
        res["tiny_fp32_tp2_pd_identical"] = got == ref


def _engine_llava(gpus: int, res: dict) -> None:
    gpu = dict(num_gpus=1, num_cpus=2)
    big = model_config("llava-1.5-7b")
    reqs = _requests(16, 4, 4032, 3024, 10)
    ref, _, ref_wall = _run(
        big,
        DeploymentConfig(name="aggregated", aggregated=PoolConfig(kv_blocks=4096, mm_blocks=1024, max_prefill_tokens=16384)),
        reqs,
        "local",
    )
    for transfer in ("ipc", "nccl"):
        dep = DeploymentConfig(
            name="epd",
            transfer=transfer,
            encode=PoolConfig(instances=max(1, gpus - 2), mm_blocks=2048, kv_blocks=1, max_images_per_batch=16, **gpu),
            prefill=PoolConfig(kv_blocks=4096, mm_blocks=2048, max_prefill_tokens=16384, **gpu),
            decode=PoolConfig(kv_blocks=4096, mm_blocks=1, **gpu),
        )
        got, events, wall = _run(big, dep, reqs, "ray")
        agree = sum(got[k] == ref[k] for k in ref) / len(ref)
        res[f"llava7b_{transfer}"] = {
            "requests_identical": agree,
            "wall_s": wall,
            "bandwidth": _bandwidth(events),
        }
    res["llava7b_single_gpu_wall_s"] = ref_wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", nargs="+", default=["p2p", "tp", "engine"])
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "card": torch.cuda.get_device_name(0),
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "command": "python bench/multi_gpu.py " + " ".join(sys.argv[1:]),
    }
    for part in args.parts:
        t0 = time.time()
        try:
            parts = {
                "p2p": p2p,
                "tp": tp,
                "engine": engine,
                "engine_tiny": lambda: engine(("tiny",)),
                "engine_llava": lambda: engine(("llava",)),
            }
            result[part] = parts[part]()
        except Exception as exc:  # keep what the other parts measured
            import traceback

            result[part] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
        result[part + "_seconds"] = time.time() - t0
        (out / "multi_gpu.json").write_text(json.dumps(result, indent=1, default=str))
        print(json.dumps({part: result[part]}, indent=1, default=str), flush=True)


if __name__ == "__main__":
    main()
