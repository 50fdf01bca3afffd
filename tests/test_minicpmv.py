"""MiniCPM-V (transformers' MiniCPM-V 4.6 architecture, Qwen2 LM): slicing, image features and greedy
tokens against transformers, then through the engine in every deployment."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import MiniCPMV4_6ForConditionalGeneration
from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil

from epd.config import DeploymentConfig, ModelConfig, PoolConfig, TextModelConfig, VisionTowerConfig
from epd.models.generate import generate
from epd.models.image_processing import TorchOps, image_tensor, normalize
from epd.models.runtime import ModelRuntime, load_family
from epd.request import ImageInput, Request, SamplingParams
from tests.helpers import AGG, EPD, PD, reference, run

SCALE = 112
SHAPE = dict(image_token_id=3, max_tiles=9, scale_resolution=SCALE, vision_merger_layer=1)
SIZES = [(120, 90), (300, 200), (640, 480), (61, 200), (200, 61), (1000, 300), (57, 57), (450, 450), (112, 336)]


def tiny(**kw) -> ModelConfig:
    vision = VisionTowerConfig(
        hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4, image_size=SCALE, hidden_act="gelu_pytorch_tanh"
    )
    text = TextModelConfig(arch="qwen2", rope_theta=1e6, max_position_embeddings=8192)
    return ModelConfig(name="tiny-minicpmv", family="minicpmv4_6", vision=vision, text=text, **SHAPE, **kw)


def _image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _navit(piece: torch.Tensor, mean, std) -> torch.Tensor:
    """One piece in the processor's packed layout [3, 14, patches * 14]."""
    _, h, w = piece.shape
    return normalize(piece, mean, std).reshape(3, h // 14, 14, w // 14, 14).permute(0, 2, 1, 3, 4).reshape(3, 14, -1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    hf = MiniCPMV4_6ForConditionalGeneration(load_family(tiny()).hf).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    path = tmp_path_factory.mktemp("minicpmv")
    hf.save_pretrained(path)
    return hf, ModelRuntime(ModelConfig(load_format="hf", path=str(path), **SHAPE), {"vision", "lm"})


@pytest.mark.parametrize("size", SIZES)
def test_slices_equal_the_processor(size):
    fam = load_family(tiny())
    im = _image(*size, seed=size[0])
    ref = MiniCPMV4_6ImageProcessorPil(scale_resolution=SCALE, max_slice_nums=9)(images=[im], return_tensors="pt")
    for pieces in (fam.preprocess(im), fam.preprocess(image_tensor(im), TorchOps)):
        assert [[p.shape[1] // 14, p.shape[2] // 14] for p in pieces] == ref["target_sizes"].tolist()
        packed = torch.cat([_navit(p, fam.pixel_mean, fam.pixel_std) for p in pieces], dim=-1)
        torch.testing.assert_close(packed, ref["pixel_values"][0], atol=1e-6, rtol=0)
    assert fam.num_image_tokens(*size) == int((ref["target_sizes"].prod(-1) // 16).sum())
    prompt = fam.build_prompt([], [size])
    assert prompt.count(fam.image_token_id) == fam.num_image_tokens(*size)
    rows = ref["grids"][0][0]  # the processor's rows of slices (0: none)
    assert prompt.count(fam.cfg.newline_token_id) == max(rows - 1, 0)
    assert prompt.count(fam.cfg.slice_start_token_id) == len(ref["target_sizes"]) - 1


def test_image_features_equal_transformers_piece_by_piece(checkpoint):
    """Pieces of several sizes in one pass (transformers' packed window merger assumes one size per pass:
    it is held to each piece alone)."""
    hf, ours = checkpoint
    fam = ours.family
    images = [fam.preprocess(_image(*s, seed=i)) for i, s in enumerate([(1000, 300), (120, 90), (61, 200)])]
    got = ours.encode(images)
    for pieces, feats in zip(images, got):
        want = []
        for p in pieces:
            size = torch.tensor([[p.shape[1] // 14, p.shape[2] // 14]], dtype=torch.int32)
            with torch.no_grad():
                want += hf.model.get_image_features(_navit(p, fam.pixel_mean, fam.pixel_std)[None], size).pooler_output
        torch.testing.assert_close(feats, torch.cat(want), atol=1e-5, rtol=1e-5)


def greedy_pairs(hf, ours, images, texts, cases, scale: int, eos_free: bool = False) -> list[tuple[list[int], list[int]]]:
    """(ours, transformers') 32 greedy tokens per case: `texts[k]` with the images `cases[k]` index. `eos_free`:
    the reference neither suppresses nor stops at EOS (as ignore_eos), instead of suppressing it for 32 tokens."""
    fam = ours.family
    proc = MiniCPMV4_6ImageProcessorPil(scale_resolution=scale, max_slice_nums=9)
    prompts = [fam.build_prompt(t, [images[i].size for i in case]) for t, case in zip(texts, cases)]
    mm = [torch.cat(ours.encode([fam.preprocess(images[i]) for i in case])) if case else None for case in cases]
    got = generate(ours, prompts, mm, [SamplingParams(max_tokens=32, ignore_eos=True)] * len(cases), block_size=5)
    pairs = []
    for case, prompt, out in zip(cases, prompts, got):
        kw = {}
        if case:
            px = proc(images=[images[i] for i in case], return_tensors="pt")
            kw = dict(pixel_values=px["pixel_values"], target_sizes=px["target_sizes"])
        if eos_free:
            hf.generation_config.eos_token_id = None
            kw.update(pad_token_id=0)
        else:
            kw.update(min_new_tokens=32)
        with torch.no_grad():
            ref = hf.generate(input_ids=torch.tensor([prompt]), max_new_tokens=32, do_sample=False, **kw)
        pairs.append((out, ref[0, len(prompt) :].tolist()))
    return pairs


def test_greedy_tokens_equal_transformers(checkpoint):
    hf, ours = checkpoint
    images = [_image(*s, seed=i) for i, s in enumerate([(640, 480), (300, 200), (450, 450)])]
    cases = [[0], [1, 2], [2, 0, 1], []]  # every piece of these images is 112 x 112: transformers packs them right
    for out, ref in greedy_pairs(hf, ours, images, [[20, 21, 22, 23]] * len(cases), cases, SCALE):
        assert out == ref
        assert len(set(out)) > 1


def _procedural(size, seed: int) -> ImageInput:
    return ImageInput(width=size[0], height=size[1], seed=seed)


def test_engine_deployments_equal_the_runtime(ray_cluster):
    model = tiny(seed=1)
    reqs = [
        Request(
            f"m{i}",
            prompt_token_ids=tuple(range(30 + i, 36 + 3 * i)),
            images=tuple(_procedural(SIZES[(2 * i + k) % len(SIZES)], 5 * i + k) for k in range(i % 3)),
            sampling=SamplingParams(max_tokens=6 + i, ignore_eos=True),
        )
        for i in range(6)
    ]
    expected = dict(zip([r.request_id for r in reqs], reference(reqs, model)))
    irp = DeploymentConfig(**{**EPD.__dict__, "irp": True, "encode": PoolConfig(instances=3, mm_blocks=64)})
    chunked = DeploymentConfig(name="aggregated", aggregated=PoolConfig(instances=1, kv_blocks=64, max_prefill_tokens=24))
    for deployment, executor in [(EPD, "ray"), (PD, "local"), (AGG, "local"), (irp, "local"), (chunked, "local")]:
        outs, _, _ = run(deployment, reqs, executor, model=model)
        assert {k: v.token_ids for k, v in outs.items()} == expected, (deployment.name, executor)
