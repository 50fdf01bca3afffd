"""Tokenizers that need no download: a byte-level one for dummy models, or the checkpoint's own files."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from epd.config import ModelConfig


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """Bytes map to ids [offset, offset+256); lower ids are specials (pad, bos, eos, image, ...)."""

    offset = 4

    def __init__(self, vocab_size: int, special_ids: set[int]):
        self.vocab_size = vocab_size
        self.special_ids = special_ids

    def encode(self, text: str) -> list[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return [i % self.vocab_size for i in ids]

    def decode(self, ids: list[int]) -> str:
        data = bytes(i - self.offset for i in ids if self.offset <= i < self.offset + 256 and i not in self.special_ids)
        return data.decode("utf-8", errors="replace")


def load_tokenizer(cfg: ModelConfig, special_ids: set[int]) -> Tokenizer:
    if cfg.load_format == "hf" and cfg.path and any((Path(cfg.path) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(cfg.path, local_files_only=True)
        return _HFTokenizer(tok)
    return ByteTokenizer(cfg.text.vocab_size, special_ids)


class _HFTokenizer:
    def __init__(self, tok):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)
