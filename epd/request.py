"""Requests as users submit them, and their outputs."""

from __future__ import annotations

import math
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
class VideoInput:
    """A video as its sampled frames, in order (images of one size; `epd.video.decode_video` samples a
    file). `fps`: frames per second they were sampled at, where known (Qwen2.5-VL spaces its temporal
    positions by it; unknown counts as one temporal patch a second)."""

    frames: tuple[ImageInput, ...] = ()
    fps: Optional[float] = None


# Why a request was aborted: it cannot be served as given, the engine failed serving it, its client left.
INVALID, INTERNAL, CANCELLED = "invalid", "internal", "cancelled"

GREEDY_BELOW = 1e-5  # temperatures below this are greedy (dividing by them overflows the logits)
MAX_SEED = 2**63 - 1  # seeds are int64 on the device
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model's raw distribution (before penalties,
    bias and temperature), with the `top` most likely alternatives as (token id, logprob)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # below GREEDY_BELOW: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off; at or above the vocabulary size = off
    seed: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0  # EOS and stop tokens are masked until this many tokens exist
    repetition_penalty: float = 1.0  # transformers' / CTRL's: on prompt and output tokens
    presence_penalty: float = 0.0  # OpenAI's: subtracted once per distinct output token
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the output
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    logprobs: Optional[int] = None  # None: none; k >= 0: the chosen token's logprob and the top k
    # Benchmarks: the model answers with this many tokens, the last one EOS (EOS masked before it). A
    # model with random weights rarely chooses to stop; this stands in for one that does, at a length
    # the schedulers do not know in advance (they never read it; the sampler and the simulator do).
    answer_tokens: Optional[int] = None

    def validate(self, vocab_size: Optional[int] = None) -> None:
        """Every field within what the runtime supports; `vocab_size` bounds token ids where known."""
        _int("max_tokens", self.max_tokens, 1)
        _float("temperature", self.temperature, 0.0, None)
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _int("top_k", self.top_k, 0)
        _int("seed", self.seed, -MAX_SEED - 1, MAX_SEED)
        _int("min_tokens", self.min_tokens, 0, self.max_tokens)
        if self.answer_tokens is not None:
            _int("answer_tokens", self.answer_tokens, 1)
        _float("repetition_penalty", self.repetition_penalty, 0.0, None, low_open=True)
        _float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.logprobs is not None:
            _int("logprobs", self.logprobs, 0, MAX_TOP_LOGPROBS)
        for tok in self.stop_token_ids:
            _token("stop_token_ids", tok, vocab_size)
        seen = set()
        for tok, bias in self.logit_bias:
            _token("logit_bias", tok, vocab_size)
            _float(f"logit_bias[{tok}]", bias, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)
            if tok in seen:
                raise ValueError(f"logit_bias names token {tok} twice")
            seen.add(tok)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def needs_history(self) -> bool:
        """Whether sampling reads the tokens so far (penalties), beyond their count."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def processes_logits(self) -> bool:
        return self.needs_history or bool(self.logit_bias) or self.min_tokens > 0 or self.answer_tokens is not None


def _int(name: str, value, low: int, high: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{low}, {'inf' if high is None else high}], got {value}")


def _float(name: str, value, low: float, high: Optional[float], low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low) or (high is not None and value > high):
        raise ValueError(f"{name} must be in {'(' if low_open else '['}{low}, {'inf' if high is None else high}], got {value}")


def _token(name: str, tok, vocab_size: Optional[int]) -> None:
    _int(f"{name} token id", tok, 0, None if vocab_size is None else vocab_size - 1)


@dataclass(frozen=True)
class Request:
    request_id: str
    arrival_time: float = 0.0  # seconds after the run starts
    prompt: Optional[str] = None
    prompt_token_ids: Optional[tuple[int, ...]] = None  # text tokens; image placeholders are added by the model
    images: tuple[ImageInput, ...] = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    videos: tuple[VideoInput, ...] = ()  # placed before the images in the prompt


@dataclass
class RequestOutput:
    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: Optional[str] = None
    finish_reason: Optional[str] = None  # stop | length | abort
    abort_reason: Optional[str] = None
    prompt_tokens: int = 0
    logprobs: Optional[list[TokenLogprob]] = None  # one per token, when the request asked for them
    error_kind: Optional[str] = None  # with finish_reason abort: INVALID, INTERNAL or CANCELLED

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
