"""Decode steps launched from the step before's sampled ids on the device: a worker queues step n+1
before step n's tokens reach the host, and the tokens are those of the runtime, whatever order the
steps land in and whichever steps fall back to the host path (penalties, logprobs)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import MODEL, reference

from epd.config import PoolConfig, Role
from epd.engine.worker import Worker, _Landing
from epd.request import Request, SamplingParams
from epd.stages.work import DecodeBatch, PrefillBatch, PrefillItem

BLOCK = 16
# On a GPU machine the same test runs the CUDA-graph decode step with its inputs fed on the device.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _requests() -> list[Request]:
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    drawn = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.8, top_k=20, seed=5)
    with_logprobs = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=2)
    params = [greedy, drawn, greedy, with_logprobs]
    return [Request(f"r{i}", prompt_token_ids=tuple(range(30 + 3 * i, 41 + 5 * i)), sampling=p) for i, p in enumerate(params)]


def _prefilled_worker(reqs: list[Request], model) -> tuple[Worker, dict[str, list[int]]]:
    w = Worker("aggregated-0", (Role.PREFILL, Role.DECODE), model, PoolConfig(kv_blocks=64, max_decode_seqs=8), "local")
    items, at = [], 0
    for r in reqs:
        prompt = w.rt.family.build_prompt(list(r.prompt_token_ids), [], [])
        need = -(-(len(prompt) + r.sampling.max_tokens) // BLOCK)
        items.append(PrefillItem(r.request_id, prompt, [], list(range(at, at + need)), r.sampling, send_kv=False, keep_for_decode=True))
        at += need
    result = w.execute(PrefillBatch(items))
    return w, {it.request_id: [it.first_token] for it in result.items}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("land_late", [False, True])
def test_steps_launched_from_device_tokens_give_the_runtime_tokens(land_late, device):
    model = dataclasses.replace(MODEL, device=device)
    reqs = _requests()
    expected = {r.request_id: list(t) for r, t in zip(reqs, reference(reqs, model))}
    w, out = _prefilled_worker(reqs, model)
    if device == "cuda":
        assert w.graphs is not None  # the graphed step is the one fed on the device
    fed_forward = [r.request_id for r in reqs if r.sampling.logprobs is None]
    landings: list[_Landing] = []
    for step in range(11):
        # every fourth step brings in the request with logprobs: that step waits on the host for all
        rids = [r.request_id for r in reqs] if step % 4 == 3 else fed_forward
        result = w._execute(DecodeBatch(step=rids))
        if isinstance(result, _Landing):
            landings.append(result)
            if land_late and len(landings) < 2:
                continue  # the next step launches while this one has not landed
            results = [pending.land() for pending in landings]
            landings.clear()
        else:  # replies reach the driver in launch order
            results = [pending.land() for pending in landings] + [result]
            landings.clear()
        for res in results:
            assert not res.errors
            for rid, tok in res.tokens.items():
                out[rid].append(tok)
    for pending in landings:
        for rid, tok in pending.land().tokens.items():
            out[rid].append(tok)
    assert (w.device_fed > 0) == land_late  # landed at once, a step finds its inputs on the host
    for r in reqs:
        n = len(out[r.request_id])
        assert out[r.request_id] == expected[r.request_id][:n], r.request_id
    assert {len(v) for k, v in out.items() if k in fed_forward} == {12}
