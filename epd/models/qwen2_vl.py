"""Qwen2-VL and Qwen2.5-VL: native-resolution vision towers (2x2 patch merger), a Qwen2 LM with M-RoPE.

An image is resized, aspect kept, to sides that are multiples of 28 with its area between
`model.min_pixels` and `model.max_pixels`; it becomes (H/14)(W/14) patches (each two frames deep) and
a quarter as many LM tokens, so token counts follow the image. The towers are transformers' own
modules; the LM is the paged one, with M-RoPE positions (`epd.models.mrope`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig, Qwen2_5_VLConfig, Qwen2VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from epd.config import ModelConfig, TextModelConfig
from epd.models.family import FAMILIES, ModelFamily, text_hf_kwargs
from epd.models.image_processing import CLIP_MEAN, CLIP_STD, PILOps
from epd.models.mrope import RopeLayout, rope_layout
from epd.models.varlen_attention import use_grouped_varlen
from epd.video import VideoLayout


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The Qwen2-VL processor's target size: sides multiples of `factor`, area within [min, max] pixels."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio must be below 200, got {max(height, width) / min(height, width):.0f} ({width}x{height})")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def patchify(frames: torch.Tensor, patch: int, merge: int, temporal: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """[F, C, H, W] -> ([patches, C*temporal*patch*patch], (t, h, w) in patches), ordered as the tower
    reads them: merge-blocks row by row, the patches of a block together. An image (F = 1) is repeated
    to `temporal` frames; a video's last frame pads it to a multiple of `temporal`."""
    if frames.shape[0] % temporal:
        frames = torch.cat([frames, frames[-1:].expand(temporal - frames.shape[0] % temporal, -1, -1, -1)])
    f, c, height, width = frames.shape
    gt, gh, gw = f // temporal, height // patch, width // patch
    x = frames.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, block rows, block cols, row in block, col in block, C, frame, py, px
    return x.reshape(gt * gh * gw, c * temporal * patch * patch), (gt, gh, gw)


class Qwen2VLVision(nn.Module):
    def __init__(self, hf: PretrainedConfig, tower_cls):
        super().__init__()
        v = hf.vision_config
        # attention grouped by image (or window) length: one launch per size (`varlen_attention`)
        self.visual = use_grouped_varlen(tower_cls._from_config(copy.deepcopy(v)))
        self.patch, self.merge, self.temporal = v.patch_size, v.spatial_merge_size, v.temporal_patch_size

    def encode_images(self, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        """Normalised [frames, 3, H, W] per image -> [tokens, hidden] per image, in one tower pass
        (attention stays within each image)."""
        patches, grids = zip(*(patchify(p, self.patch, self.merge, self.temporal) for p in pixels))
        grid = torch.tensor(grids, device=patches[0].device)
        out = self.visual(torch.cat(patches), grid_thw=grid).pooler_output
        return list(out.split([t * h * w // self.merge**2 for t, h, w in grids]))


class _QwenVLFamily(ModelFamily):
    pixel_mean, pixel_std = CLIP_MEAN, CLIP_STD
    config_cls: type = Qwen2VLConfig
    tower_cls: type = Qwen2VisionTransformerPretrainedModel

    @staticmethod
    def vision_hf_kwargs(cfg: ModelConfig) -> dict:
        raise NotImplementedError

    @classmethod
    def build_hf_config(cls, cfg: ModelConfig) -> PretrainedConfig:
        head_half = cfg.text.hidden_size // cfg.text.num_heads // 2
        section = [head_half // 4, head_half * 3 // 8]  # Qwen2-VL-7B's 16/24/24 of 64, in proportion
        section.append(head_half - sum(section))
        text = text_hf_kwargs(cfg.text)
        del text["model_type"]
        text["rope_parameters"] = dict(text["rope_parameters"], mrope_section=section)
        return cls.config_cls(
            vision_config=cls.vision_hf_kwargs(cfg),
            text_config=text,
            image_token_id=cfg.image_token_id,
            video_token_id=cfg.video_token_id,
            vision_start_token_id=cfg.vision_start_token_id,
            vision_end_token_id=cfg.vision_end_token_id,
            tie_word_embeddings=cfg.text.tie_word_embeddings,
        )

    @property
    def mrope_section(self) -> tuple[int, ...]:
        return tuple(self.hf.text_config.rope_parameters.get("mrope_section", (16, 24, 24)))

    def text_config(self) -> TextModelConfig:
        return dataclasses.replace(super().text_config(), arch="qwen2")

    def build_vision(self) -> nn.Module:
        return Qwen2VLVision(self.hf, self.tower_cls)

    @property
    def _factor(self) -> int:
        v = self.hf.vision_config
        return v.patch_size * v.spatial_merge_size

    @functools.cached_property
    def pixel_bounds(self) -> tuple[int, int]:
        """(min, max) pixels of a resized image: a checkpoint's own processor config where it ships one
        (preprocessor_config.json: min_pixels/max_pixels, or size.shortest_edge/longest_edge), else
        `model.min_pixels` / `model.max_pixels`."""
        low, high = self.cfg.min_pixels, self.cfg.max_pixels
        path = Path(self.cfg.path or "") / "preprocessor_config.json"
        if self.cfg.load_format == "hf" and path.is_file():
            proc = json.loads(path.read_text())
            size = proc.get("size") or {}
            low = int(proc.get("min_pixels") or size.get("shortest_edge") or low)
            high = int(proc.get("max_pixels") or size.get("longest_edge") or high)
        return low, high

    def _resized(self, width: int, height: int) -> tuple[int, int]:
        h, w = smart_resize(height, width, self._factor, *self.pixel_bounds)
        return w, h

    def preprocess(self, image, ops=PILOps) -> torch.Tensor:
        """[1, 3, H', W'] uint8: the image at its processor size (patches are cut on the device)."""
        return ops.tensor(ops.resize(image, self._resized(*ops.size(image))))[None]

    def grid(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(t, h, w, t_step) of one image's LM tokens."""
        w, h = self._resized(width, height)
        return 1, h // self._factor, w // self._factor, 1

    def num_image_tokens(self, width: int, height: int) -> int:
        t, h, w, _ = self.grid(width, height)
        return t * h * w

    def image_placeholders(self, width: int, height: int, text_ids: list[int]) -> list[int]:
        """The placeholders wrapped in vision start/end tokens, as Qwen's chat template writes them,
        unless the text already places those around its image markers."""
        inner = super().image_placeholders(width, height, text_ids)
        if self.hf.vision_start_token_id in text_ids:
            return inner
        return [self.hf.vision_start_token_id, *inner, self.hf.vision_end_token_id]

    # The unit cost models count a native-resolution image in: a 448-px square (1024 patches).
    nominal_tile = 448

    def tokens_per_tile(self) -> int:
        return (self.nominal_tile // self._factor) ** 2

    def tower_dims(self) -> tuple[int, int, int, int, int, int]:
        """(width, MLP width, layers, tile side, patch side, merger input width), for cost models."""
        v = self.hf.vision_config
        width = getattr(v, "embed_dim", None) or v.hidden_size
        # Qwen2.5-VL's MLP is gated (three matrices): counted as a two-matrix MLP half again as wide
        mlp = v.intermediate_size * 3 // 2 if self.model_type == "qwen2_5_vl" else width * v.mlp_ratio
        return width, mlp, v.depth, self.nominal_tile, v.patch_size, width * v.spatial_merge_size**2

    @property
    def frames_per_segment(self) -> int:
        return self.hf.vision_config.temporal_patch_size

    def preprocess_frames(self, frames: list, ops=PILOps) -> torch.Tensor:
        """[frames, 3, H', W'] uint8: one video segment's frames, each resized as an image of its size."""
        return torch.cat([self.preprocess(f, ops) for f in frames])

    def video_grid(self, video: VideoLayout) -> tuple[int, int, int, int]:
        """(t, h, w, t_step) of a video's LM tokens: its segments over one frame's grid."""
        _, h, w, _ = self.grid(video.width, video.height)
        return video.segments, h, w, self.video_time_step(video)

    def video_time_step(self, video: VideoLayout) -> int:
        return 1

    def video_placeholders(self, video: VideoLayout) -> list[int]:
        """Placeholders for every segment, wrapped as an image's are (the placeholder id is the image
        token: the embeddings replace them, whatever their id)."""
        t, h, w, _ = self.video_grid(video)
        return [self.hf.vision_start_token_id, *[self.image_token_id] * (t * h * w), self.hf.vision_end_token_id]

    def tower_attention(self) -> tuple[int, int, int, int, int]:
        """(full-attention layers, windowed layers, patches per window, patches per LM token, width): the
        tower attends over a whole image (Qwen2.5-VL: within windows, but for a few layers)."""
        v = self.hf.vision_config
        width = getattr(v, "embed_dim", None) or v.hidden_size
        full = len(getattr(v, "fullatt_block_indexes", None) or ()) if self.model_type == "qwen2_5_vl" else v.depth
        window = (getattr(v, "window_size", 0) // v.patch_size) ** 2
        return full, v.depth - full, window, v.spatial_merge_size**2, width

    def rope_layout(self, prompt_ids: list[int], image_sizes: list[tuple[int, int]], videos: list = ()) -> RopeLayout:
        grids = [self.video_grid(v) for v in videos] + [self.grid(w, h) for w, h in image_sizes]  # videos come first
        return rope_layout(prompt_ids, self.image_token_id, grids)


@FAMILIES.register("qwen2_vl")
class Qwen2VLFamily(_QwenVLFamily):
    model_type = "qwen2_vl"

    @staticmethod
    def vision_hf_kwargs(cfg: ModelConfig) -> dict:
        v = cfg.vision
        if v.intermediate_size % v.hidden_size:
            raise ValueError(
                f"qwen2_vl: model.vision.intermediate_size ({v.intermediate_size}) must be a multiple of its hidden_size ({v.hidden_size})"
            )
        return dict(
            embed_dim=v.hidden_size,
            depth=v.num_layers,
            num_heads=v.num_heads,
            mlp_ratio=v.intermediate_size // v.hidden_size,
            hidden_size=cfg.text.hidden_size,
            hidden_act=v.hidden_act,
            patch_size=v.patch_size,
            spatial_merge_size=v.spatial_merge_size,
            temporal_patch_size=v.temporal_patch_size,
        )


@FAMILIES.register("qwen2_5_vl")
class Qwen25VLFamily(_QwenVLFamily):
    model_type = "qwen2_5_vl"
    config_cls = Qwen2_5_VLConfig
    tower_cls = Qwen2_5_VisionTransformerPretrainedModel

    @staticmethod
    def vision_hf_kwargs(cfg: ModelConfig) -> dict:
        v = cfg.vision
        every = max(1, v.full_attention_every)
        return dict(
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            depth=v.num_layers,
            num_heads=v.num_heads,
            out_hidden_size=cfg.text.hidden_size,
            hidden_act=v.hidden_act,
            patch_size=v.patch_size,
            spatial_merge_size=v.spatial_merge_size,
            temporal_patch_size=v.temporal_patch_size,
            window_size=v.window_size,
            fullatt_block_indexes=list(range(every - 1, v.num_layers, every)),
            tokens_per_second=v.tokens_per_second,
        )

    def video_time_step(self, video: VideoLayout) -> int:
        """Temporal positions spaced by seconds: tokens_per_second x the seconds one segment spans."""
        seconds = 1 if video.fps is None else int(self.frames_per_segment / video.fps)
        return self.hf.vision_config.tokens_per_second * seconds
