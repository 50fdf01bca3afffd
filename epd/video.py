"""Videos as requests carry them: sampled frames (images of one size); files decoded by PyAV.

For the encoder a video is a run of segments of `temporal` consecutive frames (Qwen2-VL's temporal
patch: two), the last padded with its last frame as the processor pads it. The tower attends within a
segment, so each is encoded on its own and segments spread over E workers as images do; the LM sees
the video's placeholders as one grid (time x height x width). Pillow and numpy only: admission runs it.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
from PIL import Image

from epd.images import ImageError, image_key, image_size, load_image
from epd.request import ImageInput, VideoInput

MAX_FRAMES = 768  # Qwen2-VL's video processor's own cap


@dataclass(frozen=True)
class FrameStack:
    """One segment of a video: what an E worker encodes as one item."""

    frames: tuple[ImageInput, ...]
    video: int  # the video's index in its request
    index: int  # the segment's index in its video


Media = Union[ImageInput, FrameStack]


@dataclass(frozen=True)
class VideoLayout:
    """What a family needs to lay a video out in the prompt: its frames' size and its segments."""

    width: int
    height: int
    segments: int
    fps: Optional[float] = None

    @staticmethod
    def of(video: VideoInput, size: tuple[int, int], temporal: int) -> VideoLayout:
        """The layout of `video`, whose frames are `size`, cut into segments of `temporal` frames."""
        return VideoLayout(size[0], size[1], -(-len(video.frames) // temporal), video.fps)


def check_video(video: VideoInput, index: int) -> tuple[int, int]:
    """The size of a video's frames; ImageError naming what is wrong with it."""
    if not isinstance(video, VideoInput):
        raise ImageError(f"videos[{index}] must be a VideoInput, got {type(video).__name__}")
    if not isinstance(video.frames, (tuple, list)) or not video.frames or not all(isinstance(f, ImageInput) for f in video.frames):
        raise ImageError(f"videos[{index}] needs a non-empty sequence of ImageInput frames")
    if len(video.frames) > MAX_FRAMES:
        raise ImageError(f"videos[{index}] has {len(video.frames)} frames, more than {MAX_FRAMES}")
    if video.fps is not None and (isinstance(video.fps, bool) or not isinstance(video.fps, (int, float)) or not video.fps > 0):
        raise ImageError(f"videos[{index}].fps must be a positive number, got {video.fps!r}")
    sizes = {image_size(f) for f in video.frames}
    if len(sizes) > 1:
        raise ImageError(f"videos[{index}]: frames differ in size ({', '.join(f'{w}x{h}' for w, h in sorted(sizes))})")
    return sizes.pop()


def segments(video: VideoInput, index: int, temporal: int) -> list[FrameStack]:
    """The video's frames in runs of `temporal`, the last padded with its last frame."""
    frames = list(video.frames)
    if len(frames) % temporal:
        frames += [frames[-1]] * (temporal - len(frames) % temporal)
    return [FrameStack(tuple(frames[i : i + temporal]), index, i // temporal) for i in range(0, len(frames), temporal)]


def media_size(item: Media) -> tuple[int, int]:
    return image_size(item.frames[0]) if isinstance(item, FrameStack) else image_size(item)


def media_key(item: Media) -> str:
    """Content hash: a segment's is its frames' (the encoder cache reuses a segment seen before)."""
    if isinstance(item, FrameStack):
        return "frames:" + hashlib.blake2b("|".join(image_key(f) for f in item.frames).encode(), digest_size=16).hexdigest()
    return image_key(item)


def load_frames(item: FrameStack) -> list[Image.Image]:
    return [load_image(f) for f in item.frames]


def decode_video(data: Union[bytes, str], fps: float = 2.0, max_frames: int = 64, min_frames: int = 4, temporal: int = 2) -> VideoInput:
    """A video file (bytes or a local path) as frames sampled uniformly at about `fps` a second, as
    Qwen2-VL's video processor samples (a multiple of `temporal`, at least `min_frames` where the file
    has them, at most `max_frames`); each frame kept losslessly as PNG bytes."""
    try:
        import av
    except ImportError as exc:
        raise ImageError("video input needs PyAV (pip install av)") from exc
    try:
        with av.open(io.BytesIO(data) if isinstance(data, bytes) else data) as container:
            rate = float(container.streams.video[0].average_rate or 0) or None
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except Exception as exc:  # any container or codec failure is the file's
        raise ImageError(f"video could not be decoded: {exc}") from exc
    total = len(decoded)
    if total == 0:
        raise ImageError("video has no frames")
    top = max(temporal, math.floor(min(max_frames, total) / temporal) * temporal)
    wanted = total if rate is None else total / rate * fps
    n = min(total, max(temporal, math.floor(min(max(wanted, min_frames), top) / temporal) * temporal))
    picks = np.arange(0, total, total / n).astype(int)[:n]
    frames = []
    for i in picks:
        out = io.BytesIO()
        Image.fromarray(decoded[i]).save(out, format="PNG", compress_level=1)
        frames.append(ImageInput(data=out.getvalue()))
    return VideoInput(tuple(frames), fps=fps if rate is not None else None)


def encode_video(video: VideoInput, fps: float = 2.0) -> bytes:
    """The frames as an MPEG-4 file, as a client would send the video (lossy: pixels change slightly)."""
    import av

    frames = [np.asarray(load_image(f)) for f in video.frames]
    h, w = frames[0].shape[:2]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=max(1, round(video.fps or fps)))
        stream.width, stream.height, stream.pix_fmt = w - w % 2, h - h % 2, "yuv420p"
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f[: h - h % 2, : w - w % 2]), format="rgb24")))
        out.mux(stream.encode())
    return buf.getvalue()
