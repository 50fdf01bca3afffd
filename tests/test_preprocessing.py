"""Image preprocessing against the transformers processors: every size, shape and colour mode, on
the host path (Pillow) and the device path (torch, here on the CPU), exactly."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from epd.images import load_image
from epd.models.image_processing import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PILOps,
    TorchOps,
    clip_preprocess,
    image_tensor,
    internvl_preprocess,
    normalize,
    num_tiles,
)
from epd.models.pil_resample import resize_crop
from epd.request import ImageInput

# Sizes where the scaled long edge has a fractional part >= .5 (truncated, not rounded), 1 px edges,
# extreme aspect ratios both ways, odd sizes, squares at and around the model's size.
SIZES = [
    (640, 427), (427, 640), (1024, 683), (640, 95), (640, 480), (336, 336), (335, 337), (1, 1), (1, 7), (9, 1),
    (1, 500), (700, 1), (2, 2000), (3, 5), (97, 1013), (4031, 17), (448, 448), (896, 449), (1235, 919), (200, 900),
]  # fmt: skip
MODES = ["RGB", "RGBA", "L", "P", "LA", "1", "CMYK", "I;16"]


def _photo(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth gradients plus noise: resampling differences show on edges and on flat areas alike."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 255 // max(width - 1, 1)), (yy * 255 // max(height - 1, 1)), ((xx + yy) * 7) % 256], -1)
    return np.clip(base + rng.integers(-40, 41, base.shape), 0, 255).astype(np.uint8)


def _encoded(width: int, height: int, mode: str, seed: int) -> bytes:
    im = Image.fromarray(_photo(width, height, seed))
    if mode == "P":
        im = im.quantize(colors=37)
    elif mode == "I;16":
        im = Image.fromarray(_photo(width, height, seed)[..., 0].astype(np.uint16) * 257)
    elif mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="TIFF" if mode == "CMYK" else "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def processors():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    clip = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})

    def got(max_tiles):
        return GotOcr2ImageProcessorPil(
            size={"height": 448, "width": 448},
            crop_to_patches=True,
            max_patches=max_tiles,
            min_patches=1,
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
        )

    return clip, got


def _both_paths(im, fn):
    host = fn(im, PILOps)
    device = fn(image_tensor(im), TorchOps)
    assert host.dtype == device.dtype == torch.uint8
    assert torch.equal(host, device), "device path differs from the host path"
    return host


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_clip_pixels_equal_transformers_at_every_size(processors, size):
    clip, _ = processors
    src = Image.open(io.BytesIO(_encoded(*size, "RGB", seed=sum(size))))
    ref = clip(images=src, return_tensors="pt")["pixel_values"]
    ours = _both_paths(load_image(ImageInput(data=_encoded(*size, "RGB", seed=sum(size)))), lambda im, ops: clip_preprocess(im, 336, ops))
    torch.testing.assert_close(normalize(ours, CLIP_MEAN, CLIP_STD), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
@pytest.mark.parametrize("max_tiles", [1, 6, 12])
def test_internvl_tiles_equal_transformers_at_every_size(processors, size, max_tiles):
    _, got = processors
    if size[0] * size[1] > 2_000_000 and max_tiles != 12:
        pytest.skip("one tiling of the large image is enough")
    data = _encoded(*size, "RGB", seed=sum(size) + max_tiles)
    ref = got(max_tiles)(images=Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"]
    ours = _both_paths(load_image(ImageInput(data=data)), lambda im, ops: internvl_preprocess(im, 448, max_tiles, True, ops))
    assert ours.shape[0] == num_tiles(*size, max_tiles, 448, True) == ref.shape[0]
    torch.testing.assert_close(normalize(ours, IMAGENET_MEAN, IMAGENET_STD), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_every_colour_mode_is_converted_as_transformers_does(processors, mode):
    clip, got = processors
    data = _encoded(311, 207, mode, seed=len(mode))
    src = Image.open(io.BytesIO(data))
    assert src.mode == mode
    im = load_image(ImageInput(data=data))
    ours = _both_paths(im, lambda im, ops: clip_preprocess(im, 336, ops))
    torch.testing.assert_close(normalize(ours, CLIP_MEAN, CLIP_STD), clip(images=src, return_tensors="pt")["pixel_values"])
    ours = _both_paths(im, lambda im, ops: internvl_preprocess(im, 448, 6, True, ops))
    ref = got(6)(images=Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(normalize(ours, IMAGENET_MEAN, IMAGENET_STD), ref)


def test_resampler_equals_pillow_for_random_sizes_and_crops():
    rng = np.random.default_rng(0)
    for _ in range(60):
        w, h, rw, rh = (int(v) for v in rng.integers(1, 400, 4))
        px = _photo(w, h, int(rng.integers(1 << 30)))
        ref = np.asarray(Image.fromarray(px).resize((rw, rh), Image.BICUBIC))
        x = torch.from_numpy(px).permute(2, 0, 1)
        assert np.array_equal(resize_crop(x, (rw, rh)).permute(1, 2, 0).numpy(), ref), (w, h, rw, rh)
        left, top = int(rng.integers(0, rw)), int(rng.integers(0, rh))
        right, bottom = int(rng.integers(left + 1, rw + 1)), int(rng.integers(top + 1, rh + 1))
        got = resize_crop(x, (rw, rh), (left, top, right, bottom)).permute(1, 2, 0).numpy()
        assert np.array_equal(got, ref[top:bottom, left:right]), (w, h, rw, rh, (left, top, right, bottom))


def test_a_strip_is_cropped_without_building_the_stretched_image():
    """CLIP stretches a 1x4000 strip to 336x1,344,000 before cropping: only the crop is computed."""
    im = Image.fromarray(_photo(1, 4000, 3))
    out = clip_preprocess(im, 336)
    assert out.shape == (1, 3, 336, 336)
    assert torch.equal(out, clip_preprocess(image_tensor(im), 336, TorchOps))


@pytest.fixture(scope="module", params=["llava", "internvl"])
def tiny_checkpoint(request, tmp_path_factory):
    from transformers import AutoModelForImageTextToText

    from tests.helpers import save_hf_checkpoint

    path = save_hf_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, path, AutoModelForImageTextToText.from_pretrained(path).eval()


@pytest.mark.parametrize("resize", ["host", "device"])
def test_greedy_tokens_equal_transformers_for_photo_sizes(tiny_checkpoint, resize):
    """Encoded images of awkward sizes through the engine (E -> P -> D) give transformers' tokens, with
    transformers' own processor making its pixels."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from epd.config import DeploymentConfig, ModelConfig, PoolConfig
    from epd.models.runtime import load_family
    from epd.request import Request, SamplingParams
    from epd.serve.offline import OfflineLLM

    family, path, hf = tiny_checkpoint
    model = ModelConfig(load_format="hf", path=str(path), image_resize=resize, max_tiles=6)
    fam = load_family(model)
    dep = DeploymentConfig(encode=PoolConfig(mm_blocks=512), prefill=PoolConfig(kv_blocks=512), decode=PoolConfig(kv_blocks=512))
    cases = [[(640, 427)], [(427, 640), (1, 9)], [(1024, 683)], [(640, 95), (3, 5)]]
    reqs, refs = [], []
    for i, sizes in enumerate(cases):
        datas = [_encoded(w, h, "RGB", seed=10 * i + k) for k, (w, h) in enumerate(sizes)]
        text = [30 + i, 31, 32]
        reqs.append(
            Request(f"r{i}", prompt_token_ids=tuple(text), images=tuple(ImageInput(data=d) for d in datas),
                    sampling=SamplingParams(max_tokens=12, ignore_eos=True))
        )  # fmt: skip
        srcs = [Image.open(io.BytesIO(d)) for d in datas]
        side = fam.hf.vision_config.image_size
        side = side[0] if isinstance(side, (list, tuple)) else side
        if family == "llava":
            proc = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        else:
            proc = GotOcr2ImageProcessorPil(
                size={"height": side, "width": side}, crop_to_patches=True, max_patches=6, min_patches=1,
                image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
            )  # fmt: skip
        pixels = torch.cat([proc(images=s, return_tensors="pt")["pixel_values"] for s in srcs])
        prompt = fam.build_prompt(text, sizes)
        with torch.no_grad():
            out = hf.generate(input_ids=torch.tensor([prompt]), pixel_values=pixels, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        refs.append(out[0, len(prompt) :].tolist())
    with OfflineLLM(model, dep, "local") as llm:
        outs = llm.generate(reqs)
        llm.core.drain_check()
    assert [o.token_ids for o in outs] == refs


PHOTOS = sorted((Path(__file__).parent / "data" / "photos").glob("*.jpg"))


@pytest.mark.parametrize("photo", PHOTOS, ids=lambda p: p.stem)
def test_real_photos_are_prepared_as_transformers_prepares_them(processors, photo):
    """Camera photos (tests/data/photos: public-domain and CC0 images shipped with scikit-image), decoded
    from their JPEG bytes: CLIP and InternVL pixels equal transformers' processors', host and device paths alike."""
    clip, got = processors
    data = photo.read_bytes()
    im = load_image(ImageInput(data=data))
    ours = _both_paths(im, lambda im, ops: clip_preprocess(im, 336, ops))
    ref = clip(images=Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(normalize(ours, CLIP_MEAN, CLIP_STD), ref)
    ours = _both_paths(im, lambda im, ops: internvl_preprocess(im, 448, 12, True, ops))
    ref = got(12)(images=Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"]
    assert ours.shape[0] == num_tiles(*im.size, 12, 448, True) == ref.shape[0]
    torch.testing.assert_close(normalize(ours, IMAGENET_MEAN, IMAGENET_STD), ref)
