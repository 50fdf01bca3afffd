"""LLaVA-1.5: CLIP ViT tower (features of layer -2, CLS dropped), 2-layer MLP projector, Llama LM."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoModel, CLIPVisionConfig, LlavaConfig, PretrainedConfig
from transformers.activations import QuickGELUActivation
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from epd.config import ModelConfig
from epd.kernels.fused import QuickGELU
from epd.models.family import FAMILIES, ModelFamily, text_hf_kwargs
from epd.models.image_processing import CLIP_MEAN, CLIP_STD, PILOps, clip_preprocess


class LlavaVision(nn.Module):
    def __init__(self, hf: PretrainedConfig):
        super().__init__()
        layer = hf.vision_feature_layer
        if not isinstance(layer, int) or hf.vision_feature_select_strategy != "default":
            raise ValueError("only an int vision_feature_layer with the 'default' select strategy is supported")
        vcfg = copy.deepcopy(hf.vision_config)
        # Layers after the feature layer never influence the output: don't build them.
        vcfg.num_hidden_layers = layer % (vcfg.num_hidden_layers + 1)
        self.vision_tower = AutoModel.from_config(vcfg)
        if vcfg.hidden_act == "quick_gelu":  # the same function, one kernel instead of three on CUDA
            for module in self.vision_tower.modules():
                if isinstance(getattr(module, "activation_fn", None), QuickGELUActivation):
                    module.activation_fn = QuickGELU()
        self.multi_modal_projector = LlavaMultiModalProjector(hf)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = self.vision_tower(pixel_values=pixels).last_hidden_state[:, 1:]
        return self.multi_modal_projector(feats)


@FAMILIES.register("llava")
class LlavaFamily(ModelFamily):
    model_type = "llava"
    pixel_mean, pixel_std = CLIP_MEAN, CLIP_STD

    @staticmethod
    def build_hf_config(cfg: ModelConfig) -> PretrainedConfig:
        v = cfg.vision
        vision = CLIPVisionConfig(
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_layers,
            num_attention_heads=v.num_heads,
            image_size=v.image_size,
            patch_size=v.patch_size,
            hidden_act=v.hidden_act,
            layer_norm_eps=v.layer_norm_eps,
            projection_dim=v.hidden_size,
        )
        return LlavaConfig(
            vision_config=vision,
            text_config=text_hf_kwargs(cfg.text),
            image_token_id=cfg.image_token_id,
            projector_hidden_act=cfg.projector_hidden_act,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy="default",
            image_seq_length=(v.image_size // v.patch_size) ** 2,
            tie_word_embeddings=cfg.text.tie_word_embeddings,
        )

    def build_vision(self) -> nn.Module:
        return LlavaVision(self.hf)

    def preprocess(self, image, ops=PILOps) -> torch.Tensor:
        return clip_preprocess(image, self.hf.vision_config.image_size, ops)

    @property
    def fixed_tile_side(self) -> int:
        return self.hf.vision_config.image_size

    def num_image_tokens(self, width: int, height: int) -> int:
        v = self.hf.vision_config
        return (v.image_size // v.patch_size) ** 2
