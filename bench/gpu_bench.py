"""GPU checks and benchmarks on one card: kernel correctness, the card's ceilings, decode / prefill /
encode speed of LLaVA-1.5-7B's shape, and offline end-to-end throughput against transformers.

    python bench/gpu_bench.py --sections check,ceil,decode,prefill,encode --out results.json
    python bench/gpu_bench.py --sections e2e,hf --requests 256 --out e2e.json

Every figure is printed next to the ceiling measured on the same card in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.configs import model_config  # noqa: E402
from epd.config import DeploymentConfig, PoolConfig  # noqa: E402
from epd.kernels.attention import AttentionMetadata, paged_attention_ref, prefill_attention_sdpa  # noqa: E402
from epd.models.runtime import ModelRuntime  # noqa: E402
from simulator.shapes import ModelShape  # noqa: E402

RESULTS: dict = {}


def timed(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median seconds per call, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


# ---- correctness --------------------------------------------------------------------------
def check_kernels() -> None:
    from epd.kernels.triton_decode import paged_decode

    rows = []
    dev = torch.device("cuda")
    for b, h, kvh, d, bs, max_ctx in [
        (1, 32, 32, 128, 16, 1024),
        (7, 28, 4, 128, 16, 3000),
        (64, 32, 8, 128, 16, 1024),
        (5, 8, 1, 64, 32, 333),
    ]:
        g = torch.Generator(device=dev).manual_seed(b * 1000 + h)
        ctxs = torch.randint(1, max_ctx + 1, (b,), generator=g, device=dev).tolist()
        need = sum(-(-c // bs) for c in ctxs)
        k = torch.randn(need + 3, bs, kvh, d, device=dev, dtype=torch.bfloat16, generator=g)
        v = torch.randn_like(k)
        perm = torch.randperm(need + 3, device=dev, generator=g).tolist()
        tables, i = [], 0
        for c in ctxs:
            n = -(-c // bs)
            tables.append(perm[i : i + n])
            i += n
        q = torch.randn(b, h, d, device=dev, dtype=torch.bfloat16, generator=g)
        meta = AttentionMetadata.build(tables, [1] * b, ctxs, bs, dev)
        ref = paged_attention_ref(q.double(), k.double(), v.double(), meta, d**-0.5)
        out = paged_decode(q, k, v, meta.block_tables, meta.context_lens_t, d**-0.5)
        rows.append(
            {
                "kernel": "paged_decode",
                "shape": f"B{b} H{h} KVH{kvh} D{d} bs{bs} ctx<={max_ctx}",
                "rel_err": rel_err(out, ref),
                "finite": bool(torch.isfinite(out).all()),
            }
        )
    for lens, h, kvh in [([512], 32, 32), ([100, 700, 3], 28, 4), ([2048], 32, 8)]:
        t = sum(lens)
        q = torch.randn(t, h, 128, device=dev, dtype=torch.bfloat16)
        k, v = torch.randn(t, kvh, 128, device=dev, dtype=torch.bfloat16), torch.randn(t, kvh, 128, device=dev, dtype=torch.bfloat16)
        kc = k.double().reshape(t, 1, kvh, 128)
        tables = []
        start = 0
        for n in lens:
            tables.append(list(range(start, start + n)))
            start += n
        meta = AttentionMetadata.build(tables, lens, lens, 1, dev)
        ref = paged_attention_ref(q.double(), kc, v.double().reshape(t, 1, kvh, 128), meta, 128**-0.5)
        out = prefill_attention_sdpa(q, k, v, meta, 128**-0.5)
        rows.append(
            {
                "kernel": "prefill_sdpa",
                "shape": f"lens {lens} H{h} KVH{kvh}",
                "rel_err": rel_err(out, ref),
                "finite": bool(torch.isfinite(out).all()),
            }
        )
    RESULTS["checks"] = rows
    for r in rows:
        print(f"check {r['kernel']:13s} {r['shape']:38s} rel err {r['rel_err']:.2e} finite={r['finite']}")


def check_graphs_match_eager() -> None:
    """Decode via CUDA graphs equals the eager step on a real-shape LM (tokens and logits)."""
    from epd.models.decode_graphs import DecodeGraphs
    from epd.models.generate import lm_step

    cfg = model_config("llava-1.5-7b")
    rt = ModelRuntime(cfg, {"lm"})
    rt.lm.fuse()
    kv = rt.allocate_kv_cache(2049, 16)
    graphs = DecodeGraphs(rt.lm, kv, 16, 2048, 256, sizes=(1, 4, 8))
    prompts = [[(7 * i + j) % 30000 + 10 for j in range(50 + 30 * i)] for i in range(5)]
    tables = [list(range(i * 64, i * 64 + 64)) for i in range(5)]
    logits = lm_step(rt, kv, prompts, [0] * 5, tables, 16)
    toks = logits.argmax(-1).tolist()
    pos = [len(p) for p in prompts]
    eager = lm_step(rt, kv, [[t] for t in toks], pos, tables, 16)
    graph = graphs.run(toks, pos, tables)
    RESULTS["graph_vs_eager"] = {"rel_err": rel_err(graph, eager), "same_argmax": bool((graph.argmax(-1) == eager.argmax(-1)).all())}
    print("check cuda-graph decode vs eager:", RESULTS["graph_vs_eager"])


# ---- ceilings -----------------------------------------------------------------------------
def ceilings() -> dict:
    x = torch.randn(1 << 28, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x))
    copy_bw = 2 * x.numel() * 2 / t
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    bm = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = timed(lambda: a @ bm)
    mm = 2 * 8192**3 / t
    RESULTS["ceilings"] = {"card": torch.cuda.get_device_name(0), "copy_GBps": copy_bw / 1e9, "bf16_matmul_TFLOPs": mm / 1e12}
    print(f"ceilings on {RESULTS['ceilings']['card']}: device copy {copy_bw / 1e9:.0f} GB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s")
    return RESULTS["ceilings"]


# ---- stage benchmarks -----------------------------------------------------------------------
def bench_decode(batches: list[int], ctx: int) -> None:
    from epd.models.decode_graphs import DecodeGraphs

    cfg = model_config("llava-1.5-7b")
    rt = ModelRuntime(cfg, {"lm"})
    rt.lm.fuse()
    weights = rt.weight_bytes()["lm"]
    per_tok = rt.kv_bytes_per_token()
    free = torch.cuda.mem_get_info()[0]
    per_seq = -(-(ctx + 16) // 16)
    fit = [b for b in batches if b * per_seq * 16 * per_tok < free - 6e9]
    kv = rt.allocate_kv_cache(max(fit) * per_seq + 1, 16)
    scratch = max(fit) * per_seq
    graphs = DecodeGraphs(rt.lm, kv, 16, scratch, per_seq, sizes=tuple(fit))
    bw = RESULTS["ceilings"]["copy_GBps"] * 1e9
    rows = []
    for b in fit:
        tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(b)]
        graphs.run([11] * b, [ctx] * b, tables)  # fills the static buffers
        graph = graphs.graphs[b][0]
        t = timed(graph.replay, iters=30)
        nbytes = weights + b * (ctx + 1) * per_tok
        rows.append(
            {
                "batch": b,
                "context": ctx,
                "step_ms": t * 1e3,
                "tok_per_s": b / t,
                "GBps": nbytes / t / 1e9,
                "share_of_copy_ceiling": nbytes / t / bw,
            }
        )
        print(
            f"decode B={b:3d} ctx={ctx}: {t * 1e3:.2f} ms/step, {b / t:.0f} tok/s, "
            f"{nbytes / t / 1e9:.0f} GB/s = {nbytes / t / bw:.0%} of the copy ceiling"
        )
    skipped = [b for b in batches if b not in fit]
    RESULTS["decode"] = {"rows": rows, "skipped_batches_no_memory": skipped, "weights_GB": weights / 1e9, "kv_bytes_per_token": per_tok}
    if skipped:
        print(
            f"decode batches {skipped} skipped: their KV ({skipped[0] * (ctx + 16) * per_tok / 1e9:.0f}+ GB) "
            "does not fit next to the weights"
        )


def bench_prefill(lens: list[int]) -> None:
    from epd.models.generate import lm_step

    cfg = model_config("llava-1.5-7b")
    rt = ModelRuntime(cfg, {"lm"})
    rt.lm.fuse()
    shape = ModelShape.of(rt.family, "bfloat16")
    kv = rt.allocate_kv_cache(-(-max(lens) // 16) + 1, 16)
    peak = RESULTS["ceilings"]["bf16_matmul_TFLOPs"] * 1e12
    rows = []
    for n in lens:
        ids = [[(j * 31) % 30000 + 10 for j in range(n)]]
        table = [list(range(-(-n // 16)))]
        t = timed(lambda ids=ids, table=table: lm_step(rt, kv, ids, [0], table, 16), iters=10)
        flops = n * shape.lm_flops_per_token + 0.5 * n * n * shape.attn_flops_coeff + shape.head_flops
        rows.append({"tokens": n, "ms": t * 1e3, "TFLOPs": flops / t / 1e12, "share_of_matmul_ceiling": flops / t / peak})
        print(f"prefill {n:5d} tokens: {t * 1e3:.1f} ms, {flops / t / 1e12:.0f} TFLOP/s = {flops / t / peak:.0%} of the matmul ceiling")
    RESULTS["prefill"] = rows


def bench_encode(counts: list[int]) -> None:
    cfg = model_config("llava-1.5-7b")
    rt = ModelRuntime(cfg, {"vision"})
    shape = ModelShape.of(rt.family, "bfloat16")
    peak = RESULTS["ceilings"]["bf16_matmul_TFLOPs"] * 1e12
    rows = []
    for n in counts:
        px = [torch.randn(1, 3, 336, 336) for _ in range(n)]
        t = timed(lambda px=px: rt.encode(px), iters=10)
        flops = n * shape.vision_flops_per_tile
        rows.append({"images": n, "ms": t * 1e3, "TFLOPs": flops / t / 1e12, "share_of_matmul_ceiling": flops / t / peak})
        print(
            f"encode {n:2d} images 336px: {t * 1e3:.1f} ms, {flops / t / 1e12:.0f} TFLOP/s = {flops / t / peak:.0%} of the matmul ceiling"
        )
    RESULTS["encode"] = rows


# ---- end to end ---------------------------------------------------------------------------
def _covered(spans: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of the spans."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def bench_e2e(
    n_req: int, out_tokens: int, executor: str = "ray", steps_mode: str = "mixed", chunked: bool = True, kv_allocation: str = "on_demand"
) -> None:
    """`executor=ray`: the engine as `epd.run` runs it (driver and worker in separate processes, async
    scheduling, images prepared on the worker's prep threads ahead of their batch); `local`: the
    worker in this process, each batch run at submit."""
    from epd.request import ImageInput, Request, SamplingParams
    from epd.serve.offline import OfflineLLM

    cfg = model_config("llava-1.5-7b")
    probe = ModelRuntime(cfg, {"lm"})
    weights = probe.weight_bytes()["lm"]
    per_tok = probe.kv_bytes_per_token()
    del probe
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info()[0]
    kv_blocks = int((free - 2 * weights - 8e9) // (16 * per_tok))
    gpu = 1 if executor == "ray" else 0
    dep = DeploymentConfig(
        name="aggregated",
        prefill_decode_steps=steps_mode,
        chunked_prefill=chunked,
        kv_allocation=kv_allocation,
        transfer="ipc" if gpu else "local",
        aggregated=PoolConfig(
            kv_blocks=kv_blocks,
            mm_blocks=4096,
            max_prefill_tokens=16384,
            max_decode_seqs=256,
            max_images_per_batch=32,
            num_gpus=gpu,
            num_cpus=8 if gpu else 1,
        ),
    )
    reqs = [
        Request(
            f"r{i}",
            prompt_token_ids=tuple((i * 7 + j) % 30000 + 10 for j in range(24)),
            images=(ImageInput(width=336, height=336, seed=i),),
            sampling=SamplingParams(max_tokens=out_tokens, ignore_eos=True),
        )
        for i in range(n_req)
    ]
    t_start = time.time()
    with OfflineLLM(cfg, dep, executor=executor) as llm:
        ready = time.time() - t_start
        llm.core.new_run()
        torch.cuda.synchronize()
        t0 = time.time()
        outs = llm.generate(reqs)
        elapsed = time.time() - t0
        spans: dict[str, list[tuple[float, float]]] = {}  # time inside the worker per kind of batch (its own spans)
        for b in llm.core.batches:
            spans.setdefault(b.kind, []).append((b.begin, b.end))
        busy = {kind: _covered(v) for kind, v in spans.items()}  # launched decode steps overlap the next: counted once
        host_wait = sum(b.host_wait for b in llm.core.batches)  # encode batches waiting for their images' host preparation
        counts = {kind: len(v) for kind, v in spans.items()}
        # Each kind's batch durations in order: a cold first batch (a size the warm-up never ran) shows here.
        durations = {kind: [round(b - a, 4) for a, b in sorted(v)] for kind, v in spans.items()}
        sizes = {kind: [] for kind in spans}
        for b in sorted(llm.core.batches, key=lambda b: b.begin):
            sizes.setdefault(b.kind, []).append(b.size)
        preempted = sum(1 for e in llm.core.pipeline.events if e.kind.value == "preempted")
    toks = sum(len(o.token_ids) for o in outs)
    # Roofline: every prefill/encode FLOP at the matmul ceiling, every decode step reading weights + KV at the copy ceiling.
    shape = ModelShape.of(llm.core.pipeline.family, "bfloat16")
    peak, bw = RESULTS["ceilings"]["bf16_matmul_TFLOPs"] * 1e12, RESULTS["ceilings"]["copy_GBps"] * 1e9
    prompt = 1 + 576 + 24
    concurrent = min(n_req, 256, kv_blocks // -(-(prompt + out_tokens) // 16))
    flops = n_req * (shape.vision_flops_per_tile + prompt * shape.lm_flops_per_token + 0.5 * prompt**2 * shape.attn_flops_coeff)
    steps = -(-n_req // concurrent) * (out_tokens - 1)
    kv_read = n_req * sum(prompt + i for i in range(1, out_tokens)) * per_tok
    roof = flops / peak + (steps * weights + kv_read) / bw
    print("  time inside workers by batch kind:", {k: round(v, 2) for k, v in busy.items()}, f"of {elapsed:.2f} s;", counts)
    print(f"  of which encode batches waited for host preparation: {host_wait:.2f} s")
    print(f"  sequences preempted: {preempted}")
    for kind, d in durations.items():
        ordered = sorted(d)
        print(f"  {kind}: first {d[0] * 1e3:.0f} ms, p50 {ordered[len(d) // 2] * 1e3:.0f} ms, max {ordered[-1] * 1e3:.0f} ms")
    RESULTS.setdefault("e2e", []).append(
        {
            "executor": executor,
            "prefill_decode_steps": steps_mode,
            "chunked_prefill": chunked,
            "kv_allocation": kv_allocation,
            "batches": counts,
            "preempted": preempted,
            "ready_s": ready,
            "warmup_s": llm.core.warmup_s,
            "out_tokens": out_tokens,
            "busy_s": busy,
            "batch_seconds": durations,
            "batch_sizes": sizes,
            "encode_host_wait_s": host_wait,
            "requests": n_req,
            "output_tokens": toks,
            "seconds": elapsed,
            "output_tok_per_s": toks / elapsed,
            "roofline_seconds": roof,
            "share_of_roofline": roof / elapsed,
            "max_concurrent": concurrent,
            "kv_blocks": kv_blocks,
        }
    )
    print(
        f"engine e2e ({executor}, {steps_mode}, chunked {chunked}, kv {kv_allocation}): "
        f"{n_req} requests x (1 image + 24 tokens -> {out_tokens}), {elapsed:.1f} s, "
        f"{toks / elapsed:.0f} output tok/s; "
        f"roofline {roof:.1f} s -> {roof / elapsed:.0%} of it"
    )


def bench_hf(n_req: int, out_tokens: int, batch: int, cb_requests: int) -> None:
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    from epd.models.runtime import load_family

    hf_cfg = load_family(model_config("llava-1.5-7b")).hf
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlavaForConditionalGeneration(hf_cfg).eval()
    torch.set_default_dtype(torch.float32)
    prompt = [1] + [hf_cfg.image_token_id] * 576 + list(range(100, 124))
    ids = torch.tensor([prompt] * batch, device="cuda")
    px = torch.randn(batch, 3, 336, 336, device="cuda", dtype=torch.bfloat16)
    kw = dict(max_new_tokens=out_tokens, min_new_tokens=out_tokens, do_sample=False)
    with torch.inference_mode():
        model.generate(input_ids=ids[:2], pixel_values=px[:2], max_new_tokens=4)
        torch.cuda.synchronize()
        t0 = time.time()
        for _ in range(n_req // batch):
            model.generate(input_ids=ids, pixel_values=px, **kw)
        torch.cuda.synchronize()
        static = n_req * out_tokens / (time.time() - t0)
    print(f"transformers generate static batch {batch}: {static:.0f} output tok/s")
    RESULTS["hf_static"] = {"batch": batch, "requests": n_req, "output_tok_per_s": static}
    lm_prompts = [[(i * 13 + j) % 30000 + 10 for j in range(600)] for i in range(cb_requests)]
    gen = GenerationConfig(max_new_tokens=out_tokens, min_new_tokens=out_tokens, do_sample=False, eos_token_id=-1)
    try:
        t0 = time.time()
        model.generate_batch(inputs=lm_prompts, generation_config=gen)
        cb = cb_requests * out_tokens / (time.time() - t0)
        print(f"transformers generate_batch ({cb_requests} requests x 600 tokens): {cb:.0f} output tok/s")
        RESULTS["hf_generate_batch"] = {"requests": cb_requests, "output_tok_per_s": cb}
    except Exception as exc:  # the API is young; record why it did not run
        RESULTS["hf_generate_batch"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        print("transformers generate_batch failed:", RESULTS["hf_generate_batch"]["error"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="check,ceil,decode,prefill,encode")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--out-tokens", type=int, default=128)
    ap.add_argument("--out", default=None)
    ap.add_argument("--executor", default="ray", help="e2e: ray (as epd.run runs it) | local (one process)")
    ap.add_argument("--steps", default="mixed", help="e2e: deployment.prefill_decode_steps (mixed | alternate)")
    ap.add_argument("--no-chunked", action="store_true", help="e2e: deployment.chunked_prefill=false")
    ap.add_argument("--kv-allocation", default="on_demand", help="e2e: deployment.kv_allocation (on_demand | reserve: no preemption)")
    args = ap.parse_args()
    sec = set(args.sections.split(","))
    print(f"card: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    if "check" in sec:
        check_kernels()
        check_graphs_match_eager()
        torch.cuda.empty_cache()
    ceilings()
    steps = [
        ("decode", lambda: bench_decode([1, 8, 64, 128, 256], 1024)),
        ("prefill", lambda: bench_prefill([512, 1024, 2048, 4096, 8192])),
        ("encode", lambda: bench_encode([1, 4, 8, 16, 32])),
        ("e2e", lambda: bench_e2e(args.requests, args.out_tokens, args.executor, args.steps, not args.no_chunked, args.kv_allocation)),
        ("hf", lambda: bench_hf(args.requests, args.out_tokens, 64, 64)),
    ]
    for name, step in steps:
        if name in sec:
            step()
            torch.cuda.empty_cache()  # the step's model is gone with its frame
    if args.out:
        Path(args.out).write_text(json.dumps(RESULTS, indent=2))


if __name__ == "__main__":
    main()
