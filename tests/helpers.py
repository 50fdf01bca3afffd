"""Tiny checkpoints made with transformers itself, saved to a temp dir."""

from __future__ import annotations

from pathlib import Path

import torch

from epd.config import ModelConfig, TextModelConfig, VisionTowerConfig
from epd.models.runtime import load_family


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
