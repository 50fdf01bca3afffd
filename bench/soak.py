"""Soak: many requests with images through the server, the process's resident memory sampled as they go.

    python bench/soak.py --requests 20000 --out soak.json
    python bench/soak.py --offline --requests 20000 --every 500 --out soak_offline.json   # OfflineLLM.generate calls

One process holds the server (uvicorn on loopback), the engine (tiny LLaVA, EPD, in-process workers,
as `python -m epd.serve backend.kind=local` runs) and the client (httpx, `--concurrency` streams at
once). Each request carries its own PNG (a different image each time), a short prompt, and asks for
a few tokens. Resident memory (from /proc) is sampled every `--every` requests; the summary is the
growth between the sample after warm-up (the first tenth) and the last.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import io
import json
import os
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from epd.config import DeploymentConfig, ModelConfig, PoolConfig, RunConfig, ServerConfig  # noqa: E402
from epd.serve.app import build_app  # noqa: E402
from epd.serve.async_llm import AsyncLLM  # noqa: E402
from tests.serving import LiveServer  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def png_url(seed: int) -> str:
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(48, 160)), int(rng.integers(48, 160))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)).resize((w, h)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def drive(url: str, n: int, concurrency: int, every: int, samples: list, counts: dict) -> None:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                content = [{"type": "text", "text": f"describe picture {i}"}, {"type": "image_url", "image_url": {"url": png_url(i)}}]
                body = {"messages": [{"role": "user", "content": content}], "max_tokens": 6, "temperature": 0}
                r = await client.post("/v1/chat/completions", json=body)
                counts[r.status_code] = counts.get(r.status_code, 0) + 1
                done = sum(counts.values())
                if done % every == 0:
                    gc.collect()
                    samples.append({"requests": done, "rss_mb": rss_mb(), "t": time.time()})
                    print(f"  {done:6d} requests  rss {samples[-1]['rss_mb']:.1f} MB", flush=True)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def soak_server(n: int, concurrency: int, every: int) -> tuple[list, dict, dict]:
    dep = DeploymentConfig(name="epd", encode=PoolConfig(), prefill=PoolConfig(kv_blocks=512), decode=PoolConfig(kv_blocks=512))
    llm = AsyncLLM(ModelConfig(), dep, "local", retain_finished=False)
    cfg = RunConfig(deployment=dep, server=ServerConfig(max_concurrent_requests=concurrency * 2))
    server = LiveServer(build_app(cfg, llm))
    samples: list = [{"requests": 0, "rss_mb": rss_mb(), "t": time.time()}]
    counts: dict = {}
    try:
        asyncio.run(drive(server.url, n, concurrency, every, samples, counts))
    finally:
        server.stop()
        held = {"states": len(llm.core.pipeline.states), "outputs": len(llm.core.pipeline.outputs), "events": len(llm.core.pipeline.events)}
        llm.close()
    return samples, counts, held


def soak_offline(n: int, every: int) -> tuple[list, dict, dict]:
    """The offline engine over many `generate` calls of `every` requests each."""
    from epd.request import ImageInput, Request, SamplingParams
    from epd.serve.offline import OfflineLLM

    dep = DeploymentConfig(name="epd", encode=PoolConfig(), prefill=PoolConfig(kv_blocks=512), decode=PoolConfig(kv_blocks=512))
    samples: list = [{"requests": 0, "rss_mb": rss_mb(), "t": time.time()}]
    counts: dict = {}
    with OfflineLLM(ModelConfig(), dep, "local") as llm:
        for start in range(0, n, every):
            reqs = [
                Request(
                    f"o{i}",
                    prompt_token_ids=tuple(10 + (i + j) % 300 for j in range(8 + i % 16)),
                    images=(ImageInput(data=base64.b64decode(png_url(i).split(",", 1)[1])),),
                    sampling=SamplingParams(max_tokens=6, ignore_eos=True),
                )
                for i in range(start, min(n, start + every))
            ]
            for o in llm.generate(reqs):
                counts[o.finish_reason] = counts.get(o.finish_reason, 0) + 1
            gc.collect()
            samples.append({"requests": start + len(reqs), "rss_mb": rss_mb(), "t": time.time()})
            print(f"  {samples[-1]['requests']:6d} requests  rss {samples[-1]['rss_mb']:.1f} MB", flush=True)
        held = {"states": len(llm.core.pipeline.states), "outputs": len(llm.core.pipeline.outputs), "events": len(llm.core.pipeline.events)}
    return samples, counts, held


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--offline", action="store_true", help="the offline engine (OfflineLLM.generate calls) instead of the server")
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--every", type=int, default=1000)
    ap.add_argument("--out", default="soak.json")
    args = ap.parse_args()
    start = time.time()
    if args.offline:
        samples, counts, held = soak_offline(args.requests, args.every)
    else:
        samples, counts, held = soak_server(args.requests, args.concurrency, args.every)
    warm = samples[max(1, len(samples) // 10)]
    last = samples[-1]
    result = {
        "mode": "offline" if args.offline else "server",
        "requests": args.requests,
        "concurrency": args.concurrency,
        "status_counts": counts,
        "seconds": time.time() - start,
        "rss_after_warmup_mb": warm["rss_mb"],
        "rss_last_mb": last["rss_mb"],
        "growth_after_warmup_mb": last["rss_mb"] - warm["rss_mb"],
        "growth_per_1000_requests_kb": (last["rss_mb"] - warm["rss_mb"]) * 1024 / max(1, (last["requests"] - warm["requests"]) / 1000),
        "engine_holds_at_end": held,
        "samples": samples,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        f"{args.requests} requests in {result['seconds']:.0f} s {counts}; rss {warm['rss_mb']:.1f} MB after warm-up "
        f"-> {last['rss_mb']:.1f} MB at the end ({result['growth_per_1000_requests_kb']:.1f} KB per 1000 requests); held {held}"
    )


if __name__ == "__main__":
    main()
