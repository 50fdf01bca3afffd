"""Images prepared in processes of their own (`pool.prep_processes`, the default on GPU workers): the same pixels as
the worker's threads prepare, a bad image fails alone with its reason, a process that dies fails only the images it
held, and the engine's tokens do not change."""

from __future__ import annotations

import dataclasses
import io
import os
import signal

import pytest
import torch
from helpers import MODEL, reference, tiny_model_config

from epd.config import DeploymentConfig, PoolConfig
from epd.engine.host_prep import ImageProcesses, prepare_image
from epd.images import photo_like
from epd.models.runtime import load_family
from epd.request import ImageInput, Request, SamplingParams
from epd.serve.offline import OfflineLLM


def _encoded(width: int, height: int, fmt: str, seed: int) -> bytes:
    buf = io.BytesIO()
    photo_like(width, height, seed).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("family, resize", [("llava", "host"), ("internvl", "device"), ("internvl", "host")])
def test_processes_prepare_the_pixels_threads_do(family, resize):
    model = dataclasses.replace(tiny_model_config(family), image_resize=resize)
    fam = load_family(model)
    images = [
        ImageInput(data=_encoded(640, 480, "JPEG", 1)),
        ImageInput(data=_encoded(333, 517, "PNG", 2)),
        ImageInput(data=_encoded(1200, 90, "WEBP", 3)),
        ImageInput(width=211, height=97, seed=4),
    ]
    procs = ImageProcesses(model, 1)
    try:
        got = [procs.submit(im).result(timeout=120) for im in images]
    finally:
        procs.close()
    for im, (started, pixels) in zip(images, got):
        assert started > 0 and isinstance(pixels, torch.Tensor), pixels
        assert torch.equal(pixels, prepare_image(im, fam, resize == "device"))


def test_a_bad_image_or_a_dead_process_fails_only_its_images(tmp_path):
    procs = ImageProcesses(MODEL, 1)
    try:
        _, why = procs.submit(ImageInput(data=b"\xff\xd8 not really a jpeg")).result(timeout=120)
        assert isinstance(why, str) and "unreadable image" in why
        (pid,) = procs._pool._processes  # the one process: killed while it holds nothing, the next image finds it gone
        os.kill(pid, signal.SIGKILL)
        outcomes = [procs.submit(ImageInput(width=64, height=48, seed=s)).result(timeout=120)[1] for s in range(3)]
        assert all(isinstance(x, torch.Tensor) for x in outcomes[1:]), outcomes  # started again after the loss
        assert isinstance(outcomes[0], torch.Tensor) or "process failed" in outcomes[0]
    finally:
        procs.close()


def test_the_engine_gives_the_same_tokens_with_images_prepared_in_processes():
    reqs = [
        Request(
            f"p{i}",
            prompt_token_ids=tuple(range(30 + i, 42 + i)),
            images=tuple(ImageInput(data=_encoded(300 + 40 * k, 200 + 30 * i, "JPEG", 10 * i + k)) for k in range(1 + i % 3)),
            sampling=SamplingParams(max_tokens=6, ignore_eos=True),
        )
        for i in range(5)
    ]
    reqs.append(
        Request("bad", prompt_token_ids=(5, 6, 7), images=(ImageInput(data=b"\xff\xd8 broken"),), sampling=SamplingParams(max_tokens=3))
    )
    dep = DeploymentConfig(name="aggregated", aggregated=PoolConfig(instances=1, kv_blocks=128, num_cpus=1, prep_processes=True))
    with OfflineLLM(MODEL, dep, "local") as llm:  # the worker in this process, its images in one of their own
        outs = llm.generate(reqs)
        assert [w["image_prep"] for w in llm.core.worker_info()] == ["processes"]
        llm.core.drain_check()
    assert [list(o.token_ids) for o in outs[:-1]] == [list(t) for t in reference(reqs[:-1])]
    assert outs[-1].finish_reason == "abort" and "unreadable image" in outs[-1].abort_reason


def test_preparing_processes_leave_with_a_worker_killed_outright(tmp_path):
    """A worker killed (lost, hung, its node gone) closes nothing: its preparing processes find it gone and leave."""
    import subprocess
    import sys
    import time

    script = tmp_path / "holder.py"
    script.write_text(
        "import sys, time\n"
        "from helpers import MODEL\n"
        "from epd.engine.host_prep import ImageProcesses\n"
        "if __name__ == '__main__':\n"
        "    procs = ImageProcesses(MODEL, 2)\n"
        "    procs.wait_started()\n"
        "    print(*procs._pool._processes, flush=True)\n"  # both started; one may still be importing when killed
        "    time.sleep(600)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.path.dirname(os.path.dirname(__file__))]))
    holder = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        children = [int(p) for p in holder.stdout.readline().split()]
        assert len(children) == 2
        holder.kill()
        holder.wait(10)
        deadline = time.time() + 15
        while any(_alive(p) for p in children) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in children), children
    finally:
        holder.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has left
    except FileNotFoundError:
        return False


def test_the_jpeg_check_reads_two_bytes_and_agrees_with_the_bytes_it_routes(tmp_path):
    """Which path prepares an image is decided on its first two bytes; the nvJPEG path then takes its whole bytes."""
    from epd.engine.gpu_decode import is_jpeg, jpeg_bytes

    jpeg, png = _encoded(64, 48, "JPEG", 5), _encoded(64, 48, "PNG", 6)
    (tmp_path / "a.jpg").write_bytes(jpeg)
    (tmp_path / "b.jpg").write_bytes(png)  # a PNG under a JPEG's name: the bytes decide
    cases = [
        (ImageInput(data=jpeg), True),
        (ImageInput(data=png), False),
        (ImageInput(path=str(tmp_path / "a.jpg")), True),
        (ImageInput(path=str(tmp_path / "b.jpg")), False),
        (ImageInput(path=str(tmp_path / "missing.jpg")), False),
        (ImageInput(width=32, height=32, seed=1), False),
        (ImageInput(data=b""), False),
    ]
    for image, expected in cases:
        assert is_jpeg(image) is expected, image
        assert (jpeg_bytes(image) == jpeg) if expected else jpeg_bytes(image) is None, image
