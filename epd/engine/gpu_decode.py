"""JPEG bytes decoded on the E worker's GPU (nvJPEG through torchvision), batched: `model.image_decode=device`.

A 12 MP JPEG takes ~0.1 s of a host core to decode; on the GPU a batch of them takes milliseconds
(`bench/encode_throughput.py`: LLaVA's encode stage 9x faster). nvJPEG's IDCT rounds differently from
libjpeg's, so its pixels differ from Pillow's by a fraction of a level on average — which is why it is
a choice, off by default. Other formats, and JPEGs that fail to decode here, go the host's way.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from epd.request import ImageInput

log = logging.getLogger(__name__)


JPEG_MAGIC = b"\xff\xd8"


def is_jpeg(image: ImageInput) -> bool:
    """Whether the image is a JPEG, from its first two bytes only (where its bytes are read decides on this)."""
    if image.data is not None:
        return image.data[:2] == JPEG_MAGIC
    if image.path is None:
        return False
    try:
        with open(image.path, "rb") as f:
            return f.read(2) == JPEG_MAGIC
    except OSError:
        return False  # the host path reports it


def jpeg_bytes(image: ImageInput) -> Optional[bytes]:
    """The image's bytes when it is a JPEG (by its magic number), else None."""
    if image.data is not None:
        data = image.data
    elif image.path is not None:
        try:
            with open(image.path, "rb") as f:
                data = f.read()
        except OSError:
            return None  # the host path reports it
    else:
        return None
    return data if data[:2] == JPEG_MAGIC else None


class GpuJpegDecoder:
    def __init__(self, device: torch.device):
        import torchvision.io as tio

        self.tio, self.device = tio, device

    @staticmethod
    def make(device: torch.device) -> Optional[GpuJpegDecoder]:
        """A decoder for `device`, or None (with a log line) where it cannot decode: no CUDA, no torchvision."""
        if device.type != "cuda":
            log.warning("model.image_decode=device needs a CUDA device; decoding on the host")
            return None
        try:
            return GpuJpegDecoder(device)
        except Exception as exc:  # torchvision missing or built for another torch
            log.warning("model.image_decode=device needs torchvision (%s); decoding on the host", exc)
            return None

    def decode(self, blobs: list[bytes]) -> list[torch.Tensor]:
        """[3, H, W] uint8 RGB on the device, one per JPEG."""
        raw = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        return self.tio.decode_jpeg(raw, mode=self.tio.ImageReadMode.RGB, device=self.device)
