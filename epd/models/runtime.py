"""The model a worker holds: only the parts its roles need (vision for E, LM + KV cache for P/D)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Optional

import torch
from transformers import AutoConfig, PretrainedConfig

from epd.config import ModelConfig
from epd.models import internvl, llava, minicpmv, qwen2_vl  # noqa: F401  (registers the families)
from epd.models.family import FAMILIES, ModelFamily
from epd.models.image_processing import normalize
from epd.models.lm import DecoderLM
from epd.models.tower_graphs import TowerGraphs
from epd.models.weights import CheckpointError, init_dummy, load_part, param_bytes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@functools.lru_cache(maxsize=32)
def load_family(cfg: ModelConfig) -> ModelFamily:
    """The family with its HF config: from the checkpoint dir (hf) or built from the shape (dummy).

    Cached: families are read-only descriptions, and the simulator asks for the same one many times.
    """
    if cfg.load_format == "hf":
        if not cfg.path:
            raise CheckpointError("model.load_format=hf needs model.path (a local checkpoint directory)")
        try:
            hf: PretrainedConfig = AutoConfig.from_pretrained(cfg.path, local_files_only=True)
        except OSError as exc:
            raise CheckpointError(f"cannot read config.json of checkpoint {cfg.path}: {exc}") from exc
        family_cls = FAMILIES.get(hf.model_type)
    elif cfg.load_format == "dummy":
        family_cls = FAMILIES.get(cfg.family)
        hf = family_cls.build_hf_config(cfg)
    else:
        raise ValueError(f"model.load_format must be dummy or hf, got {cfg.load_format!r}")
    if cfg.image_resize not in ("host", "device"):
        raise ValueError(f"model.image_resize must be host or device, got {cfg.image_resize!r}")
    family = family_cls(cfg, hf)
    arch = family.text_config().arch
    if arch not in ("llama", "qwen2", "qwen3_5_text"):
        raise ValueError(f"language model type {arch!r} is not supported (llama, qwen2, qwen3_5_text)")
    return family


@contextlib.contextmanager
def _building(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(old)


class ModelRuntime:
    def __init__(self, cfg: ModelConfig, parts: set[str], device: Optional[str] = None):
        self.cfg = cfg
        self.family = load_family(cfg)
        self.text_cfg = self.family.text_config()
        self.device = resolve_device(device or cfg.device)
        self.dtype = DTYPES[cfg.dtype]
        self.tp = 1  # tensor-parallel ranks the LM is split over (see shard_lm)
        self.vision = None
        self.tower_graphs: Optional[TowerGraphs] = None  # `capture_tower_graphs`
        self.lm: Optional[DecoderLM] = None
        if "vision" in parts:
            self.vision = self._build(self.family.build_vision, "vision")
        if "lm" in parts:
            self.lm = self._build(self._make_lm, "lm")

    def _make_lm(self) -> DecoderLM:
        if self.text_cfg.is_hybrid:
            from epd.models.hybrid_lm import HybridLM

            return HybridLM(self.text_cfg)
        return DecoderLM(self.text_cfg, self.family.mrope_section)

    def _build(self, make, part: str):
        with _building(self.device, self.dtype):
            module = make()
        if self.cfg.load_format == "hf":
            load_part(module, self.cfg.path, part)
        else:
            init_dummy(module, self.cfg.seed + (0 if part == "vision" else 1))
        return module.eval()

    @property
    def parts(self) -> set[str]:
        return {p for p, m in (("vision", self.vision), ("lm", self.lm)) if m is not None}

    def set_parts(self, parts: set[str]) -> dict[str, str]:
        """Hold exactly `parts` on the device (a role switch). Parts let go of are kept in host memory,
        so taking them back is a host-to-device copy, not a reread of the checkpoint."""
        how = {}
        self._host = getattr(self, "_host", {})
        if "vision" not in parts:
            self.tower_graphs = None
        for part in self.parts - parts:
            self._host[part] = getattr(self, part).to("cpu")
            setattr(self, part, None)
        for part in parts - self.parts:
            if part in self._host:
                setattr(self, part, self._host.pop(part).to(self.device))
                how[part] = "host copy"
            else:
                setattr(self, part, self._build(self.family.build_vision if part == "vision" else self._make_lm, part))
                how[part] = "built"
        for part in parts - set(how):
            how[part] = "kept"
        return how

    def capture_tower_graphs(self, max_tiles: int, capture: bool = True) -> bool:
        """Encode batches replay the tower from CUDA graphs (`tower_graphs`); False where the family's
        images vary in size or nothing holds the tower. `capture=False`: the same pieces, eagerly (CPU)."""
        side = self.family.fixed_tile_side
        if self.vision is None or side is None or max_tiles < 1:
            self.tower_graphs = None
            return False
        self.tower_graphs = TowerGraphs(self.vision.encode, (3, side, side), self.dtype, self.device, max_tiles, capture)
        return True

    def shard_lm(self, rank: int, tp: int, group) -> None:
        assert self.lm is not None
        self.lm.shard(rank, tp, group)
        self.tp = tp
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the full-width weights built before slicing

    # ---- sizes -------------------------------------------------------------------------
    def weight_bytes(self) -> dict[str, int]:
        return {
            "vision": param_bytes(self.vision) if self.vision is not None else 0,
            "lm": param_bytes(self.lm) if self.lm is not None else 0,
        }

    @property
    def hidden_size(self) -> int:
        return self.text_cfg.hidden_size

    def kv_bytes_per_token(self) -> int:
        """On this worker: its share of the heads under tensor parallelism."""
        return self.family.kv_bytes_per_token() // self.tp

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> torch.Tensor:
        t = self.text_cfg
        shape = (len(t.full_attention_layers), 2, num_blocks, block_size, t.num_kv_heads // self.tp, t.attn_head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def allocate_state_pool(self, slots: int) -> Optional[torch.Tensor]:
        """A hybrid LM's per-sequence states, [slots, 1, numel] float32 (one row a sequence, laid out as the
        MM cache is, so transfers move a slot as they move an MM block); None for other LMs."""
        numel = self.family.state_bytes_per_sequence() // 4 // self.tp  # this rank's heads
        if not numel:
            return None
        return torch.zeros((slots, 1, numel), dtype=torch.float32, device=self.device)

    def allocate_mm_cache(self, num_blocks: int, block_tokens: int) -> torch.Tensor:
        return torch.zeros((num_blocks, block_tokens, self.hidden_size), dtype=self.dtype, device=self.device)

    # ---- compute -----------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        """pixels: per image [tiles, 3, S, S] -> per image [tokens, hidden] (tiles flattened).

        uint8 pixels (from `family.preprocess`) are normalised here, on the device; float pixels
        are taken as already normalised. Families whose images differ in size (Qwen2-VL: [frames,
        3, H, W]) take the list as it is (`encode_images`).
        """
        assert self.vision is not None, "this runtime holds no vision part"
        if not pixels:
            return []
        if hasattr(self.vision, "encode_images"):
            return self.vision.encode_images([self._on_device(p) for p in pixels])
        tower = self.tower_graphs or self.vision.encode
        feats = tower(self._normalized(self._batch_on_device(pixels)))
        out, start = [], 0
        for p in pixels:
            out.append(feats[start : start + p.shape[0]].reshape(-1, feats.shape[-1]))
            start += p.shape[0]
        return out

    def _batch_on_device(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """The images' tiles as one batch on the device; host tiles go through pinned memory, so the copy
        does not hold the host while the GPU is busy (a pageable copy is staged synchronously)."""
        if self.device.type != "cuda" or any(p.is_cuda for p in pixels):
            return torch.cat([p.to(self.device) for p in pixels])
        shape = (sum(p.shape[0] for p in pixels), *pixels[0].shape[1:])
        staged = torch.cat(pixels, out=torch.empty(shape, dtype=pixels[0].dtype, pin_memory=True))
        return staged.to(self.device, non_blocking=True)

    def _on_device(self, pixels):
        """One image's pixels (a tensor, or a list of pieces: MiniCPM-V's slices) normalised on the device."""
        if isinstance(pixels, list):
            return [self._on_device(p) for p in pixels]
        return self._normalized(pixels.to(self.device, non_blocking=True))

    def _normalized(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.dtype == torch.uint8:
            batch = normalize(batch, self.family.pixel_mean, self.family.pixel_std)
        return batch.to(self.dtype)
