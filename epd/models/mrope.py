"""Multimodal rotary positions (M-RoPE, Qwen2-VL): three position axes (time, height, width) per token.

Text tokens take one position on all three axes, counting on from the previous token; an image's
(or video's) placeholders take their grid coordinates, offset by where the image starts, and the text
after it continues from there plus the grid's longest side. So a sequence's rotary position is not its
cache position: `RopeLayout` holds what is needed to compute it for any token, prompt or generated,
from a few numbers per image, and travels with the sequence to whichever worker prefills or decodes it.
Past the prompt every axis is the cache position plus `delta`; equal axes make M-RoPE ordinary RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class VisionGrid:
    """One image's (or video's) placeholders: where they start in the prompt and their LM grid."""

    start: int  # index of its first placeholder token in the prompt
    t: int  # temporal patches (1 for an image)
    h: int  # rows of LM tokens (patch rows / spatial merge)
    w: int  # columns of LM tokens
    t_step: int = 1  # temporal position stride (Qwen2.5-VL: tokens per second x seconds per patch)

    @property
    def tokens(self) -> int:
        return self.t * self.h * self.w


@dataclass(frozen=True)
class RopeLayout:
    length: int  # prompt tokens
    grids: tuple[VisionGrid, ...]
    delta: int  # rotary position minus cache position for every token past the prompt

    def positions(self, start: int, end: int) -> torch.Tensor:
        """[3, end - start] rotary positions (time, height, width) of the sequence's tokens [start, end)."""
        if start >= self.length:  # generated tokens only (decode rows): no image to place
            return (torch.arange(start, end, dtype=torch.long) + self.delta).expand(3, -1)
        idx = torch.arange(start, end, dtype=torch.long)
        out = torch.empty(3, end - start, dtype=torch.long)
        is_text = torch.ones_like(idx, dtype=torch.bool)
        text_shift = torch.zeros_like(idx)  # placeholders of earlier images beyond their grids' advance
        shift = 0
        for g in self.grids:
            lo, hi = max(start, g.start), min(end, g.start + g.tokens)
            if lo < hi:
                j = torch.arange(lo - g.start, hi - g.start)
                base = g.start - shift  # where the image starts, as its first token's text position
                out[0, lo - start : hi - start] = base + (j // (g.h * g.w)) * g.t_step
                out[1, lo - start : hi - start] = base + (j // g.w) % g.h
                out[2, lo - start : hi - start] = base + j % g.w
                is_text[lo - start : hi - start] = False
            advance = g.tokens - max(g.h, g.w)
            text_shift += (idx >= g.start + g.tokens).long() * advance
            shift += advance
        out = torch.where(is_text, (idx - text_shift).expand(3, -1), out)
        past = idx >= self.length  # generated tokens: cache position + delta on every axis
        return torch.where(past, (idx + self.delta).expand(3, -1), out)


def rope_layout(prompt_ids: list[int], placeholder: int, grids: list[tuple[int, int, int, int]]) -> RopeLayout:
    """The layout of a prompt whose `placeholder` tokens belong, in order, to images of LM grids
    (t, h, w, t_step): each image takes the next t*h*w placeholders, wherever they lie."""
    starts, found = [], iter(i for i, tok in enumerate(prompt_ids) if tok == placeholder)
    for t, h, w, _ in grids:
        first = next(found, None)
        if first is None:
            raise ValueError(f"the prompt has fewer placeholders than its {len(grids)} images take")
        starts.append(first)
        for _ in range(t * h * w - 1):
            if next(found, None) is None:
                raise ValueError(f"the prompt has fewer placeholders than its {len(grids)} images take")
    if next(found, None) is not None:
        raise ValueError(f"the prompt has more placeholders than its {len(grids)} images take")
    vision = tuple(VisionGrid(s, *g) for s, g in zip(starts, grids))
    top, shift = -1, 0  # the highest position in the prompt, HF's rope delta is top + 1 - length
    for g in vision:
        base = g.start - shift
        top = max(top, base + (g.t - 1) * g.t_step, base + max(g.h, g.w) - 1)
        shift += g.tokens - max(g.h, g.w)
    if prompt_ids and not any(g.start <= len(prompt_ids) - 1 < g.start + g.tokens for g in vision):
        top = max(top, len(prompt_ids) - 1 - shift)  # the last token is text
    return RopeLayout(len(prompt_ids), vision, top + 1 - len(prompt_ids))


def rope_positions(layouts: list[Optional[RopeLayout]], tokens: list[list[int]], starts: list[int]) -> torch.Tensor:
    """[3, total] positions of a step's new tokens, sequence after sequence (no layout: text only)."""
    rows = []
    for layout, seq, s in zip(layouts, tokens, starts):
        if layout is None:
            rows.append(torch.arange(s, s + len(seq), dtype=torch.long).expand(3, -1))
        else:
            rows.append(layout.positions(s, s + len(seq)))
    return torch.cat(rows, dim=1)
