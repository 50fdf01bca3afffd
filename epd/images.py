"""Images as requests carry them: reading their size without decoding, decoding to RGB, and the
seeded procedural images of synthetic workloads. Pillow and numpy only (no torch): admission runs it."""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
from PIL import Image

from epd.request import ImageInput


class ImageError(ValueError):
    """An image that cannot be read or used."""


# Pillow refuses to open images beyond twice its decompression-bomb threshold; procedural images too.
MAX_IMAGE_PIXELS = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)


def image_size(image: ImageInput) -> tuple[int, int]:
    """(width, height) without decoding the pixels."""
    if image.is_procedural:
        w, h = image.width, image.height
        if isinstance(w, bool) or isinstance(h, bool) or not isinstance(w, int) or not isinstance(h, int) or w < 1 or h < 1:
            raise ImageError(f"procedural image needs a positive integer width and height, got {w!r}x{h!r}")
        size = (w, h)
    else:
        try:
            with _open(image) as im:
                size = im.size
        except ImageError:
            raise
        except Exception as exc:  # PIL raises many types for bad files
            raise ImageError(f"unreadable image {_name(image)}: {exc}") from exc
    if size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise ImageError(f"image of {size[0]}x{size[1]} pixels exceeds the limit of {MAX_IMAGE_PIXELS} pixels")
    return size


def image_key(image: ImageInput) -> str:
    """The image's content hash: the same picture sent twice (as bytes, or a file with those bytes) gets
    the same key, whatever it is called. Procedural images are named by their parameters."""
    if image.is_procedural:
        return f"procedural:{image.width}x{image.height}:{image.seed}"
    if image.data is not None:
        blob = image.data
    else:
        try:
            with open(image.path, "rb") as f:
                blob = f.read()
        except OSError as exc:
            raise ImageError(f"image file not readable: {image.path}: {exc}") from exc
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def load_image(image: ImageInput) -> Image.Image:
    if image.is_procedural:
        return _procedural(image.width or 1, image.height or 1, image.seed)
    try:
        with _open(image) as im:
            # Decoded in one call, which runs without the interpreter lock: in blocks of 64 KiB (Pillow's default)
            # each block takes the lock again and waits for it behind a busy thread (a worker's decode steps),
            # and a 12 MP JPEG took twice as long.
            im.decodermaxblock = max(im.decodermaxblock, _encoded_size(image) + 1)
            return im.convert("RGB")
    except Exception as exc:
        raise ImageError(f"unreadable image {_name(image)}: {exc}") from exc


def _encoded_size(image: ImageInput) -> int:
    return len(image.data) if image.data is not None else os.path.getsize(image.path)


def _name(image: ImageInput) -> str:
    return repr(image.path) if image.path else f"<{len(image.data or b'')} bytes>"


def _open(image: ImageInput) -> Image.Image:
    if image.path is not None:
        try:
            return Image.open(image.path)
        except FileNotFoundError as exc:
            raise ImageError(f"image file not found: {image.path}") from exc
    return Image.open(io.BytesIO(image.data or b""))


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """A seeded picture with a photograph's statistics for a codec: smooth shapes at a few scales and
    fine sensor noise (JPEG sizes and decode times like a camera's), not flat cells."""
    rng = np.random.default_rng(seed)
    side = max(width, height)
    layers = []
    for cells in (3, 12, 48):
        grid = rng.integers(0, 256, size=(max(2, height * cells // side), max(2, width * cells // side), 3), dtype=np.uint8)
        layers.append(Image.fromarray(grid).resize((width, height), Image.BILINEAR))
    smooth = Image.blend(Image.blend(layers[0], layers[1], 0.35), layers[2], 0.15)
    grain = rng.integers(-5, 6, size=(height, width, 1), dtype=np.int16)
    return Image.fromarray(np.clip(np.asarray(smooth, np.int16) + grain, 0, 255).astype(np.uint8))


def encoded_image(width: int, height: int, seed: int, cache_dir: str, fmt: str = "jpeg", quality: int = 90) -> str:
    """The path of `photo_like(width, height, seed)` encoded as `fmt`, made once and kept under
    `cache_dir` (written to a temporary name and renamed: readers never see half a file)."""
    import os
    import tempfile

    ext = {"jpeg": "jpg", "png": "png", "webp": "webp"}[fmt]
    path = os.path.join(cache_dir, f"photo-{width}x{height}-{seed}-q{quality}.{ext}")
    if not os.path.exists(path):
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=f".{ext}.part")
        try:
            with os.fdopen(fd, "wb") as f:
                photo_like(width, height, seed).save(f, format=fmt.upper(), quality=quality)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


def _procedural(width: int, height: int, seed: int) -> Image.Image:
    """A seeded, textured image: coarse random colour cells upscaled, cheap at 4032x3024."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 256, size=(max(1, height // 32), max(1, width // 32), 3), dtype=np.uint8)
    return Image.fromarray(cells).resize((width, height), Image.NEAREST)
