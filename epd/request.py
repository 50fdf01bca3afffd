"""Requests as users submit them, and their outputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class ImageInput:
    """An image by reference: a local file, encoded bytes, or a procedural image (seeded, no file)."""

    path: Optional[str] = None
    data: Optional[bytes] = None
    width: Optional[int] = None  # procedural images carry their size
    height: Optional[int] = None
    seed: int = 0

    @property
    def is_procedural(self) -> bool:
        return self.path is None and self.data is None


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass(frozen=True)
class Request:
    request_id: str
    arrival_time: float = 0.0  # seconds after the run starts
    prompt: Optional[str] = None
    prompt_token_ids: Optional[tuple[int, ...]] = None  # text tokens; image placeholders are added by the model
    images: tuple[ImageInput, ...] = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class RequestOutput:
    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: Optional[str] = None
    finish_reason: Optional[str] = None  # stop | length | abort
    abort_reason: Optional[str] = None
    prompt_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
