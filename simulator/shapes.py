"""FLOPs and bytes of each stage, from the model's configuration alone (no weights built)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from epd.models.family import DTYPE_BYTES, ModelFamily


def _side(v) -> int:
    return v[0] if isinstance(v, (list, tuple)) else v


def _vision_dims(family: ModelFamily) -> tuple[int, int, int, int, int, int]:
    """(width, MLP width, layers, tile side, patch side, projector input width) of the vision tower. A
    "tile" is one fixed-size tower input; native-resolution towers (Qwen2-VL) count 448-px squares."""
    if hasattr(family, "tower_dims"):
        return family.tower_dims()
    v = family.hf.vision_config
    proj_in = v.hidden_size * (4 if family.model_type == "internvl" else 1)
    return v.hidden_size, v.intermediate_size, v.num_hidden_layers, _side(v.image_size), _side(v.patch_size), proj_in


@dataclass(frozen=True)
class ModelShape:
    dtype_bytes: int
    # vision: per tile (one tower forward over one image or tile)
    vision_params: int
    vision_flops_per_tile: float
    pixels_per_tile: int
    tokens_per_tile: int
    # language model
    lm_params: int  # all, incl. embeddings and head
    lm_flops_per_token: float  # 2 x matmul params (no embedding lookup, no head)
    head_flops: float  # per sampled position
    attn_flops_coeff: float  # x (query positions x key positions)
    kv_bytes_per_token: int
    mm_bytes_per_token: int
    # Native-resolution towers (Qwen2-VL): attention spans a whole image, so its cost is per image,
    # quadratic in its patches, and left out of the per-tile FLOPs. (full-attention layers, windowed
    # layers, patches per window, patches per LM token, tower width); () for towers of fixed tiles.
    native_attention: tuple = ()
    encoder_scale: float = 1.0  # what-if: the tower's FLOPs and weights times this (`backend.sim_encoder_scale`)
    state_bytes_per_seq: int = 0  # a hybrid LM's linear layers' state: read and written by every step of a sequence
    linear_layers: int = 0  # a hybrid LM's linear-attention layers

    def image_attention_flops(self, tokens: int) -> float:
        """Attention FLOPs of one image of `tokens` LM tokens in a native-resolution tower (0 otherwise)."""
        if not self.native_attention:
            return 0.0
        full, windowed, window, per_token, width = self.native_attention
        p = tokens * per_token
        return self.encoder_scale * 4.0 * width * (full * p * p + windowed * p * min(p, window))

    def with_encoder_scale(self, k: float) -> ModelShape:
        """The same model with a vision tower k times as costly (FLOPs and weights; the tokens it makes unchanged)."""
        return replace(
            self,
            vision_params=round(self.vision_params * k),
            vision_flops_per_tile=self.vision_flops_per_tile * k,
            encoder_scale=self.encoder_scale * k,
        )

    def encoder_to_lm_ratio(self, tokens_per_image: int) -> float:
        """An image's tower FLOPs over the LM's prefill FLOPs for its tokens: where EPD's premise stands."""
        tiles = max(1, round(tokens_per_image / self.tokens_per_tile))
        tower = tiles * self.vision_flops_per_tile + self.image_attention_flops(tokens_per_image)
        return tower / (tokens_per_image * self.lm_flops_per_token)

    @staticmethod
    def of(family: ModelFamily, dtype: str) -> ModelShape:
        nbytes = DTYPE_BYTES[dtype]
        hv, iv, lv, tile, patch, proj_in = _vision_dims(family)
        n = (tile // patch) ** 2 + 1
        layer = 4 * hv * hv + 2 * hv * iv
        vision_params = lv * layer + 3 * patch**2 * hv
        t = family.text_config()
        h, kvd = t.hidden_size, t.num_kv_heads * (t.hidden_size // t.num_heads)
        proj_params = proj_in * h + h * h
        tokens_per_tile = family.tokens_per_tile() if hasattr(family, "tokens_per_tile") else family.num_image_tokens(tile, tile)
        native = family.tower_attention() if hasattr(family, "tower_attention") else ()
        attention = 0 if native else 4 * lv * hv * n * n  # native towers: per image (`image_attention_flops`)
        vision_flops = 2 * lv * layer * n + attention + 2 * proj_params * tokens_per_tile
        body = t.num_layers * (2 * h * h + 2 * h * kvd + 3 * h * t.intermediate_size)
        attn_layers, state_flops, linear_layers = t.num_layers, 0.0, 0
        if t.is_hybrid:  # gated full attention on some layers, Gated DeltaNet on the rest
            full, linear = len(t.full_attention_layers), t.num_layers - len(t.full_attention_layers)
            q_width, kv_width = t.num_heads * t.attn_head_dim, t.num_kv_heads * t.attn_head_dim
            key, value = t.linear_num_key_heads * t.linear_key_head_dim, t.linear_num_value_heads * t.linear_value_head_dim
            full_proj = h * 2 * q_width + 2 * h * kv_width + q_width * h
            linear_proj = h * (2 * key + value) + h * value + 2 * h * t.linear_num_value_heads + value * h
            body = full * full_proj + linear * linear_proj + t.num_layers * 3 * h * t.intermediate_size
            attn_layers, h_attn, linear_layers = full, q_width, linear
            # each token decays, corrects and reads every value head's key x value state
            state_flops = 6.0 * linear * t.linear_num_value_heads * t.linear_key_head_dim * t.linear_value_head_dim
        else:
            h_attn = h
        return ModelShape(
            dtype_bytes=nbytes,
            vision_params=vision_params + proj_params,
            vision_flops_per_tile=float(vision_flops),
            pixels_per_tile=tile**2,
            tokens_per_tile=tokens_per_tile,
            lm_params=body + 2 * t.vocab_size * h,
            lm_flops_per_token=2.0 * body + state_flops,
            head_flops=2.0 * t.vocab_size * h,
            attn_flops_coeff=4.0 * attn_layers * h_attn,
            kv_bytes_per_token=family.kv_bytes_per_token(dtype),
            state_bytes_per_seq=family.state_bytes_per_sequence(),
            linear_layers=linear_layers,
            mm_bytes_per_token=family.mm_bytes_per_token(dtype),
            native_attention=tuple(native),
        )
