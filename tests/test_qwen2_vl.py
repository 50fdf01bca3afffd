"""Qwen2-VL and Qwen2.5-VL: preprocessing, M-RoPE positions and greedy tokens against transformers,
then through the engine in every deployment."""

import random

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from epd.config import DeploymentConfig, ModelConfig, PoolConfig, TextModelConfig, VisionTowerConfig
from epd.models.generate import generate
from epd.models.image_processing import TorchOps, image_tensor, normalize
from epd.models.mrope import rope_layout
from epd.models.qwen2_vl import patchify
from epd.models.runtime import ModelRuntime, load_family
from epd.request import ImageInput, Request, SamplingParams, VideoInput
from epd.video import VideoLayout
from tests.helpers import AGG, EPD, PD, reference, run, tiny_model_config

MAX_PIXELS = 28 * 28 * 24
HF_CLASSES = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}
SIZES = [(120, 90), (61, 200), (300, 300), (30, 20), (1000, 40), (57, 57), (640, 480)]


def tiny(family: str, **kw) -> ModelConfig:
    vision = VisionTowerConfig(hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, window_size=56, full_attention_every=2)
    if family == "qwen2_5_vl":
        vision = VisionTowerConfig(**{**vision.__dict__, "hidden_act": "silu"})
    text = TextModelConfig(arch="qwen2", rope_theta=1e6, max_position_embeddings=8192)
    return ModelConfig(name=f"tiny-{family}", family=family, image_token_id=3, max_pixels=MAX_PIXELS, vision=vision, text=text, **kw)


def _image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def checkpoint(request, tmp_path_factory):
    family = request.param
    torch.manual_seed(0)
    hf = HF_CLASSES[family](load_family(tiny(family)).hf).eval()
    with torch.no_grad():  # spread transformers' init so that tokens differ
        for p in hf.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    path = tmp_path_factory.mktemp(family)
    hf.save_pretrained(path)
    ours = ModelRuntime(ModelConfig(load_format="hf", path=str(path), max_pixels=MAX_PIXELS), {"vision", "lm"})
    return hf, ours


@pytest.mark.parametrize("size", SIZES)
def test_pixels_and_grids_equal_the_processor(size):
    fam = load_family(tiny("qwen2_vl"))
    im = _image(*size, seed=size[0])
    ref = Qwen2VLImageProcessorPil(min_pixels=fam.cfg.min_pixels, max_pixels=MAX_PIXELS)(images=[im], return_tensors="pt")
    for px in (fam.preprocess(im), fam.preprocess(image_tensor(im), TorchOps)):
        patches, grid = patchify(normalize(px, fam.pixel_mean, fam.pixel_std), 14, 2, 2)
        assert list(grid) == ref["image_grid_thw"][0].tolist()
        torch.testing.assert_close(patches, ref["pixel_values"], atol=1e-6, rtol=0)  # the device path resizes bit for bit too
    t, h, w, _ = fam.grid(*size)
    assert fam.num_image_tokens(*size) == ref["image_grid_thw"][0].prod().item() // 4 == t * h * w


def test_extreme_aspect_ratio_is_refused_with_its_reason():
    with pytest.raises(ValueError, match="aspect ratio"):
        load_family(tiny("qwen2_vl")).num_image_tokens(4000, 10)


@pytest.mark.parametrize("seed", range(6))
def test_rope_positions_equal_transformers(checkpoint, seed):
    hf, ours = checkpoint
    rng = random.Random(seed)
    fam = ours.family
    sizes = [rng.choice(SIZES) for _ in range(rng.randint(1, 3))]
    text = [rng.randrange(20, 500) for _ in range(rng.randint(0, 6))]
    if seed % 2:  # markers in the text: each image where the text puts it, possibly last
        for _ in sizes:
            text.insert(rng.randint(0, len(text)), fam.image_token_id)
    prompt = fam.build_prompt(text, sizes)
    layout = fam.rope_layout(prompt, sizes)
    ids = torch.tensor([prompt])
    grids = torch.tensor([[1, 2 * h, 2 * w] for _, h, w, _ in (fam.grid(*s) for s in sizes)])
    ref, delta = hf.model.get_rope_index(ids, (ids == fam.image_token_id).int(), grids)
    assert torch.equal(layout.positions(0, len(prompt)), ref[:, 0])
    assert layout.delta == int(delta)
    cut = rng.randrange(1, len(prompt))  # any chunk: the same positions as the whole
    assert torch.equal(torch.cat([layout.positions(0, cut), layout.positions(cut, len(prompt) + 3)], 1)[:, : len(prompt)], ref[:, 0])
    past = layout.positions(len(prompt), len(prompt) + 4)
    assert torch.equal(past, (torch.arange(len(prompt), len(prompt) + 4) + layout.delta).expand(3, -1))


@pytest.mark.parametrize("fps", [None, 1.0, 2.0])
def test_video_positions_equal_transformers(checkpoint, fps):
    """A video then an image: temporal positions (Qwen2.5-VL: spaced by seconds) and what follows."""
    hf, ours = checkpoint
    fam = ours.family
    video = VideoLayout(120, 90, 3, fps)
    prompt = fam.build_prompt([20, 21], [(61, 200)], [video])
    layout = fam.rope_layout(prompt, [(61, 200)], [video])
    ids, types = _hf_ids(fam, prompt, [video])
    _, h, w, _ = fam.grid(120, 90)
    kw = {"second_per_grid_ts": torch.tensor([2 / fps if fps else 1.0])} if isinstance(hf, Qwen2_5_VLForConditionalGeneration) else {}
    _, ih, iw, _ = fam.grid(61, 200)
    ref, delta = hf.model.get_rope_index(
        ids, types, image_grid_thw=torch.tensor([[1, 2 * ih, 2 * iw]]), video_grid_thw=torch.tensor([[3, 2 * h, 2 * w]]), **kw
    )
    assert torch.equal(layout.positions(0, len(prompt)), ref[:, 0]) and layout.delta == int(delta)


def _hf_ids(fam, prompt: list[int], videos) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' input ids and token types for our prompt: a video's placeholders are its video token."""
    ids, types, at = list(prompt), [1 if t == fam.image_token_id else 0 for t in prompt], prompt.index(fam.image_token_id)
    for v in videos:
        t, h, w, _ = fam.video_grid(v)
        for i in range(at, at + t * h * w):
            ids[i], types[i] = fam.cfg.video_token_id, 2
        at = prompt.index(fam.image_token_id, at + t * h * w) if fam.image_token_id in prompt[at + t * h * w :] else len(prompt)
    return torch.tensor([ids]), torch.tensor([types])


def test_video_tokens_equal_transformers(checkpoint):
    """Frames (an odd count: the last segment padded) encoded segment by segment equal transformers' video
    tower over the whole grid; greedy tokens equal for a video with and without an image."""
    hf, ours = checkpoint
    fam = ours.family
    frames = [_image(120, 90, seed=50 + i) for i in range(5)]
    video = VideoLayout(120, 90, 3, 2.0)
    stacks = [frames[i : i + 2] for i in range(0, 4, 2)] + [[frames[4], frames[4]]]
    pixels = [fam.preprocess_frames(s) for s in stacks]
    got = torch.cat(ours.encode(pixels))
    whole = torch.cat([normalize(p, fam.pixel_mean, fam.pixel_std) for p in pixels])
    patches, (t, gh, gw) = patchify(whole, 14, 2, 2)
    grid = torch.tensor([[t, gh, gw]])
    with torch.no_grad():
        want = torch.cat(list(hf.model.get_video_features(patches, grid).pooler_output))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    image = _image(61, 200, seed=9)
    for sizes in ([], [image.size]):
        prompt = fam.build_prompt([20, 21, 22], sizes, [video])
        mm = torch.cat([got] + ([torch.cat(ours.encode([fam.preprocess(image)]))] if sizes else []))
        out = generate(
            ours, [prompt], [mm], [SamplingParams(max_tokens=24, ignore_eos=True)], rope=[fam.rope_layout(prompt, sizes, [video])]
        )[0]
        ids, types = _hf_ids(fam, prompt, [video])
        kw = dict(pixel_values_videos=patches, video_grid_thw=grid, mm_token_type_ids=types)
        if isinstance(hf, Qwen2_5_VLForConditionalGeneration):
            kw["second_per_grid_ts"] = torch.tensor([1.0])
        if sizes:
            px = Qwen2VLImageProcessorPil(min_pixels=fam.cfg.min_pixels, max_pixels=MAX_PIXELS)(images=[image], return_tensors="pt")
            kw.update(pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"])
        with torch.no_grad():
            ref = hf.generate(input_ids=ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, **kw)
        assert out == ref[0, len(prompt) :].tolist()


def test_placeholder_count_mismatch_is_refused():
    with pytest.raises(ValueError, match="fewer placeholders"):
        rope_layout([1, 3, 3], 3, [(1, 2, 2, 1)])
    with pytest.raises(ValueError, match="more placeholders"):
        rope_layout([1, 3, 3, 3, 3, 3], 3, [(1, 2, 2, 1)])


def test_greedy_tokens_equal_transformers(checkpoint):
    hf, ours = checkpoint
    fam = ours.family
    images = [_image(*s, seed=i) for i, s in enumerate(SIZES[:3])]
    cases = [[0], [1, 2], [2, 0, 1], []]
    prompts, mm, rope = [], [], []
    for case in cases:
        sizes = [images[i].size for i in case]
        prompts.append(fam.build_prompt([20, 21, 22, 23], sizes))
        rope.append(fam.rope_layout(prompts[-1], sizes))
        emb = ours.encode([fam.preprocess(images[i]) for i in case])
        mm.append(torch.cat(emb) if emb else None)
    got = generate(ours, prompts, mm, [SamplingParams(max_tokens=32, ignore_eos=True)] * len(cases), block_size=5, rope=rope)
    proc = Qwen2VLImageProcessorPil(min_pixels=fam.cfg.min_pixels, max_pixels=MAX_PIXELS)
    for case, prompt, out in zip(cases, prompts, got):
        ids = torch.tensor([prompt])
        kw = {}
        if case:
            px = proc(images=[images[i] for i in case], return_tensors="pt")
            kw = dict(pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"], mm_token_type_ids=(ids == 3).int())
        with torch.no_grad():
            ref = hf.generate(input_ids=ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, **kw)
        assert out == ref[0, len(prompt) :].tolist()
        assert len(set(out)) > 1


def _procedural(size, seed: int) -> ImageInput:
    return ImageInput(width=size[0], height=size[1], seed=seed)


def _requests(n=6):
    return [
        Request(
            f"q{i}",
            prompt_token_ids=tuple(range(30 + i, 36 + 3 * i)),
            images=tuple(_procedural(SIZES[(i + k) % len(SIZES)], 7 * i + k) for k in range(i % 3)),
            sampling=SamplingParams(max_tokens=6 + i, ignore_eos=True),
            videos=(VideoInput(tuple(_procedural((120, 90), 900 + 10 * i + f) for f in range(3 + i)), fps=2.0),) if i % 2 else (),
        )
        for i in range(n)
    ]


CHUNKED = DeploymentConfig(name="aggregated", aggregated=PoolConfig(instances=1, kv_blocks=64, max_prefill_tokens=24))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_engine_deployments_equal_the_runtime(ray_cluster, family):
    model = tiny(family, seed=1)
    reqs = _requests()
    expected = dict(zip([r.request_id for r in reqs], reference(reqs, model)))
    irp = DeploymentConfig(**{**EPD.__dict__, "irp": True, "encode": PoolConfig(instances=3, mm_blocks=64)})
    cases = [(EPD, "ray"), (PD, "ray"), (AGG, "local"), (irp, "local"), (CHUNKED, "local")]
    if family == "qwen2_5_vl":
        cases = cases[:1] + cases[3:]
    for deployment, executor in cases:
        outs, _, _ = run(deployment, reqs, executor, model=model)
        assert {k: v.token_ids for k, v in outs.items()} == expected, (deployment.name, executor)


def test_videos_for_families_without_them_and_bad_frames_are_refused(ray_cluster):
    frames = (_procedural((120, 90), 1), _procedural((120, 90), 2))
    reqs = [
        Request("ok", prompt_token_ids=(30, 31), videos=(VideoInput(frames),), sampling=SamplingParams(max_tokens=3)),
        Request("sizes", prompt_token_ids=(30,), videos=(VideoInput((frames[0], _procedural((60, 90), 3))),)),
        Request("empty", prompt_token_ids=(30,), videos=(VideoInput(()),)),
    ]
    outs, _, _ = run(AGG, reqs, "local", model=tiny("qwen2_vl"))
    assert outs["ok"].finish_reason == "length"
    assert outs["sizes"].finish_reason == "abort" and "frames differ in size" in outs["sizes"].abort_reason
    assert outs["empty"].finish_reason == "abort" and "non-empty" in outs["empty"].abort_reason
    outs, _, _ = run(AGG, reqs[:1], "local", model=tiny_model_config("llava"))
    assert outs["ok"].finish_reason == "abort" and "takes no video" in outs["ok"].abort_reason


def _mp4(frames: int = 24, rate: int = 8) -> bytes:
    """A small MPEG-4 clip whose frames brighten one after another."""
    import io

    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 10 * i, np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buf.getvalue()


def test_a_video_file_is_sampled_at_its_rate():
    from epd.images import load_image
    from epd.video import decode_video

    video = decode_video(_mp4(), fps=2.0)  # 3 s at 8 frames a second
    assert len(video.frames) == 6 and video.fps == 2.0  # 3 s x 2 a second
    levels = [int(np.asarray(load_image(f))[20, 30, 0]) for f in video.frames]
    assert levels == sorted(levels) and levels[-1] - levels[0] > 100  # spread over the clip, in order
    with pytest.raises(ValueError, match="could not be decoded"):
        decode_video(b"not a video")


def test_the_server_takes_video_url_parts(ray_cluster, tmp_path):
    """A chat message with an MPEG-4 video (data URL) and text: answered, the tokens those of the same
    frames sent straight to the engine; an undecodable video is a 400 naming it."""
    import asyncio
    import base64

    import httpx
    import openai

    from epd.config import RunConfig
    from epd.serve.app import render_chat
    from epd.serve.async_llm import AsyncLLM
    from epd.serve.protocol import ChatCompletionRequest
    from tests.serving import _serve

    model = tiny("qwen2_vl")
    engine = AsyncLLM(model, AGG, "local")
    live = _serve(engine, model=model)
    try:
        url = "data:video/mp4;base64," + base64.b64encode(_mp4()).decode()
        msg = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "what happens?"}]}]
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        out = client.chat.completions.create(model=model.name, messages=msg, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
        assert out.choices[0].finish_reason == "length"
        [(ids, _, videos)] = render_chat(ChatCompletionRequest(messages=msg), RunConfig(), engine.core.pipeline.tokenizer)
        assert len(videos) == 1 and len(videos[0].frames) == 6
        req = Request("direct", prompt_token_ids=tuple(ids), videos=videos, sampling=SamplingParams(max_tokens=6, ignore_eos=True))

        async def direct():
            return [t for d in [d async for d in engine.generate(req)] for t in d.token_ids]

        assert out.choices[0].message.content == engine.core.pipeline.tokenizer.decode(asyncio.run(direct()))
        bad = [
            {
                "role": "user",
                "content": [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(b"junk").decode()}}],
            }
        ]
        resp = httpx.post(live.url + "/v1/chat/completions", json={"model": model.name, "messages": bad}, timeout=30)
        assert resp.status_code == 400 and "video could not be decoded" in resp.text and "video_url" in resp.text
    finally:
        live.stop()
        engine.close()


def test_a_checkpoints_processor_config_sets_the_pixel_bounds(checkpoint, tmp_path):
    """Loaded from a checkpoint directory that ships preprocessor_config.json, images are sized by its
    min/max pixels (as the processor saved with the model would size them), not by the config's."""
    import json
    import shutil

    hf, ours = checkpoint
    src = ours.cfg.path
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    (dst / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 28 * 28 * 8}))
    from epd.models.runtime import load_family as load

    fam = load(ModelConfig(load_format="hf", path=str(dst), max_pixels=MAX_PIXELS))
    assert fam.pixel_bounds == (3136, 28 * 28 * 8)
    ref = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=28 * 28 * 8)(images=[_image(640, 480, 1)], return_tensors="pt")
    assert fam.num_image_tokens(640, 480) == ref["image_grid_thw"][0].prod().item() // 4 < ours.family.num_image_tokens(640, 480)
