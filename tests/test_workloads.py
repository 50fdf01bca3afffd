"""The serving-mix workload generator: long-tailed answers ending with EOS, long prompts, repeated
images, shared system prompts; synthetic images encoded as JPEG files once; and the tiny serving mix
end to end through the CLI (engine on CPU and simulator)."""

from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from epd.config import WorkloadConfig
from epd.workload import build_workload, output_length

ROOT = Path(__file__).resolve().parent.parent
MIX = WorkloadConfig(
    num_requests=400,
    images_per_request=1,
    images_per_request_max=2,
    image_width=64,
    image_height=48,
    output_dist="lognormal",
    output_tokens=40,
    output_tokens_max=400,
    answer_lengths=True,
    ignore_eos=False,
    long_prompt_share=0.2,
    long_prompt_tokens=500,
    repeat_image_share=0.4,
    image_pool=5,
    system_prompt_tokens=30,
    system_prompts=3,
)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_the_serving_mix_draws_what_it_says(seed):
    cfg = dataclasses.replace(MIX, seed=seed)
    reqs = build_workload(cfg, 512, {0, 1, 2, 3})
    answers = [r.sampling.answer_tokens for r in reqs]
    assert all(r.sampling.max_tokens == 400 and not r.sampling.ignore_eos for r in reqs)
    assert all(1 <= a <= 400 for a in answers)
    assert 30 <= statistics.mean(answers) <= 52 and max(answers) > 4 * statistics.median(answers)  # a long tail
    long = sum(1 for r in reqs if len(r.prompt_token_ids) >= 500) / len(reqs)
    assert 0.14 <= long <= 0.26
    images = [im for r in reqs for im in r.images]
    popular = [im for im in images if im.seed >= 1 << 40]
    assert 0.33 <= len(popular) / len(images) <= 0.47 and len({im.seed for im in popular}) <= 5
    assert len({r.prompt_token_ids[:30] for r in reqs}) == 3  # three shared system prompts
    again = build_workload(cfg, 512, {0, 1, 2, 3})
    assert [r.prompt_token_ids for r in again] == [r.prompt_token_ids for r in reqs]  # seeded


def test_a_workload_without_the_mix_keeps_its_requests():
    """The mix draws from a stream of its own: existing workloads generate the requests they did."""
    plain = WorkloadConfig(num_requests=20, prompt_tokens=8, prompt_tokens_max=30, output_tokens=4, output_tokens_max=12)
    a = build_workload(plain, 512, set())
    b = build_workload(dataclasses.replace(plain, system_prompts=4), 512, set())
    assert [(r.prompt_token_ids, r.sampling.max_tokens, r.images) for r in a] == [
        (r.prompt_token_ids, r.sampling.max_tokens, r.images) for r in b
    ]
    assert all(r.sampling.answer_tokens is None for r in a)


def test_bad_mix_fields_are_refused():
    import numpy as np

    for bad, word in (
        (dict(long_prompt_share=1.5), "long_prompt_share"),
        (dict(answer_lengths=True, ignore_eos=True), "ignore_eos"),
        (dict(image_pool=0), "image_pool"),
        (dict(image_format="gif"), "image_format"),
    ):
        with pytest.raises(ValueError, match=word):
            build_workload(dataclasses.replace(MIX, num_requests=2, **bad), 512, set())
    with pytest.raises(ValueError, match="output_dist"):
        output_length(dataclasses.replace(MIX, output_dist="zipf"), np.random.default_rng(0))


def test_jpeg_images_are_encoded_once_and_reused(tmp_path):
    cfg = dataclasses.replace(MIX, num_requests=12, image_format="jpeg", image_cache_dir=str(tmp_path), image_width=300, image_height=200)
    reqs = build_workload(cfg, 512, set())
    paths = [im.path for r in reqs for im in r.images]
    assert all(p and p.endswith(".jpg") and os.path.exists(p) for p in paths)
    with Image.open(paths[0]) as im:
        assert im.format == "JPEG" and im.size == (300, 200)
    stamps = {p: os.stat(p).st_mtime_ns for p in paths}
    again = build_workload(cfg, 512, set())
    assert [im.path for r in again for im in r.images] == paths
    assert all(os.stat(p).st_mtime_ns == t for p, t in stamps.items())  # not written again
    assert not list(tmp_path.glob("*.part"))


@pytest.mark.parametrize("backend", ["local", "sim"])
def test_the_tiny_serving_mix_runs_from_the_cli(tmp_path, backend):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "RAY_AUTH_MODE": "disabled",
        "EPD_IMAGE_CACHE": str(tmp_path / "img"),
    }
    args = ["workload=serving_mix_tiny", "workload.image_format=jpeg", "workload.num_requests=16", f"backend={backend}", "logger=none"]
    proc = subprocess.run(
        [sys.executable, "-m", "epd.run", *args, f"hydra.run.dir={tmp_path}/run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["num_finished"] == 16 and s["num_aborted"] == 0
    assert s["encoder_cache_hits"] > 0 and "prefix_cache_hit_rate" in s and "preemptions" in s


def test_images_follow_the_system_prompt_for_a_model():
    """For a model, the mix marks each image right after the system prompt (as chat templates do), so
    the system prompt is a prefix shared across pictures."""
    from helpers import MODEL

    from epd.models.runtime import load_family
    from epd.workload import requests_for

    reqs = requests_for(dataclasses.replace(MIX, num_requests=30), load_family(MODEL))
    tok = MODEL.image_token_id
    for r in reqs:
        ids = list(r.prompt_token_ids)
        assert ids.count(tok) == len(r.images) and ids[30 : 30 + len(r.images)] == [tok] * len(r.images)


def test_video_requests_carry_their_frames():
    cfg = WorkloadConfig(num_requests=5, images_per_request=1, videos_per_request=2, video_frames=5, video_fps=4.0)
    reqs = build_workload(cfg, 512, set())
    again = build_workload(cfg, 512, set())
    assert reqs == again  # seeded
    for r in reqs:
        assert len(r.images) == 1 and len(r.videos) == 2
        assert all(len(v.frames) == 5 and v.fps == 4.0 for v in r.videos)
        assert {(f.width, f.height) for v in r.videos for f in v.frames} == {(cfg.image_width, cfg.image_height)}
    seeds = [f.seed for r in reqs for v in r.videos for f in v.frames]
    assert len(set(seeds)) == len(seeds)  # every frame its own picture
    assert all(r.videos == () for r in build_workload(dataclasses.replace(cfg, videos_per_request=0), 512, set()))
