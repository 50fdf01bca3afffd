"""What the driver's pipeline needs to know of a model: its text model, how many placeholder tokens
an image takes, how a prompt is laid out (and its M-RoPE positions), and bytes per token. `epd.models.family.ModelFamily`
provides it; the pipeline sees only this, so it imports no model code (nor torch)."""

from __future__ import annotations

from typing import Any, Optional, Protocol

from epd.config import TextModelConfig


class ModelView(Protocol):
    @property
    def image_token_id(self) -> int: ...

    def text_config(self) -> TextModelConfig: ...

    def num_image_tokens(self, width: int, height: int) -> int: ...

    model_type: str
    frames_per_segment: Optional[int]  # video frames encoded together; None: the family takes no video

    def build_prompt(self, text_ids: list[int], image_sizes: list[tuple[int, int]], videos: list = ()) -> list[int]: ...

    def rope_layout(self, prompt_ids: list[int], image_sizes: list[tuple[int, int]], videos: list = ()) -> Any: ...

    def kv_bytes_per_token(self, dtype: Optional[str] = None) -> int: ...

    def mm_bytes_per_token(self, dtype: Optional[str] = None) -> int: ...
