"""How many kernels this process has compiled so far: each specialisation of the project's Triton kernels, and
torch.compile's graphs. A worker counts them around every batch, so a compilation inside a served batch (each
costs hundreds of milliseconds on a GPU: `bench/mixed_first.py`) shows in the run's batch records instead of
passing for a slow step. Only modules already imported are read: counting never imports Triton or dynamo."""

from __future__ import annotations

import sys

TRITON_MODULES = ("epd.kernels.triton_decode", "epd.kernels.triton_elementwise", "epd.kernels.triton_gated_delta")


def _kernel_caches(module) -> list:
    """The per-device caches of a module's Triton functions (`JITFunction.device_caches`)."""
    found = []
    for obj in vars(module).values():
        caches = getattr(obj, "device_caches", None)
        if isinstance(caches, dict):
            found.append(caches)
    return found


_found: dict[str, list] = {}


def compiled_so_far() -> int:
    n = 0
    for name in TRITON_MODULES:
        module = sys.modules.get(name)
        if module is None or getattr(module.__spec__, "_initializing", False):  # absent, or still being imported
            continue
        if name not in _found:
            _found[name] = _kernel_caches(module)
        for caches in _found[name]:
            try:
                n += sum(len(per_device[0]) for per_device in caches.values())
            except (TypeError, IndexError, KeyError):  # a Triton that keeps its compiled kernels otherwise
                pass
    dynamo = sys.modules.get("torch._dynamo.utils")
    if dynamo is not None:
        n += int(dynamo.counters["stats"]["unique_graphs"])
    return n
