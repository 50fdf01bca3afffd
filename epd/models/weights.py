"""Weights: seeded random ("dummy") or from a local Hugging Face safetensors checkpoint dir.

Only the part a worker needs is read: tensors are selected by name prefix and read one by one.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

# Checkpoint prefixes (old and new transformers layouts) -> module prefix, per part.
PART_PREFIXES: dict[str, list[tuple[str, str]]] = {
    "vision": [
        ("model.vision_tower.", "vision_tower."),
        ("vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("multi_modal_projector.", "multi_modal_projector."),
        ("model.merger.", "merger."),  # MiniCPM-V
        ("merger.", "merger."),
        ("model.visual.", "visual."),  # Qwen2-VL family
        ("visual.", "visual."),
    ],
    "lm": [
        ("model.language_model.", "model."),
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
        ("lm_head.", "lm_head."),
        ("model.", "model."),  # Qwen2-VL family checkpoints: the LM at the top (vision under `visual.`)
    ],
}


class CheckpointError(RuntimeError):
    pass


def checkpoint_files(path: str) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (single file or sharded index)."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {root}")
    index = root / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: root / fname for name, fname in weight_map.items()}
        for f in set(files.values()):
            if not f.exists():
                raise CheckpointError(f"{index} names a missing shard: {f}")
        return files
    single = root / "model.safetensors"
    if not single.exists():
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {root}")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def load_part(module: nn.Module, path: str, part: str) -> None:
    """Fill `module` (already on its device and dtype) with the checkpoint's tensors of `part`."""
    files = checkpoint_files(path)
    wanted = dict(module.state_dict(keep_vars=True))
    loaded: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, fpath in files.items():
        for ck_prefix, mod_prefix in PART_PREFIXES[part]:
            if name.startswith(ck_prefix):
                target = mod_prefix + name[len(ck_prefix) :]
                if target in wanted:  # e.g. vision layers past the feature layer are skipped
                    by_file.setdefault(fpath, []).append((name, target))
                break
    for fpath, pairs in by_file.items():
        with safe_open(fpath, framework="pt", device="cpu") as f:
            for name, target in pairs:
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != tuple(wanted[target].shape):
                    raise CheckpointError(
                        f"{fpath.name}: tensor {name} has shape {tuple(tensor.shape)}, model expects {tuple(wanted[target].shape)}"
                    )
                loaded[target] = tensor
    tied = getattr(getattr(module, "cfg", None), "tie_word_embeddings", False)
    missing = [k for k in wanted if k not in loaded and not (tied and k == "lm_head.weight")]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} tensors of the {part} part, e.g. {missing[:3]}")
    with torch.no_grad():
        params = dict(module.state_dict(keep_vars=True))
        for k, t in loaded.items():
            params[k].copy_(t.to(device=params[k].device, dtype=params[k].dtype))


def init_dummy(module: nn.Module, seed: int) -> None:
    """Seeded random weights, identical on every worker for the same (seed, parameter name, device type)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "lambda" in name:  # InternViT layer scales
                p.fill_(0.1)
            elif p.dim() == 1:  # norm weights
                p.fill_(1.0)
            else:
                gen = torch.Generator(device=p.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                p.normal_(0.0, 0.02, generator=gen)


def param_bytes(module: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total
