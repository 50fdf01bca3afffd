"""MiniCPM-V (transformers' MiniCPM-V 4.6 architecture): a NaViT SigLIP tower with a window-attention
merger inside it, an MLP merger after it, and a Qwen2 or Llama LM.

An image is sliced as MiniCPM-V's processor slices it: the whole image resized to about
`scale_resolution`^2 pixels (sides multiples of 56), plus, for an image larger than that, a grid of up
to `max_slice_nums` equal slices of the image resized to fit them. Each piece becomes (h/56)(w/56) LM
tokens (two 2x2 merges of 14-px patches): 64 for a 448-px square. In the prompt each image is
`<image>` + its overview's placeholders + `</image>`, then per row of slices `<slice>` + placeholders
+ `</slice>` for each column, rows separated by a newline token, as the processor writes it.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from torch import nn
from transformers import MiniCPMV4_6Config, PretrainedConfig
from transformers.models.minicpmv4_6.modeling_minicpmv4_6 import MiniCPMV4_6Merger, MiniCPMV4_6VisionModel

from epd.config import ModelConfig
from epd.models.family import FAMILIES, ModelFamily, text_hf_kwargs
from epd.models.image_processing import PILOps
from epd.models.varlen_attention import use_grouped_varlen

HALF = (0.5, 0.5, 0.5)  # the processor's IMAGENET_STANDARD mean and std


def _ensure_divide(length: float, divisor: int) -> int:
    return max(round(length / divisor) * divisor, divisor)


def best_resize(height: float, width: float, scale: int, patch: int, upscale: bool) -> tuple[int, int]:
    """(height, width) of one piece: about scale^2 pixels (if larger, or `upscale`), sides multiples of 4 patches."""
    if height * width > scale * scale or upscale:
        aspect = width / height
        height = int(scale / math.sqrt(aspect))
        width = int(height * aspect)
    return _ensure_divide(height, patch * 4), _ensure_divide(width, patch * 4)


def slice_grid(height: int, width: int, max_slices: int, scale: int) -> Optional[tuple[int, int]]:
    """(columns, rows) of slices for a large image, None for one that needs none (the processor's choice)."""
    log_ratio = math.log(width / height)
    multiple = min(math.ceil(width * height / (scale * scale)), max_slices)
    if multiple <= 1:
        return None
    best, best_error = (1, 1), float("inf")
    for n in (multiple - 1, multiple, multiple + 1):
        if n == 1 or n > max_slices:
            continue
        for a in range(1, n + 1):
            if n % a == 0:
                error = abs(log_ratio - math.log(a / (n // a)))
                if error < best_error:
                    best, best_error = (a, n // a), error
    return best  # a: slices across (the width), n // a: down


class SlicedImage(list):
    """An image's pieces, [3, h, w] uint8 each: the overview first, then the slices row by row."""


class MiniCPMVVision(nn.Module):
    def __init__(self, hf: PretrainedConfig):
        super().__init__()
        # attention grouped by piece length: one launch per size, not per piece (`varlen_attention`)
        self.vision_tower = use_grouped_varlen(MiniCPMV4_6VisionModel._from_config(copy.deepcopy(hf.vision_config)))
        self.merger = MiniCPMV4_6Merger(hf)
        self.patch = hf.vision_config.patch_size

    def encode_images(self, images: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """Normalised pieces per image -> [tokens, hidden] per image. Pieces of one size are packed into one
        tower pass (attention stays within each piece; the tower's window merger needs equal sizes in a pass)."""
        pieces = [x for image in images for x in image]
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, x in enumerate(pieces):
            by_size.setdefault(tuple(x.shape[1:]), []).append(i)
        feats: list = [None] * len(pieces)
        for idx in by_size.values():
            for i, f in zip(idx, self._tower([pieces[i] for i in idx])):
                feats[i] = f
        out, at = [], 0
        for image in images:
            out.append(torch.cat(feats[at : at + len(image)]))
            at += len(image)
        return out

    def _tower(self, pieces: list[torch.Tensor]) -> list[torch.Tensor]:
        p = self.patch
        c, h, w = pieces[0].shape
        # NaViT layout: [C, patch, (h/p)*(w/p)*patch], each patch's rows side by side
        flat = torch.cat([x.reshape(c, h // p, p, w // p, p).permute(0, 2, 1, 3, 4).reshape(c, p, -1) for x in pieces], dim=-1)
        target = torch.tensor([(h // p, w // p)] * len(pieces), dtype=torch.int32, device=flat.device)
        hidden = self.vision_tower(flat[None], target_sizes=target).last_hidden_state
        return self.merger(hidden, target // 2)


@FAMILIES.register("minicpmv4_6")
class MiniCPMVFamily(ModelFamily):
    model_type = "minicpmv4_6"
    pixel_mean, pixel_std = HALF, HALF

    @staticmethod
    def build_hf_config(cfg: ModelConfig) -> PretrainedConfig:
        v = cfg.vision
        return MiniCPMV4_6Config(
            vision_config=dict(
                hidden_size=v.hidden_size,
                intermediate_size=v.intermediate_size,
                num_hidden_layers=v.num_layers,
                num_attention_heads=v.num_heads,
                image_size=v.image_size,
                patch_size=v.patch_size,
                hidden_act=v.hidden_act,
                layer_norm_eps=v.layer_norm_eps,
            ),
            text_config=text_hf_kwargs(cfg.text),
            insert_layer_id=cfg.vision_merger_layer,
            image_size=cfg.scale_resolution,
            image_token_id=cfg.image_token_id,
            video_token_id=cfg.video_token_id,
            tie_word_embeddings=cfg.text.tie_word_embeddings,
        )

    def build_vision(self) -> nn.Module:
        return MiniCPMVVision(self.hf)

    @property
    def _patch(self) -> int:
        return self.hf.vision_config.patch_size

    def layout(self, width: int, height: int) -> tuple[tuple[int, int], Optional[tuple[int, int]], Optional[tuple[int, int]]]:
        """((h, w) of the overview, (columns, rows) of slices or None, (h, w) of the refined image or None)."""
        scale, patch = self.cfg.scale_resolution, self._patch
        grid = slice_grid(height, width, self.cfg.max_tiles, scale) if self.cfg.max_tiles > 1 else None
        overview = best_resize(height, width, scale, patch, upscale=grid is None)
        if grid is None:
            return overview, None, None
        across, down = grid
        refine_w, refine_h = _ensure_divide(width, across), _ensure_divide(height, down)  # the processor's get_refine_size
        ph, pw = best_resize(refine_h / down, refine_w / across, scale, patch, upscale=True)
        return overview, grid, (ph * down, pw * across)

    def preprocess(self, image, ops=PILOps) -> SlicedImage:
        width, height = ops.size(image)
        (oh, ow), grid, refined = self.layout(width, height)
        pieces = SlicedImage([ops.tensor(ops.resize(image, (ow, oh)))])
        if grid is not None:
            across, down = grid
            rh, rw = refined
            big = ops.resize(image, (rw, rh))
            sh, sw = rh // down, rw // across
            for top in range(0, rh, sh):
                for left in range(0, rw, sw):
                    pieces.append(ops.tensor(ops.crop(big, (left, top, left + sw, top + sh))))
        return pieces

    def tokens_per_tile(self) -> int:
        """LM tokens of one full slice (scale_resolution^2 pixels): the unit cost models count in."""
        return self._piece_tokens(self.cfg.scale_resolution, self.cfg.scale_resolution)

    def tower_dims(self) -> tuple[int, int, float, int, int, int]:
        """(width, MLP width, layers, tile side, patch side, merger input width), for cost models. Layers
        past the window merger see a quarter of the patches: they count a quarter each."""
        v = self.hf.vision_config
        full = min(self.cfg.vision_merger_layer + 1, v.num_hidden_layers)
        layers = full + (v.num_hidden_layers - full) / 4
        return v.hidden_size, v.intermediate_size, layers, self.cfg.scale_resolution, v.patch_size, 4 * v.hidden_size

    def _piece_tokens(self, h: int, w: int) -> int:
        return (h // self._patch) * (w // self._patch) // 16

    def num_image_tokens(self, width: int, height: int) -> int:
        (oh, ow), grid, refined = self.layout(width, height)
        n = self._piece_tokens(oh, ow)
        if grid is not None:
            rh, rw = refined
            n += grid[0] * grid[1] * self._piece_tokens(rh // grid[1], rw // grid[0])
        return n

    def image_placeholders(self, width: int, height: int, text_ids: list[int]) -> list[int]:
        c, tok = self.cfg, self.image_token_id
        (oh, ow), grid, refined = self.layout(width, height)
        ids = [c.vision_start_token_id, *[tok] * self._piece_tokens(oh, ow), c.vision_end_token_id]
        if grid is not None:
            across, down = grid
            rh, rw = refined
            piece = [c.slice_start_token_id, *[tok] * self._piece_tokens(rh // down, rw // across), c.slice_end_token_id]
            for row in range(down):
                ids += ([c.newline_token_id] if row else []) + piece * across
        return ids
