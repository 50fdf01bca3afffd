"""Where an encoding worker decodes and resizes images on its host: processes of their own, or threads of the worker.

A GPU worker's batch thread holds the interpreter lock for much of every step (building inputs, launching,
sampling). Threads that prepare images beside it take the lock back at every return from Pillow, numpy or torch,
and wait for it each time: on one H200, a batch of 12 MP photos took 406-464 ms to prepare in threads beside an
aggregated worker's decode steps, 343 ms in processes, 283 ms when the steps waited for it (one run each,
`bench/results/h200-2026-11-29-prep`). Processes share no lock. Each one builds the model family's preprocessing
(no weights) once and returns its images' pixels by value: uint8, 0.3 MB a LLaVA image, 8 MB an InternVL one.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from concurrent.futures.process import BrokenProcessPool
from typing import Optional

import numpy as np
import torch

from epd.config import ModelConfig
from epd.images import ImageError, load_image
from epd.request import ImageInput

_child: dict = {}  # in a preparing process: the model family and where images are resized


def _start(model: ModelConfig, parent: int) -> None:
    from epd.models.runtime import load_family

    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    torch.set_num_threads(1)  # one image a process: the process is the unit of parallelism
    _child["family"] = load_family(model)
    _child["resize_on_device"] = model.image_resize == "device"


def _exit_with(parent: int, every_s: float = 1.0) -> None:
    """A worker killed outright (a lost or hung worker, a node gone) leaves its preparing processes behind: each
    one leaves as soon as it finds its parent gone (`parent` as the worker gave it: a process still starting
    when its worker died finds another parent at once)."""
    while os.getppid() == parent:
        time.sleep(every_s)
    os._exit(0)


def _ready() -> bool:
    return "family" in _child


def prepare_image(image: ImageInput, family, resize_on_device: bool) -> torch.Tensor:
    """One image's pixels as the tower's batch takes them from the host: resized and tiled ([tiles, 3, S, S]
    uint8), or decoded only ([3, H, W] uint8) where the device resizes."""
    from epd.models.image_processing import _to_tensor

    im = load_image(image)
    return _to_tensor(im) if resize_on_device else family.preprocess(im)


def _prepare(image: ImageInput) -> tuple[float, np.ndarray | str]:
    started = time.time()
    try:
        return started, prepare_image(image, _child["family"], _child["resize_on_device"]).numpy()
    except ImageError as exc:
        return started, str(exc)
    except Exception as exc:  # this image's failure, not the batch's
        return started, f"image could not be prepared: {type(exc).__name__}: {exc}"


class ImageProcesses:
    """`workers` processes that prepare images; `submit` gives a future of (when it began, pixels or the reason
    it failed). A process that dies fails the images it held, and the pool is started again for the next."""

    def __init__(self, model: ModelConfig, workers: int):
        self.model, self.workers = model, max(1, workers)
        self._pool: Optional[ProcessPoolExecutor] = None
        self._open()

    def _open(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that holds CUDA and Ray state
        self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_start, initargs=(self.model, os.getpid()))
        # started now (beside a worker's weights loading), not at the first image
        self._started = [self._pool.submit(_ready) for _ in range(self.workers)]

    def wait_started(self, timeout_s: float = 120.0) -> None:
        """Until every process has started and built its preprocessing (a benchmark times from here)."""
        wait_futures(self._started, timeout=timeout_s)

    def submit(self, image: ImageInput) -> Future:
        out: Future = Future()
        try:
            inner = self._pool.submit(_prepare, image)
        except BrokenProcessPool:
            self._restart()
            inner = self._pool.submit(_prepare, image)
        inner.add_done_callback(lambda f: out.set_result(self._unpacked(f)))
        return out

    def _unpacked(self, f: Future) -> tuple[float, torch.Tensor | str]:
        try:
            started, pixels = f.result()
        except Exception as exc:  # the process died (killed, out of memory): this image fails, the pool restarts
            return time.time(), f"image could not be prepared: its process failed: {type(exc).__name__}: {exc}"
        return started, pixels if isinstance(pixels, str) else torch.from_numpy(pixels)

    def _restart(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._open()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
