"""Shared test fixtures: the tiny model and deployments, a workload with its single-process reference
outputs, running it through the engine, and tiny checkpoints made with transformers itself."""

from __future__ import annotations

from pathlib import Path

import torch

from epd.config import DeploymentConfig, ModelConfig, PoolConfig, TextModelConfig, VisionTowerConfig
from epd.images import load_image
from epd.models.generate import generate
from epd.models.runtime import ModelRuntime, load_family
from epd.request import ImageInput, Request, SamplingParams
from epd.serve.offline import OfflineLLM
from epd.video import VideoLayout, segments


def tiny_model_config(family: str = "llava", **kw) -> ModelConfig:
    if family == "llava":
        return ModelConfig(name="tiny-llava", family="llava", image_token_id=3, vision=VisionTowerConfig(num_layers=3), **kw)
    return ModelConfig(
        name="tiny-internvl",
        family="internvl",
        image_token_id=3,
        vision_feature_layer=-1,
        max_tiles=6,
        vision=VisionTowerConfig(num_layers=2, layer_norm_eps=1e-6),
        text=TextModelConfig(arch="qwen2", max_position_embeddings=8192, rope_theta=1e6),
        **kw,
    )


def save_hf_checkpoint(family: str, path: Path, seed: int = 0) -> Path:
    """Random transformers model of the tiny shape, save_pretrained'ed; returns the dir."""
    from transformers import InternVLForConditionalGeneration, LlavaForConditionalGeneration

    cfg = tiny_model_config(family)
    hf_cfg = load_family(cfg).hf
    torch.manual_seed(seed)
    cls = LlavaForConditionalGeneration if family == "llava" else InternVLForConditionalGeneration
    model = cls(hf_cfg).eval()
    with torch.no_grad():  # transformers' init leaves some weights tiny: spread them so tokens differ
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    model.save_pretrained(path)
    return path


MODEL = ModelConfig(seed=1)
EPD = DeploymentConfig(
    name="epd",
    encode=PoolConfig(instances=2, mm_blocks=64),
    prefill=PoolConfig(kv_blocks=64),
    decode=PoolConfig(kv_blocks=64, max_decode_seqs=3),
)
PD = DeploymentConfig(name="pd", encode_prefill=PoolConfig(kv_blocks=64), decode=PoolConfig(kv_blocks=64))
AGG = DeploymentConfig(name="aggregated", aggregated=PoolConfig(instances=2, kv_blocks=64))


def workload(n=7):
    return [
        Request(
            f"r{i}",
            prompt_token_ids=tuple(range(20 + i, 26 + 2 * i)),
            images=tuple(ImageInput(width=120 + 10 * i, height=90, seed=100 * i + k) for k in range(i % 4)),
            sampling=SamplingParams(max_tokens=5 + i, ignore_eos=True),
        )
        for i in range(n)
    ]


def one_image_requests(prefix: str, n: int, width: int, height: int, max_tokens: int) -> list[Request]:
    """n greedy requests of a 10-token prompt and one procedural image each (ids prefix0, prefix1, ...)."""
    return [
        Request(
            f"{prefix}{i}",
            prompt_token_ids=tuple(range(20 + i, 30 + i)),
            images=(ImageInput(width=width, height=height, seed=i),),
            sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        )
        for i in range(n)
    ]


def reference(reqs, model=MODEL):
    """The single-process runtime: no engine, no Ray (images resized where `model.image_resize` says)."""
    from epd.models.image_processing import TorchOps, image_tensor

    rt = ModelRuntime(model, {"vision", "lm"})
    prompts, mm, rope = [], [], []
    for r in reqs:
        images = [load_image(im) for im in r.images]
        sizes = [im.size for im in images]
        temporal = rt.family.frames_per_segment
        videos = [VideoLayout.of(v, load_image(v.frames[0]).size, temporal) for v in r.videos]
        prompts.append(rt.family.build_prompt(list(r.prompt_token_ids), sizes, videos))
        rope.append(rt.family.rope_layout(prompts[-1], sizes, videos))
        stacks = [[load_image(f) for f in seg.frames] for i, v in enumerate(r.videos) for seg in segments(v, i, temporal)]
        if model.image_resize == "device":
            pixels = [rt.family.preprocess_frames([image_tensor(f) for f in s], TorchOps) for s in stacks]
            pixels += [rt.family.preprocess(image_tensor(im), TorchOps) for im in images]
        else:
            pixels = [rt.family.preprocess_frames(s) for s in stacks] + [rt.family.preprocess(im) for im in images]
        emb = rt.encode(pixels)
        mm.append(torch.cat(emb) if emb else None)
    return generate(rt, prompts, mm, [r.sampling for r in reqs], rope=rope)


def run(deployment, reqs, executor="ray", model=MODEL):
    with OfflineLLM(model, deployment, executor) as llm:
        outs = llm.generate(reqs)
        llm.core.drain_check()
        info = llm.core.worker_info()
        events = list(llm.core.pipeline.events)
    return {o.request_id: o for o in outs}, info, events
