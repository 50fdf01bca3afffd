"""Kernels compiled inside a run's batches: counted per batch on the worker (`kernels.compilations`), carried in
the batch records and the summary, so a compilation inside a served batch never passes for a slow step."""

from __future__ import annotations

import sys
import types

from helpers import EPD, MODEL, workload

from epd.experiment import format_summary
from epd.kernels import compilations
from epd.run_result import batch_stats
from epd.serve.offline import OfflineLLM


class _FakeJit:
    """What the count reads of a Triton function: per device, a cache of compiled kernels first."""

    def __init__(self):
        self.device_caches = {0: ({}, "target", "backend")}

    def compile_one(self, key):
        self.device_caches[0][0][key] = object()


def test_the_count_reads_every_loaded_kernel_module_and_only_those(monkeypatch):
    fake = types.ModuleType(compilations.TRITON_MODULES[0])
    fake.kernel_a, fake.kernel_b, fake.not_a_kernel = _FakeJit(), _FakeJit(), 3
    monkeypatch.setattr(compilations, "_found", {})
    for name in compilations.TRITON_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    base = compilations.compiled_so_far()  # torch.compile's graphs where dynamo is loaded
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    assert compilations.compiled_so_far() == base
    fake.kernel_a.compile_one("x")
    fake.kernel_b.compile_one("x")
    fake.kernel_b.compile_one("y")
    assert compilations.compiled_so_far() == base + 3
    fake.kernel_a.device_caches[1] = ({"z": object()}, None, None)  # a second device
    assert compilations.compiled_so_far() == base + 4


def test_a_compilation_inside_a_batch_reaches_its_record_and_the_summary(monkeypatch):
    """The local engine with a counter that moves once, inside the run's first batch: that batch's record says
    so, and the run's stats and printed summary warn of it."""
    import epd.engine.worker as worker_module

    with OfflineLLM(MODEL, EPD, "local") as llm:
        reads = []

        def one_compiled_after_the_first_read() -> int:  # the first read is the first batch's `before`
            reads.append(None)
            return 0 if len(reads) == 1 else 1

        monkeypatch.setattr(worker_module, "compiled_so_far", one_compiled_after_the_first_read)  # warm-up done
        llm.generate(workload(3))
        records = list(llm.core.batches)
    compiled = [r.compiled for r in records]
    assert sum(compiled) == 1 and compiled[0] == 1, compiled
    stats = batch_stats(records)
    assert stats["kernels_compiled_in_run"] == 1
    summary = {
        "model": "m", "deployment": "d", "backend": "ray", "workload": "w", "num_finished": 1, "num_requests": 1, "num_aborted": 0,
        "duration": 1.0, "ttft_mean": 0.1, "ttft_p50": 0.1, "ttft_p90": 0.1, "ttft_p99": 0.1, "tpot_mean": 0.01, "tpot_p50": 0.01,
        "tpot_p90": 0.01, "tpot_p99": 0.01, "e2e_p50": 0.2, "e2e_p90": 0.2, "slo_attainment": 1.0, "slo_ttft": 1, "slo_tpot": 1,
        "request_throughput": 1.0, "output_throughput": 1.0, **stats,
    }  # fmt: skip
    assert "1 kernels compiled inside the run's batches" in format_summary(summary)
    assert "compiled inside" not in format_summary({**summary, "kernels_compiled_in_run": 0})
