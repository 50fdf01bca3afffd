"""`image_url` parts -> ImageInput, `video_url` parts -> VideoInput: base64 data URLs, local files
under a configured root, and http(s) only when enabled. Every refusal names what is wrong."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from epd.config import ServerConfig
from epd.images import ImageError, image_size
from epd.request import ImageInput, VideoInput
from epd.video import decode_video


class BadImage(ValueError):
    pass


def resolve_image(url: str, cfg: ServerConfig) -> ImageInput:
    if url.startswith(("data:", "http://", "https://")):
        image = ImageInput(data=_url_bytes(url, cfg, "image", cfg.max_image_bytes))
    else:
        image = ImageInput(path=_local_path(url, cfg))
    try:
        image_size(image)  # decodes the header: undecodable images are refused here
    except ImageError as exc:
        raise BadImage(str(exc)) from exc
    return image


def resolve_video(url: str, cfg: ServerConfig) -> VideoInput:
    """A video's bytes (resolved as an image's are, within `max_video_bytes`), sampled into frames."""
    if url.startswith(("data:", "http://", "https://")):
        data = _url_bytes(url, cfg, "video", cfg.max_video_bytes)
    else:
        with open(_local_path(url, cfg, "video"), "rb") as f:
            data = f.read()
    try:
        return decode_video(data, fps=cfg.video_fps, max_frames=cfg.max_video_frames)
    except ImageError as exc:
        raise BadImage(str(exc)) from exc


def _url_bytes(url: str, cfg: ServerConfig, kind: str, limit: int) -> bytes:
    """The bytes of a base64 data URL, or of an http(s) URL where the server allows them, within `limit`."""
    if not url.startswith("data:"):
        if not cfg.allow_remote_images:
            raise BadImage(f"remote {kind} URLs are disabled on this server; send a base64 data URL")
        return _fetch(url, limit)
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise BadImage(f"{kind} data URLs must be base64 encoded (data:{kind}/...;base64,...)")
    if len(payload) * 3 // 4 > limit:
        raise BadImage(f"{kind} is larger than the server's limit of {limit} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadImage(f"{kind} data URL is not valid base64: {exc}") from exc


def _local_path(url: str, cfg: ServerConfig, kind: str = "image") -> str:
    if cfg.image_root is None:
        raise BadImage(f"local {kind} paths are disabled on this server (no server.image_root); send a base64 data URL")
    root = Path(cfg.image_root).resolve()
    if "\x00" in url:
        raise BadImage(f"{kind} path contains a null byte")
    try:
        path = Path(url.removeprefix("file://"))
        path = (path if path.is_absolute() else root / path).resolve()
    except (OSError, ValueError) as exc:  # a path the OS cannot name (too long, a loop of links)
        raise BadImage(f"{kind} path {url[:200]!r} cannot be resolved: {exc}") from exc
    if root not in path.parents and path != root:
        raise BadImage(f"{kind} path {url!r} is outside the server's image root")
    limit = cfg.max_video_bytes if kind == "video" else cfg.max_image_bytes
    try:
        if not path.is_file():
            raise BadImage(f"{kind} file not found: {url!r}")
        size = path.stat().st_size
    except OSError as exc:
        raise BadImage(f"{kind} file {url[:200]!r} cannot be read: {exc}") from exc
    if size > limit:
        raise BadImage(f"{kind} is larger than the server's limit of {limit} bytes")
    return str(path)


def _fetch(url: str, limit: int) -> bytes:
    import httpx

    with httpx.stream("GET", url, timeout=10.0, follow_redirects=True) as resp:
        if resp.status_code != 200:
            raise BadImage(f"fetching {url} gave HTTP {resp.status_code}")
        data = b""
        for chunk in resp.iter_bytes():
            data += chunk
            if len(data) > limit:
                raise BadImage(f"image at {url} is larger than the server's limit of {limit} bytes")
        return data
