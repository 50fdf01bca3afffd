"""Images -> pixel tensors, following each family's own processor (no files downloaded).

LLaVA-1.5 (CLIP): shortest edge to S, centre crop SxS, CLIP mean/std.
InternVL: dynamic tiling into up to `max_tiles` SxS tiles by closest aspect ratio, plus a
thumbnail when there is more than one tile; ImageNet mean/std.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image

from epd.models.pil_resample import resize_crop

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_tensor(im: Image.Image) -> torch.Tensor:
    """[3, H, W] uint8: normalisation happens later, on the encoder's device (see `normalize`)."""
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)


def normalize(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 scaled to [0, 1] and standardised per channel."""
    x = pixels.float() / 255.0
    m = torch.tensor(mean, device=x.device)[:, None, None]
    s = torch.tensor(std, device=x.device)[:, None, None]
    return (x - m) / s


class PILOps:
    """Resizing on the host with Pillow: pixel for pixel what the transformers processors produce."""

    # Beyond this many pixels in a resized image that is cropped at once (CLIP stretching a 1 px wide
    # strip), only the crop is computed, with the bit-exact torch resampler.
    max_intermediate_pixels = 16_000_000

    @staticmethod
    def size(im: Image.Image) -> tuple[int, int]:
        return im.size

    @staticmethod
    def resize(im: Image.Image, size: tuple[int, int]) -> Image.Image:
        return im.resize(size, Image.BICUBIC)

    @classmethod
    def resize_crop(cls, im: Image.Image, size: tuple[int, int], box: tuple[int, int, int, int]):
        if size[0] * size[1] > cls.max_intermediate_pixels:
            return TorchOps.resize_crop(_to_tensor(im), size, box)
        return im.resize(size, Image.BICUBIC).crop(box)

    @staticmethod
    def crop(im: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
        return im.crop(box)

    @staticmethod
    def tensor(im) -> torch.Tensor:
        return im if isinstance(im, torch.Tensor) else _to_tensor(im)


class TorchOps:
    """Resizing with torch where the tensor lies (a GPU resizes a 12 MP photo in about a millisecond
    where Pillow takes ~0.1 s): Pillow's bicubic resampling reproduced bit for bit (`pil_resample`),
    so the device path gives the host path's pixels exactly."""

    @staticmethod
    def size(x: torch.Tensor) -> tuple[int, int]:
        return int(x.shape[-1]), int(x.shape[-2])

    @staticmethod
    def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return resize_crop(x, size)

    @staticmethod
    def resize_crop(x: torch.Tensor, size: tuple[int, int], box: tuple[int, int, int, int]) -> torch.Tensor:
        return resize_crop(x, size, box)

    @staticmethod
    def crop(x: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
        left, top, right, bottom = box
        return x[:, top:bottom, left:right]

    @staticmethod
    def tensor(x: torch.Tensor) -> torch.Tensor:
        return x.contiguous()


def image_tensor(im: Image.Image) -> torch.Tensor:
    """[3, H, W] uint8 of a decoded image, for `TorchOps` (pinned host memory: the copy to a GPU is async)."""
    x = _to_tensor(im)
    return x.pin_memory() if torch.cuda.is_available() else x


def shortest_edge_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after scaling the shortest edge to `size`, as transformers computes it: the
    long edge is int(size * long / short), truncated."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def clip_preprocess(im, size: int, ops=PILOps) -> torch.Tensor:
    """[1, 3, size, size] uint8: shortest edge to size (bicubic), centre crop; CLIP mean/std at `normalize`.
    `im`: a PIL image (PILOps) or a [3, H, W] uint8 tensor (TorchOps)."""
    w, h = ops.size(im)
    rw, rh = shortest_edge_size(w, h, size)
    left, top = (rw - size) // 2, (rh - size) // 2
    return ops.tensor(ops.resize_crop(im, (rw, rh), (left, top, left + size, top + size)))[None]


def tile_ratios(max_tiles: int, min_tiles: int = 1) -> list[tuple[int, int]]:
    """Every (columns, rows) grid with min..max tiles, in the order InternVL's processor tries them."""
    grids = [(i, j) for i in range(1, max_tiles + 1) for j in range(1, max_tiles + 1) if min_tiles <= i * j <= max_tiles]
    return sorted(grids, key=lambda r: r[0] * r[1])


@functools.lru_cache(maxsize=4096)
def tile_grid(width: int, height: int, max_tiles: int, tile: int, min_tiles: int = 1) -> tuple[int, int]:
    """InternVL's choice of (columns, rows): the ratio closest to the image's aspect ratio."""
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    area = width * height
    for cols, rows in tile_ratios(max_tiles, min_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def num_tiles(width: int, height: int, max_tiles: int, tile: int, use_thumbnail: bool) -> int:
    cols, rows = tile_grid(width, height, max_tiles, tile)
    n = cols * rows
    return n + 1 if use_thumbnail and n > 1 else n


def internvl_preprocess(im, tile: int, max_tiles: int, use_thumbnail: bool, ops=PILOps) -> torch.Tensor:
    """[tiles, 3, tile, tile] uint8; ImageNet mean/std at `normalize`. `im` as for `clip_preprocess`.
    One tile (max_tiles 1, or a grid of 1x1) is the image resized to tile x tile, with no thumbnail."""
    cols, rows = tile_grid(*ops.size(im), max_tiles, tile)
    resized = ops.resize(im, (tile * cols, tile * rows))
    tiles = [ops.crop(resized, (c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(ops.resize(im, (tile, tile)))
    return torch.stack([ops.tensor(t) for t in tiles])
