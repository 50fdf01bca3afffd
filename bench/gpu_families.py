"""The Qwen2-VL and MiniCPM-V families on one GPU: exactness of the GPU engine (CUDA graphs, M-RoPE) and the real shapes.

    python bench/gpu_families.py --out DIR [--parts exact shapes] [--models qwen2-vl-7b minicpm-v-4.6] [--exact-models tiny-minicpmv4.6]

exact: the tiny configs in float32 on the GPU, in-process engine (decode and step graphs captured), EPD and
  aggregated with chunked prefill, against transformers' `generate` on the same GPU from the same weights
  (saved as a checkpoint): greedy tokens per request, 24 requests of 0-3 images of assorted sizes.
shapes: each real shape with dummy bf16 weights in one process on one GPU (aggregated), weight and cache
  bytes per worker, then a warm batch of requests with photo-sized images: TTFT/TPOT and tokens/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.configs import model_config  # noqa: E402
from epd.config import DeploymentConfig, PoolConfig  # noqa: E402
from epd.images import load_image  # noqa: E402
from epd.metrics import timelines  # noqa: E402
from epd.models.runtime import load_family  # noqa: E402
from epd.request import ImageInput, Request, SamplingParams, VideoInput  # noqa: E402
from epd.serve.offline import OfflineLLM  # noqa: E402
from epd.video import VideoLayout  # noqa: E402
from tests.helpers import reference  # noqa: E402

SIZES = [(120, 90), (61, 200), (300, 300), (640, 480), (1000, 40), (224, 448)]
MINICPM_SIZES = [(120, 90), (300, 200), (640, 480), (450, 450)]


def _image(size: tuple[int, int], seed: int) -> ImageInput:
    return ImageInput(width=size[0], height=size[1], seed=seed)


def _requests(n: int, sizes, max_tokens: int, prefix: str = "r", video_every: int = 0) -> list[Request]:
    """Requests of 0-3 images; with `video_every`, every so many also carry a video of 3-6 frames."""
    return [
        Request(
            f"{prefix}{i}",
            prompt_token_ids=tuple(range(30 + i % 7, 40 + i % 11)),
            images=tuple(_image(sizes[(i + k) % len(sizes)], i * 5 + k) for k in range(i % 4)),
            sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
            videos=(_video(sizes[i % len(sizes)], 3 + i % 4, 1000 + 10 * i),) if video_every and i % video_every == 1 else (),
        )
        for i in range(n)
    ]


def _video(size: tuple[int, int], frames: int, seed: int) -> VideoInput:
    return VideoInput(tuple(_image(size, seed + f) for f in range(frames)), fps=2.0)


def _hf_video_inputs(fam, videos: list[VideoInput], ids: torch.Tensor, kw: dict) -> None:
    """transformers' video inputs for our frames: patches of the frames as the runtime resizes them, the
    videos' placeholders marked as video tokens (their ids are the image token in our prompts)."""
    from epd.models.image_processing import normalize
    from epd.models.qwen2_vl import patchify

    types = (ids == fam.image_token_id).int()
    patches, grids, at = [], [], (ids[0] == fam.image_token_id).nonzero()[0, 0].item()
    for v in videos:
        frames = [load_image(f) for f in v.frames]
        frames += [frames[-1]] * (-len(frames) % fam.frames_per_segment)
        x, (t, h, w) = patchify(normalize(fam.preprocess_frames(frames), fam.pixel_mean, fam.pixel_std), 14, 2, 2)
        patches.append(x)
        grids.append([t, h, w])
        n = t * h * w // 4
        types[0, at : at + n] = 2
        ids[0, at : at + n] = fam.cfg.video_token_id
        rest = (ids[0, at + n :] == fam.image_token_id).nonzero()
        at = at + n + (rest[0, 0].item() if len(rest) else 0)
    kw.update(pixel_values_videos=torch.cat(patches).cuda(), video_grid_thw=torch.tensor(grids).cuda(), mm_token_type_ids=types)
    if fam.model_type == "qwen2_5_vl":
        kw["second_per_grid_ts"] = torch.tensor([fam.frames_per_segment / v.fps for v in videos]).cuda()


def _agreement(got: dict, want: dict) -> dict:
    """Requests with identical tokens, and where the others part ways (token index)."""
    parted = {r: next(i for i, (a, b) in enumerate(zip(got[r], want[r] + [None])) if a != b) for r in want if got[r] != want[r]}
    return {"identical": f"{len(want) - len(parted)}/{len(want)}", "first_difference_at": parted}


def _hf_inputs(fam, images, ids) -> dict:
    """transformers' own processor outputs for `images`, as its `generate` takes them."""
    if fam.model_type == "minicpmv4_6":
        from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil

        px = MiniCPMV4_6ImageProcessorPil(scale_resolution=fam.cfg.scale_resolution, max_slice_nums=fam.cfg.max_tiles)(
            images=images, return_tensors="pt"
        )
        return dict(pixel_values=px["pixel_values"].cuda(), target_sizes=px["target_sizes"].cuda())
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    px = Qwen2VLImageProcessorPil(min_pixels=fam.cfg.min_pixels, max_pixels=fam.cfg.max_pixels)(images=images, return_tensors="pt")
    kw = dict(pixel_values=px["pixel_values"].cuda(), image_grid_thw=px["image_grid_thw"].cuda())
    kw["mm_token_type_ids"] = (ids == fam.image_token_id).int()
    return kw


def exact(name: str) -> dict:
    """Tiny config on the GPU in float32: the engine's greedy tokens vs transformers' from one checkpoint."""
    from transformers import AutoModelForImageTextToText

    base = model_config(name)
    fam = load_family(base)
    torch.manual_seed(0)
    hf = AutoModelForImageTextToText.from_config(fam.hf).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    path = tempfile.mkdtemp()
    hf.save_pretrained(path)
    hf = hf.cuda()
    cfg = dataclasses.replace(base, load_format="hf", path=path, device="cuda", dtype="float32")
    # MiniCPM-V: images whose pieces share one size (transformers' packed tower assumes it)
    minicpm = fam.model_type == "minicpmv4_6"
    reqs = _requests(24, MINICPM_SIZES if minicpm else SIZES, 24, video_every=0 if minicpm else 5)
    ref = {}
    for r in reqs:
        images = [load_image(im) for im in r.images]
        videos = [VideoLayout.of(v, load_image(v.frames[0]).size, fam.frames_per_segment) for v in r.videos]
        prompt = fam.build_prompt(list(r.prompt_token_ids), [im.size for im in images], videos)
        ids = torch.tensor([prompt], device="cuda")
        kw = _hf_inputs(fam, images, ids) if images else {}
        if r.videos:
            _hf_video_inputs(fam, list(r.videos), ids, kw)
        hf.generation_config.eos_token_id = None  # as ignore_eos: EOS may be the argmax, neither suppressed nor stopped at
        with torch.no_grad():
            out = hf.generate(input_ids=ids, max_new_tokens=24, do_sample=False, pad_token_id=0, **kw)
        ref[r.request_id] = out[0, len(prompt) :].tolist()
    del hf
    torch.cuda.empty_cache()
    eager = dataclasses.replace(cfg, cuda_graphs=False, step_graph_tokens=0)
    runtime = dict(zip(ref, reference(reqs, eager)))
    pool = PoolConfig(kv_blocks=512, mm_blocks=256, max_prefill_tokens=64, num_gpus=0)
    epd = DeploymentConfig(name="epd", encode=pool, prefill=pool, decode=pool)
    deployments = {
        "epd": (epd, cfg),
        "epd_no_graphs": (epd, eager),
        "aggregated_chunked": (DeploymentConfig(name="aggregated", aggregated=pool), cfg),
    }
    row = {"model": name, "requests": len(reqs), "with_video": sum(bool(r.videos) for r in reqs)}
    row["runtime_eager_vs_transformers"] = _agreement(runtime, ref)
    for dname, (dep, model) in deployments.items():
        with OfflineLLM(model, dep, executor="local") as llm:
            outs = {o.request_id: o.token_ids for o in llm.generate(reqs)}
        row[f"{dname}_vs_transformers"] = _agreement(outs, ref)
        row[f"{dname}_vs_runtime_eager"] = _agreement(outs, runtime)
    print(json.dumps(row))
    return row


def shapes(name: str, card: str) -> dict:
    cfg = model_config(name)
    dep = DeploymentConfig(name="aggregated", aggregated=PoolConfig(kv_blocks=8192, mm_blocks=1024, max_prefill_tokens=16384))
    photo = [(1280, 960), (1920, 1080), (1024, 768), (800, 1200)]
    fam = load_family(cfg)
    warm = _requests(4, photo, 8, "w")
    reqs = _requests(32, photo, 128)
    with OfflineLLM(cfg, dep, executor="local") as llm:
        workers = llm.core.worker_info()
        llm.generate(warm)
        t0 = time.time()
        outs = llm.generate(reqs)
        wall = time.time() - t0
        ids = {r.request_id for r in reqs}
        tls = {k: v for k, v in timelines(llm.core.pipeline.events).items() if k in ids}
    tokens = sum(len(o.token_ids) for o in outs)
    ttft = [tl.ttft for tl in tls.values() if tl.ttft is not None]
    tpot = [tl.tpot for tl in tls.values() if tl.tpot is not None]
    row = {
        "model": name,
        "card": card,
        "image_tokens": {f"{w}x{h}": fam.num_image_tokens(w, h) for w, h in photo},
        "workers": [{k: (v / 1e9 if k.endswith("bytes") else v) for k, v in w.items()} for w in workers],
        "requests": len(outs),
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tok_per_s": tokens / wall,
        "batch": "32 requests submitted at once, 0-3 photos each, 128 output tokens",
        "ttft_p50_s": statistics.median(ttft) if ttft else None,
        "tpot_p50_s": statistics.median(tpot) if tpot else None,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9,
    }
    print(json.dumps(row))
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", nargs="+", default=["exact", "shapes"])
    ap.add_argument("--models", nargs="+", default=["qwen2-vl-7b", "qwen2.5-vl-7b", "minicpm-v-2.6", "minicpm-v-4.6"])
    ap.add_argument("--exact-models", nargs="+", default=["tiny-qwen2vl", "tiny-qwen2.5vl", "tiny-minicpmv", "tiny-minicpmv4.6"])
    args = ap.parse_args()
    card = torch.cuda.get_device_name(0)
    out = {"card": card, "exact": [], "shapes": []}
    if "exact" in args.parts:
        out["exact"] = [exact(n) for n in args.exact_models]
    if "shapes" in args.parts:
        out["shapes"] = [shapes(n, card) for n in args.models]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_families.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
