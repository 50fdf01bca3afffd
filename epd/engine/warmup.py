"""Warm start: before an engine reports ready, requests of every kind run through every instance.

Kernel compilation, the libraries' first-shape choices, sampling set-up, the transfer backends'
first connections and image decoding (JPEG bytes, as clients send them) are then paid before the
first request a run measures, and a deployment that cannot serve fails here, not mid-run.

With GPU workers each wave comes in two halves, the second sent once the first decodes, so that
instances that mix prefill chunks into decode steps run such a step too, and the first wave also
fills an encode batch and a prefill step to their limits: a kernel's or library's first call at a new
shape (compilation, attention plans, GEMM heuristics) costs hundreds of milliseconds that small
batches do not pay for it. On CPU neither is done: nothing compiles, and every start would be longer.
"""

from __future__ import annotations

import dataclasses
import io

from epd.config import Role
from epd.images import load_image
from epd.request import ImageInput, Request, SamplingParams
from epd.stages.model_view import ModelView

# What each role's batches are called in the engine's batch records.
ROLE_BATCH = {Role.ENCODE: "EncodeBatch", Role.PREFILL: "PrefillBatch", Role.DECODE: "DecodeBatch"}
MIXED = "MixedBatch"  # instances that both prefill and decode, with chunked prefill in mixed steps


def _jpeg(width: int, height: int, seed: int) -> ImageInput:
    buf = io.BytesIO()
    load_image(ImageInput(width=width, height=height, seed=seed)).save(buf, format="JPEG", quality=90)
    return ImageInput(data=buf.getvalue())


def warmup_requests(family: ModelView, count: int, wave: int) -> list[Request]:
    """`count` requests of mixed shapes: one or two images (sizes and aspect ratios that tile
    differently) or none, prompts of several lengths, greedy and sampled, a few output tokens."""
    text = family.text_config()
    reserved = {family.image_token_id, text.bos_token_id, text.eos_token_id}
    ids = [i for i in range(4, min(text.vocab_size, 4096)) if i not in reserved]
    sizes = [(640, 480), (336, 336), (800, 450)]
    reqs = []
    for i in range(count):
        n_images = (1, 2, 1, 0)[i % 4]
        images = tuple(_jpeg(*sizes[(i + k) % len(sizes)], seed=wave * 1000 + i * 7 + k) for k in range(n_images))
        prompt = tuple(ids[(i * 31 + j) % len(ids)] for j in range(5 + 11 * (i % 5)))
        sampling = SamplingParams(max_tokens=3 + i % 3, ignore_eos=True, temperature=0.0 if i % 2 == 0 else 1.0, seed=i)
        reqs.append(Request(f"warmup-{wave}-{i}", 0.0, prompt_token_ids=prompt, images=images, sampling=sampling))
    return reqs


def full_size_requests(family: ModelView, count: int, prompt_tokens: int) -> list[Request]:
    """`count` requests of one image and `prompt_tokens` tokens each, sent at once: together they fill an
    encode batch of `count` images and prefill steps up to the token budget."""
    text = family.text_config()
    reserved = {family.image_token_id, text.bos_token_id, text.eos_token_id}
    ids = [i for i in range(4, min(text.vocab_size, 4096)) if i not in reserved]
    sampling = SamplingParams(max_tokens=4, ignore_eos=True)
    return [
        Request(
            f"warmup-full-{i}",
            0.0,
            prompt_token_ids=tuple(ids[(i * 13 + j) % len(ids)] for j in range(prompt_tokens)),
            images=(_jpeg(640, 480, seed=9000 + i),),  # each its own picture: the encoder cache would serve copies
            sampling=sampling,
        )
        for i in range(count)
    ]


def staggered(requests: list[Request], first_tokens: int = 32) -> tuple[list[Request], list[Request]]:
    """The wave's halves: the first decodes long enough (`first_tokens`) for the second's prompts to join
    its decode steps (sent once the first decode step is back). Two requests at least in each, so the step
    has several decode rows, as most served ones do. What a mixed step runs eagerly must still not compile
    per shape (see `epd.kernels.triton_decode`): no warm-up meets every shape."""
    half = max(2, len(requests) // 2)
    first = [dataclasses.replace(r, sampling=dataclasses.replace(r.sampling, max_tokens=first_tokens)) for r in requests[:half]]
    return first, requests[half:]


def missing_batches(
    roles_by_instance: dict[str, tuple[str, ...]], ran: set[tuple[str, str]], mixed: frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    """(instance, batch kind) pairs a warm-up has not run yet; `mixed`: instances that run mixed steps."""
    wanted = [(iid, ROLE_BATCH[r]) for iid, roles in roles_by_instance.items() for r in roles]
    wanted += [(iid, MIXED) for iid in sorted(mixed)]
    return [pair for pair in wanted if pair not in ran]
