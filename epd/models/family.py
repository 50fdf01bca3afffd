"""What a model family provides: its HF config, vision encoder, preprocessing and token counts."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

import torch
from transformers import PretrainedConfig

from epd.config import ModelConfig, TextModelConfig
from epd.models.image_processing import PILOps
from epd.registry import Registry

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class ModelFamily(ABC):
    model_type: str

    def __init__(self, cfg: ModelConfig, hf_config: PretrainedConfig):
        self.cfg = cfg
        self.hf = hf_config

    @staticmethod
    @abstractmethod
    def build_hf_config(cfg: ModelConfig) -> PretrainedConfig:
        """The transformers config for a dummy model of the configured shape."""

    @abstractmethod
    def build_vision(self) -> torch.nn.Module:
        """Vision tower + projector with HF parameter names; `encode(pixels) -> [n, tokens, hidden]`."""

    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]

    @abstractmethod
    def preprocess(self, image, ops=PILOps) -> torch.Tensor:
        """[tiles, 3, S, S] uint8 pixels for one image (normalised with pixel_mean/std on the device).
        `image`: a PIL image (`PILOps`), or a [3, H, W] uint8 tensor resized where it lies (`TorchOps`)."""

    @abstractmethod
    def num_image_tokens(self, width: int, height: int) -> int:
        """Placeholder tokens one image of this size takes in the prompt."""

    @property
    def fixed_tile_side(self) -> Optional[int]:
        """S where every image reaches the tower as [tiles, 3, S, S] (its batches can replay CUDA graphs by
        tile count); None where sizes vary (native-resolution towers)."""
        return None

    @property
    def max_tiles_per_image(self) -> int:
        """The most tower inputs one image of a fixed-tile family makes."""
        return 1

    # M-RoPE sections of the LM's rotary frequencies (time, height, width); None: ordinary RoPE.
    mrope_section: Optional[tuple[int, ...]] = None
    # Video frames the tower encodes together (one segment); None: the family takes no video.
    frames_per_segment: Optional[int] = None

    def rope_layout(self, prompt_ids: list[int], image_sizes: list[tuple[int, int]], videos: list = ()):
        """The sequence's M-RoPE layout (`epd.models.mrope.RopeLayout`); None where positions are indices."""
        return None

    def video_placeholders(self, video) -> list[int]:
        """The prompt tokens of one video (`epd.video.VideoLayout`)."""
        raise ValueError(f"model family {self.model_type!r} takes no video input")

    @property
    def image_token_id(self) -> int:
        return int(self.hf.image_token_id)

    def text_config(self) -> TextModelConfig:
        t = self.hf.text_config
        rope = getattr(t, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope_type {rope.get('rope_type')!r} is not supported (only 'default')")
        eos = t.eos_token_id if t.eos_token_id is not None else self.cfg.text.eos_token_id
        return TextModelConfig(
            **hybrid_fields(t),
            arch=t.model_type,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_layers=t.num_hidden_layers,
            num_heads=t.num_attention_heads,
            num_kv_heads=t.num_key_value_heads,
            vocab_size=t.vocab_size,
            max_position_embeddings=t.max_position_embeddings,
            rope_theta=float(rope.get("rope_theta", getattr(t, "rope_theta", 10000.0))),
            rms_norm_eps=t.rms_norm_eps,
            tie_word_embeddings=bool(getattr(self.hf, "tie_word_embeddings", False) or t.tie_word_embeddings),
            bos_token_id=t.bos_token_id if t.bos_token_id is not None else self.cfg.text.bos_token_id,
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )

    def kv_bytes_per_token(self, dtype: Optional[str] = None) -> int:
        """K and V of one token in every layer, all heads (every tensor-parallel rank together)."""
        t = self.text_config()
        return 2 * len(t.full_attention_layers) * t.num_kv_heads * t.attn_head_dim * DTYPE_BYTES[dtype or self.cfg.dtype]

    def state_bytes_per_sequence(self) -> int:
        """A hybrid LM's per-sequence state (every linear layer's convolution window and recurrent state,
        float32); 0 for LMs whose whole context is paged KV."""
        t = self.text_config()
        if not t.is_hybrid:
            return 0
        return 4 * (t.num_layers - len(t.full_attention_layers)) * linear_state_numel(t)

    def mm_bytes_per_token(self, dtype: Optional[str] = None) -> int:
        """One image token's embedding, as the LM takes it."""
        return self.text_config().hidden_size * DTYPE_BYTES[dtype or self.cfg.dtype]

    def build_prompt(self, text_ids: list[int], image_sizes: list[tuple[int, int]], videos: list = ()) -> list[int]:
        """BOS, each video's and image's placeholders, then the text; or, where the text holds one image
        token per image (a marker, as chat templates place `<image>`), BOS, the videos, and the text with
        each marker expanded to its image's placeholders (a system prompt before the images is then a
        shared prefix)."""
        ids = [self.text_config().bos_token_id]
        for v in videos:
            ids += self.video_placeholders(v)
        tok = self.image_token_id
        if tok not in text_ids:
            for w, h in image_sizes:
                ids += self.image_placeholders(w, h, text_ids)
            return ids + list(text_ids)
        sizes = iter(image_sizes)
        for t in text_ids:
            if t == tok:
                ids += self.image_placeholders(*next(sizes), text_ids)
            else:
                ids.append(t)
        return ids

    def image_placeholders(self, width: int, height: int, text_ids: list[int]) -> list[int]:
        """The prompt tokens that stand for one image (its embeddings replace the placeholder ids)."""
        return [self.image_token_id] * self.num_image_tokens(width, height)


FAMILIES: Registry[type[ModelFamily]] = Registry("model family")


def linear_state_numel(t: TextModelConfig) -> int:
    """One linear-attention layer's state per sequence: the convolution's last inputs, then the recurrent state."""
    conv_dim = 2 * t.linear_num_key_heads * t.linear_key_head_dim + t.linear_num_value_heads * t.linear_value_head_dim
    return (t.linear_conv_kernel_dim - 1) * conv_dim + t.linear_num_value_heads * t.linear_key_head_dim * t.linear_value_head_dim


def hybrid_fields(t: PretrainedConfig) -> dict:
    """A hybrid (linear + full attention) text config's own fields, as TextModelConfig holds them; {} for others."""
    if t.model_type != "qwen3_5_text":
        return {}
    types = list(t.layer_types)
    full = [i for i, kind in enumerate(types) if kind == "full_attention"]
    interval = full[0] + 1 if full else len(types) + 1
    if [i for i in range(len(types)) if (i + 1) % interval == 0] != full:
        raise ValueError(f"layer_types {types}: only a full-attention layer every N layers is supported")
    return dict(
        head_dim=t.head_dim,
        partial_rotary_factor=float((t.rope_parameters or {}).get("partial_rotary_factor", 1.0)),
        full_attention_interval=interval,
        linear_num_key_heads=t.linear_num_key_heads,
        linear_num_value_heads=t.linear_num_value_heads,
        linear_key_head_dim=t.linear_key_head_dim,
        linear_value_head_dim=t.linear_value_head_dim,
        linear_conv_kernel_dim=t.linear_conv_kernel_dim,
    )


def text_hf_kwargs(t: TextModelConfig) -> dict:
    if t.is_hybrid:
        rope = {"rope_type": "default", "rope_theta": t.rope_theta, "partial_rotary_factor": t.partial_rotary_factor}
        return dict(
            _base_text_hf_kwargs(t),
            rope_parameters=rope,
            head_dim=t.attn_head_dim,
            layer_types=["full_attention" if i in t.full_attention_layers else "linear_attention" for i in range(t.num_layers)],
            linear_num_key_heads=t.linear_num_key_heads,
            linear_num_value_heads=t.linear_num_value_heads,
            linear_key_head_dim=t.linear_key_head_dim,
            linear_value_head_dim=t.linear_value_head_dim,
            linear_conv_kernel_dim=t.linear_conv_kernel_dim,
        )
    return _base_text_hf_kwargs(t)


def _base_text_hf_kwargs(t: TextModelConfig) -> dict:
    return dict(
        model_type=t.arch,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads,
        vocab_size=t.vocab_size,
        max_position_embeddings=t.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
        rms_norm_eps=t.rms_norm_eps,
        tie_word_embeddings=t.tie_word_embeddings,
        bos_token_id=t.bos_token_id,
        eos_token_id=t.eos_token_id,
    )
