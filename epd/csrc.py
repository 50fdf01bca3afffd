"""Builds and loads the csrc/ extension (JIT, torch.utils.cpp_extension) once per process.

The C++ part (host block copies, run coalescing) builds wherever a C++ compiler is present; the
CUDA part (one-launch batched peer copy, CUDA IPC) is added when CUDA and nvcc are there. If
the build fails, callers use the pure-torch path and one log line says why.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import shutil
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

log = logging.getLogger(__name__)
CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("block_copy.cpp", "block_copy_cuda.cu")


def _want_cuda() -> bool:
    return torch.cuda.is_available() and shutil.which("nvcc") is not None and os.environ.get("EPD_CSRC_CUDA", "1") != "0"


def _build_dir(cuda: bool) -> Path:
    digest = hashlib.sha1(b"".join((CSRC / s).read_bytes() for s in SOURCES)).hexdigest()[:12]
    root = Path(os.environ.get("EPD_CSRC_BUILD", Path.home() / ".cache" / "epd" / "csrc"))
    path = root / f"{'cuda' if cuda else 'cpu'}-{torch.__version__.replace('+', '_')}-{digest}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.lru_cache(maxsize=1)
def block_ops() -> Optional[ModuleType]:
    """The compiled module, or None (with one log line naming the reason) when it cannot be built."""
    if os.environ.get("EPD_CSRC", "1") == "0":
        log.info("epd csrc extension disabled (EPD_CSRC=0); using the pure-torch block copy path")
        return None
    from torch.utils import cpp_extension

    cuda = _want_cuda()
    sources = [str(CSRC / SOURCES[0])] + ([str(CSRC / SOURCES[1])] if cuda else [])
    flags = ["-O3"] + (["-DEPD_WITH_CUDA"] if cuda else [])
    build_dir = _build_dir(cuda)
    try:
        # Workers of one node build at once: one builds, the others wait. An flock dies with its holder,
        # so a build killed half-way cannot leave the others waiting on torch's own lock file forever.
        with open(build_dir / ".epd-build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            (build_dir / "lock").unlink(missing_ok=True)  # torch's baton, stale if a builder was killed
            module = cpp_extension.load(
                name="epd_block_ops_cuda" if cuda else "epd_block_ops",
                sources=sources,
                extra_cflags=flags,
                extra_cuda_cflags=["-O3", "-DEPD_WITH_CUDA"],
                build_directory=str(build_dir),
                with_cuda=cuda,
                verbose=False,
            )
    except Exception as exc:  # no compiler, no ninja, a header mismatch: the torch path still works
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        log.warning("epd csrc extension unavailable (%s); using the pure-torch block copy path", reason)
        return None
    log.info("epd csrc extension loaded (%s)", "CPU + CUDA" if module.has_cuda() else "CPU only")
    return module
