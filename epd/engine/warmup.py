"""Warm start: before an engine reports ready, requests of every kind run through every instance.

Kernel compilation, the libraries' first-shape choices, sampling set-up, the transfer backends'
first connections and image decoding (JPEG bytes, as clients send them) are then paid before the
first request a run measures, and a deployment that cannot serve fails here, not mid-run.
"""

from __future__ import annotations

import io

from epd.config import Role
from epd.images import load_image
from epd.request import ImageInput, Request, SamplingParams
from epd.stages.model_view import ModelView

# What each role's batches are called in the engine's batch records.
ROLE_BATCH = {Role.ENCODE: "EncodeBatch", Role.PREFILL: "PrefillBatch", Role.DECODE: "DecodeBatch"}


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


def missing_batches(roles_by_instance: dict[str, tuple[str, ...]], ran: set[tuple[str, str]]) -> list[tuple[str, str]]:
    """(instance, batch kind) pairs a warm-up has not run yet."""
    return [(iid, ROLE_BATCH[r]) for iid, roles in roles_by_instance.items() for r in roles if (iid, ROLE_BATCH[r]) not in ran]
