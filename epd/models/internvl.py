"""InternVL (transformers-native): InternViT tower, pixel-shuffle MLP projector, Qwen2 LM, 448-px tiling."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, InternVLConfig, PretrainedConfig
from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector

from epd.config import ModelConfig
from epd.models.family import FAMILIES, ModelFamily, text_hf_kwargs
from epd.models.image_processing import IMAGENET_MEAN, IMAGENET_STD, PILOps, internvl_preprocess, num_tiles


def pixel_shuffle(x: torch.Tensor, scale: float) -> torch.Tensor:
    """[n, w, h, c] -> [n, w*scale, h*scale, c/scale^2], InternVL's token downsampling."""
    n, w, h, c = x.shape
    x = x.view(n, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale), int(w * scale), int(c / scale**2))
    return x.permute(0, 2, 1, 3).contiguous()


def _side(v) -> int:
    return v[0] if isinstance(v, (list, tuple)) else v


class InternVLVision(nn.Module):
    def __init__(self, hf: PretrainedConfig):
        super().__init__()
        if hf.vision_feature_layer != -1 or hf.vision_feature_select_strategy != "default":
            raise ValueError("InternVL: only vision_feature_layer=-1 with the 'default' strategy is supported")
        self.vision_tower = AutoModel.from_config(hf.vision_config)
        self.multi_modal_projector = InternVLMultiModalProjector(hf)
        self.downsample_ratio = hf.downsample_ratio

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = self.vision_tower(pixel_values=pixels).last_hidden_state[:, 1:]
        n, tokens, c = feats.shape
        side = int(tokens**0.5)
        feats = pixel_shuffle(feats.reshape(n, side, side, c), self.downsample_ratio)
        return self.multi_modal_projector(feats.reshape(n, -1, feats.shape[-1]))


@FAMILIES.register("internvl")
class InternVLFamily(ModelFamily):
    model_type = "internvl"
    pixel_mean, pixel_std = IMAGENET_MEAN, IMAGENET_STD

    @staticmethod
    def build_hf_config(cfg: ModelConfig) -> PretrainedConfig:
        v = cfg.vision
        return InternVLConfig(
            vision_config=dict(
                hidden_size=v.hidden_size,
                intermediate_size=v.intermediate_size,
                num_hidden_layers=v.num_layers,
                num_attention_heads=v.num_heads,
                image_size=[v.image_size, v.image_size],
                patch_size=[v.patch_size, v.patch_size],
                hidden_act="gelu",
                layer_norm_eps=v.layer_norm_eps,
                norm_type=v.norm_type,
                use_qk_norm=v.use_qk_norm,
            ),
            text_config=text_hf_kwargs(cfg.text),
            image_token_id=cfg.image_token_id,
            downsample_ratio=cfg.downsample_ratio,
            projector_hidden_act=cfg.projector_hidden_act,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            tie_word_embeddings=cfg.text.tie_word_embeddings,
        )

    @property
    def tile_size(self) -> int:
        return _side(self.hf.vision_config.image_size)

    @property
    def fixed_tile_side(self) -> int:
        return self.tile_size

    @property
    def max_tiles_per_image(self) -> int:
        return self.cfg.max_tiles + (1 if self.cfg.use_thumbnail and self.cfg.max_tiles > 1 else 0)

    def build_vision(self) -> nn.Module:
        return InternVLVision(self.hf)

    def preprocess(self, image, ops=PILOps) -> torch.Tensor:
        return internvl_preprocess(image, self.tile_size, self.cfg.max_tiles, self.cfg.use_thumbnail, ops)

    def tokens_per_tile(self) -> int:
        side = self.tile_size // _side(self.hf.vision_config.patch_size)
        return int(side * side * self.hf.downsample_ratio**2)

    def num_image_tokens(self, width: int, height: int) -> int:
        return num_tiles(width, height, self.cfg.max_tiles, self.tile_size, self.cfg.use_thumbnail) * self.tokens_per_tile()
