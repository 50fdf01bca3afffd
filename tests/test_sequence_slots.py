"""An instance that decodes holds the KV of at most `max_decode_seqs` sequences (vLLM's max_num_seqs): where it
also prefills, prompts are not prefilled ahead into a pool the running sequences need to grow, so a burst larger
than the decode batch runs without the running sequences preempting each other."""

import dataclasses

import pytest
from helpers import MODEL, reference, run

from epd.config import BackendConfig, DeploymentConfig, PoolConfig, RunConfig, WorkloadConfig
from epd.lifetime import LifetimeEvent as Ev
from epd.request import ImageInput, Request, SamplingParams
from simulator.backend import SimBackend


def _burst(n: int, max_tokens: int) -> list[Request]:
    return [
        Request(
            f"s{i}",
            prompt_token_ids=tuple((j * 5 + i) % 300 + 10 for j in range(12 + i % 5)),
            images=tuple(ImageInput(width=96, height=80, seed=i) for _ in range(i % 2)),
            sampling=SamplingParams(max_tokens=max_tokens + i % 3, ignore_eos=True),
        )
        for i in range(n)
    ]


def _most_holding_kv(events, instance: str) -> int:
    """The most sequences holding KV on `instance` at once: from admission (a prefill's first begin there, or
    a decode's begin there when prefilled elsewhere) to FINISHED or PREEMPTED."""
    holding, most = set(), 0
    for ev in sorted(events, key=lambda e: (e.time, e.kind != Ev.FINISHED and e.kind != Ev.PREEMPTED)):
        if ev.kind in (Ev.FINISHED, Ev.PREEMPTED):
            holding.discard(ev.request_id)
        elif ev.instance == instance and ev.kind in (Ev.PREFILL_BEGIN, Ev.DECODE_BEGIN):
            holding.add(ev.request_id)
        most = max(most, len(holding))
    return most


def _aggregated(max_seqs: int, kv_blocks: int, allocation: str = "on_demand") -> DeploymentConfig:
    pool = PoolConfig(instances=1, kv_blocks=kv_blocks, kv_block_size=8, max_decode_seqs=max_seqs, max_prefill_tokens=256)
    return DeploymentConfig(name="aggregated", aggregated=pool, kv_allocation=allocation)


@pytest.mark.parametrize("max_seqs", [1, 3, 6])
@pytest.mark.parametrize("allocation", ["on_demand", "reserve"])
def test_the_simulator_never_holds_more_sequences_than_the_decode_batch(max_seqs, allocation):
    dep = _aggregated(max_seqs, kv_blocks=400, allocation=allocation)  # room for every prompt: only the bound holds them back
    wl = WorkloadConfig(num_requests=20, arrival="offline", images_per_request=1, output_tokens=12, prompt_tokens=20)
    events = SimBackend(RunConfig(deployment=dep, workload=wl, backend=BackendConfig(kind="sim"))).run(_burst(20, 12)).events
    assert sum(1 for e in events if e.kind == Ev.FINISHED) == len({e.request_id for e in events})
    assert _most_holding_kv(events, "aggregated-0") == max_seqs


@pytest.mark.parametrize("n, out, max_seqs, full", [(40, 40, 8, 7.6), (60, 64, 16, 15.5)])
def test_a_burst_beyond_the_decode_batch_runs_without_the_running_preempting_each_other(n, out, max_seqs, full):
    """KV for a little less than the decode batch's full sequences: before the bound, prompts prefilled ahead
    filled the pool and the running sequences preempted each other over and over (39 and 37 preemptions)."""
    reqs = _burst(n, out)
    per_seq = -(-(16 + 40 + out + 2) // 8)  # blocks of a full sequence, with room for the image's rows
    dep = _aggregated(max_seqs, kv_blocks=int(full * per_seq))
    wl = WorkloadConfig(num_requests=len(reqs), arrival="offline")
    events = SimBackend(RunConfig(deployment=dep, workload=wl, backend=BackendConfig(kind="sim"))).run(reqs).events
    preempted = sum(1 for e in events if e.kind == Ev.PREEMPTED)
    assert sum(1 for e in events if e.kind == Ev.FINISHED) == len(reqs)
    assert preempted <= max_seqs // 4, preempted


@pytest.mark.parametrize("dep", ["aggregated", "pd"])
def test_the_engine_holds_at_most_the_decode_batch_and_keeps_its_outputs(dep):
    reqs = _burst(9, 10)
    if dep == "aggregated":
        deployment, decoder = _aggregated(3, kv_blocks=200), "aggregated-0"
    else:
        pool = PoolConfig(kv_blocks=200, kv_block_size=8, max_decode_seqs=3, max_prefill_tokens=256)
        deployment, decoder = DeploymentConfig(name="pd", encode_prefill=pool, decode=pool), "decode-0"
    ref = reference(reqs, MODEL)
    outs, _, events = run(deployment, reqs, executor="local")
    assert [list(outs[r.request_id].token_ids) for r in reqs] == [list(t) for t in ref]
    assert _most_holding_kv(events, decoder) == 3
    tight = dataclasses.replace(deployment, kv_allocation="reserve")
    outs, _, _ = run(tight, reqs, executor="local")
    assert [list(outs[r.request_id].token_ids) for r in reqs] == [list(t) for t in ref]
