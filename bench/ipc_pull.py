"""MM cache pulls through the `ipc` transfer backend, as a prefill worker does them, on 3+ GPUs:

    python bench/ipc_pull.py --out DIR

Two encode-like processes (GPUs 1 and 2) hold MM caches of 512 KiB blocks (64 tokens x 4096,
bf16) and export them; a prefill-like process (GPU 0) maps them and pulls a request's images with
`IPCTransfer.recv_many`, timed as the engine times it (wall clock from the call to a device
synchronize). Images are LLaVA-1.5 (576 tokens, 9 blocks) or InternVL2 (3,328 tokens, 52
blocks), each at a random place in both caches, from one sender or split over two (intra-request
parallelism). For every case: the csrc kernel with its device-sized chunks and with the former
fixed 256 KiB chunks, the same bytes copied by cudaMemcpyPeer (torch, one copy per image: the
ceiling), pulls back to back ("hot") and after 50 ms idle ("idle"). Every pull is checked.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from epd.csrc import block_ops  # noqa: E402
from epd.transfer.base import Endpoint, TransferHandle  # noqa: E402
from epd.transfer.ipc import IPCTransfer, _torch_open  # noqa: E402

BLOCK_TOKENS, HIDDEN, CACHE_BLOCKS = 64, 4096, 2048  # 1 GiB per cache
MODELS = {"llava": 9, "internvl": 52}  # blocks per image


def _sender(gpu: int, name: str, exports, stop) -> None:
    torch.cuda.set_device(gpu)
    cache = torch.randn(CACHE_BLOCKS, BLOCK_TOKENS, HIDDEN, device=gpu).to(torch.bfloat16)
    t = IPCTransfer()
    t.bind(Endpoint(name), {"mm": cache})
    exports.put((name, t.export()))
    stop.wait()
    t.shutdown()


def _placements(rng: random.Random, images: int, per_image: int) -> list[list[int]]:
    """Each image's blocks: consecutive, at a random free place (as the block allocator leaves them)."""
    starts = rng.sample(range(CACHE_BLOCKS // per_image), images)
    return [list(range(s * per_image, (s + 1) * per_image)) for s in starts]


def _timed(fn, repeats: int, idle_s: float, device: int) -> float:
    fn()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        if idle_s:
            time.sleep(idle_s)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _case(
    t: IPCTransfer, dst: torch.Tensor, views: dict, names: list[str], rng: random.Random, model: str, images: int, senders: int
) -> dict:
    per_image = MODELS[model]
    src = _placements(rng, images, per_image)
    dst_blocks = _placements(rng, images, per_image)
    owner = [names[i % senders] for i in range(images)]
    pulls = [(TransferHandle(owner[i], "mm", src[i], per_image * BLOCK_TOKENS), dst_blocks[i]) for i in range(images)]
    nbytes = images * per_image * BLOCK_TOKENS * HIDDEN * 2
    row = {"model": model, "images": images, "senders": senders, "MB": nbytes / 1e6}

    def pull():
        t.recv_many(pulls)

    def peer_copy():
        for i in range(images):
            dst[dst_blocks[i][0] : dst_blocks[i][-1] + 1].copy_(views[owner[i]][src[i][0] : src[i][-1] + 1], non_blocking=True)

    for label, chunk in (("auto", 0), ("chunk256k", 256 * 1024)):
        t.chunk_bytes = chunk
        dst.zero_()
        pull()
        torch.cuda.synchronize(0)
        row[f"{label}_exact"] = all(torch.equal(dst[dst_blocks[i]], views[owner[i]][src[i]].to(0)) for i in range(images))
        for mode, idle in (("hot", 0.0), ("idle", 0.05)):
            row[f"{label}_{mode}_GBps"] = nbytes / _timed(pull, 15 if idle else 30, idle, 0) / 1e9
    t.chunk_bytes = 0
    for mode, idle in (("hot", 0.0), ("idle", 0.05)):
        row[f"memcpy_peer_{mode}_GBps"] = nbytes / _timed(peer_copy, 15 if idle else 30, idle, 0) / 1e9
    row["auto_vs_memcpy_hot"] = row["auto_hot_GBps"] / row["memcpy_peer_hot_GBps"]
    return row


def _receiver(peers: dict, out: dict) -> None:
    torch.cuda.set_device(0)
    dst = torch.empty(CACHE_BLOCKS, BLOCK_TOKENS, HIDDEN, dtype=torch.bfloat16, device=0)
    t = IPCTransfer()
    t.bind(Endpoint("p"), {"mm": dst})
    t.connect({Endpoint(n): ex for n, ex in peers.items()})
    views = {n: _torch_open(ex["mm"]["torch"], ex["mm"]["shape"], ex["mm"]["dtype"]) for n, ex in peers.items()}
    rng = random.Random(0)
    rows = []
    for model in MODELS:
        for images in (1, 2, 4, 6, 8):
            for senders in (1, 2)[: min(2, images)]:
                row = _case(t, dst, views, sorted(peers), rng, model, images, senders)
                rows.append(row)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    out["rows"] = rows
    t.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if torch.cuda.device_count() < 3:
        raise SystemExit("bench/ipc_pull.py needs 3 GPUs (two senders, one receiver)")
    ops = block_ops()  # build once, before the processes start
    if ops is None or not ops.has_cuda():
        raise SystemExit("bench/ipc_pull.py needs the csrc extension built with CUDA")
    ctx = mp.get_context("spawn")
    exports, stop = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_sender, args=(gpu, f"e{gpu}", exports, stop)) for gpu in (1, 2)]
    for p in procs:
        p.start()
    try:
        peers = dict(exports.get(timeout=300) for _ in procs)
        command = "python bench/ipc_pull.py " + " ".join(sys.argv[1:])
        result = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__, "command": command}
        _receiver(peers, result)
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=60)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ipc_pull.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
