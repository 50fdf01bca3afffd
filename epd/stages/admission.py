"""Admission: what a request must satisfy before it may wait for any stage.

A request that could never run (bad sampling, beyond the context, image markers that do not match its images,
unreadable images, more blocks than any instance holds) is refused here with a reason, instead of
waiting forever in a queue.
"""

from __future__ import annotations

import math

from epd.config import Role, TextModelConfig
from epd.request import ImageInput, Request, SamplingParams
from epd.stages.instance import Instance
from epd.stages.model_view import ModelView
from epd.stages.state import RequestState
from epd.video import VideoLayout, check_video, media_key, media_size, segments


class AdmissionError(ValueError):
    pass


def prepare(
    state: RequestState,
    family: ModelView,
    text: TextModelConfig,
    tokenizer,
    by_role: dict[Role, list[Instance]],
    chunked: bool = False,
) -> None:
    """Validate the request and build its prompt (BOS, each image's placeholders, the text)."""
    req = state.req
    check_request(req, text.vocab_size)
    if req.prompt_token_ids is not None:
        text_ids = list(req.prompt_token_ids)
    elif req.prompt is not None:
        if tokenizer is None:
            raise AdmissionError("request has a text prompt but the pipeline has no tokenizer")
        text_ids = tokenizer.encode(req.prompt)
    else:
        text_ids = []
    if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 or t >= text.vocab_size for t in text_ids):
        raise AdmissionError(f"prompt token ids must be integers in [0, {text.vocab_size})")
    markers = list(text_ids).count(family.image_token_id)
    if markers and markers != len(req.images):
        raise AdmissionError(
            f"prompt contains {markers} image placeholder tokens but the request has {len(req.images)} images; "
            "put one where each image goes, or none (the images then come first)"
        )
    video_sizes = [check_video(v, i) for i, v in enumerate(req.videos)]
    temporal = family.frames_per_segment if req.videos else None
    if req.videos and temporal is None:
        raise AdmissionError(f"model family {family.model_type!r} takes no video input")
    # the encoder's items: each video's segments (videos come first in the prompt), then the images
    state.media = [seg for i, v in enumerate(req.videos) for seg in segments(v, i, temporal)] + list(req.images)
    state.image_sizes = [media_size(m) for m in state.media]
    state.image_keys = [f"{media_key(m)}:{w}x{h}" for m, (w, h) in zip(state.media, state.image_sizes)]
    try:
        state.image_tokens = [family.num_image_tokens(w, h) for w, h in state.image_sizes]
    except ValueError as exc:  # a size the family's processor refuses (e.g. Qwen2-VL: aspect ratio over 200)
        raise AdmissionError(str(exc)) from exc
    sizes = state.image_sizes[len(state.media) - len(req.images) :]
    videos = [VideoLayout.of(v, size, temporal) for v, size in zip(req.videos, video_sizes)]
    state.prompt_ids = family.build_prompt(text_ids, sizes, videos)
    state.rope = family.rope_layout(state.prompt_ids, sizes, videos)
    total = state.prompt_len + req.sampling.max_tokens
    if total > text.max_position_embeddings:
        raise AdmissionError(
            f"prompt of {state.prompt_len} tokens + max_tokens {req.sampling.max_tokens} exceeds the model's "
            f"context of {text.max_position_embeddings}"
        )
    check_fits(state, by_role, chunked)


def check_identity(req) -> None:
    """A Request with a non-empty string id, or ValueError: what must hold before a request may even be
    queued (its id keys everything after); every other defect aborts it at admission with a reason."""
    if not isinstance(req, Request) or not isinstance(req.request_id, str) or not req.request_id:
        raise ValueError(f"not a request with a non-empty string id: {req!r}"[:200])


def check_request(req: Request, vocab_size: int) -> None:
    """Types and bounds of every field, before anything reads them (a bad field is this request's
    error, never an exception in the engine loop)."""
    if not isinstance(req.request_id, str) or not req.request_id:
        raise AdmissionError(f"request_id must be a non-empty string, got {req.request_id!r}")
    if not isinstance(req.sampling, SamplingParams):
        raise AdmissionError(f"sampling must be SamplingParams, got {type(req.sampling).__name__}")
    req.sampling.validate(vocab_size)
    if req.prompt is not None and not isinstance(req.prompt, str):
        raise AdmissionError(f"prompt must be a string, got {type(req.prompt).__name__}")
    if req.prompt_token_ids is not None and not isinstance(req.prompt_token_ids, (tuple, list)):
        raise AdmissionError(f"prompt_token_ids must be a sequence of ints, got {type(req.prompt_token_ids).__name__}")
    if not isinstance(req.images, (tuple, list)) or not all(isinstance(im, ImageInput) for im in req.images):
        raise AdmissionError("images must be a sequence of ImageInput")
    if not isinstance(req.videos, (tuple, list)):
        raise AdmissionError("videos must be a sequence of VideoInput")
    if isinstance(req.arrival_time, bool) or not isinstance(req.arrival_time, (int, float)) or not math.isfinite(req.arrival_time):
        raise AdmissionError(f"arrival_time must be a finite number, got {req.arrival_time!r}")


def check_fits(state: RequestState, by_role: dict[Role, list[Instance]], chunked: bool = False) -> None:
    """Reject what no instance could ever hold, instead of letting it wait forever. With chunked
    prefill a prompt may be longer than a step's token budget; with KV on demand a sequence still
    needs room for all of its tokens in one instance's pool (alone, it is never preempted)."""
    max_tokens = state.req.sampling.max_tokens
    for inst in by_role[Role.ENCODE] if state.image_tokens else []:
        need = max(inst.mm.blocks_for(n) for n in state.image_tokens)
        if need > inst.mm.num_blocks:
            raise AdmissionError(f"an image needs {need} MM blocks; {inst.pool} instances hold {inst.mm.num_blocks}")
    for inst in by_role[Role.PREFILL][:1]:
        if not chunked and state.prompt_len > inst.cfg.max_prefill_tokens:
            raise AdmissionError(
                f"prompt of {state.prompt_len} tokens exceeds {inst.pool}.max_prefill_tokens={inst.cfg.max_prefill_tokens}"
            )
        mm_need = sum(inst.mm.blocks_for(n) for n in state.image_tokens)
        if mm_need > inst.mm.num_blocks:
            raise AdmissionError(f"the request's images need {mm_need} MM blocks; {inst.pool} instances hold {inst.mm.num_blocks}")
        kv_tokens = state.prompt_len + (max_tokens if inst.has(Role.DECODE) else 0)
        if inst.kv.blocks_for(kv_tokens) > inst.kv.num_blocks:
            raise AdmissionError(f"{kv_tokens} tokens of KV exceed the {inst.pool} KV cache ({inst.kv.num_blocks} blocks)")
    for inst in by_role[Role.DECODE][:1]:
        need = inst.kv.blocks_for(state.prompt_len + max_tokens)
        if need > inst.kv.num_blocks:
            raise AdmissionError(f"prompt + max_tokens need {need} KV blocks; {inst.pool} instances hold {inst.kv.num_blocks}")
