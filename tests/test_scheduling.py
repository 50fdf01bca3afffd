"""Async scheduling and warm start: the next batch is sent while one runs, outputs do not change,
nothing is over-generated or leaked, and engines warm up before they report ready."""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time

import pytest
from helpers import AGG, EPD, MODEL, PD, one_image_requests, reference, workload

from epd.config import BackendConfig, EngineConfig, HardwareConfig
from epd.engine.core import EngineCore
from epd.engine.ordering import InOrder
from epd.engine.worker import Worker
from epd.request import Request, SamplingParams
from epd.serve.offline import OfflineLLM
from epd.stages.work import MixedBatch


def _stopping_workload():
    """The shared workload with a stop token from each request's own greedy output, so requests end
    early (seen a step late under async scheduling), plus seeded sampling."""
    reqs = workload(9)
    ref = reference(reqs)
    out = []
    for i, (r, toks) in enumerate(zip(reqs, ref)):
        sp = r.sampling
        if i % 3 == 0:
            sp = dataclasses.replace(sp, ignore_eos=False, stop_token_ids=(toks[min(2 + i % 4, len(toks) - 1)],))
        elif i % 3 == 1:
            sp = dataclasses.replace(sp, temperature=0.8, top_k=20, seed=1000 + i)
        out.append(dataclasses.replace(r, sampling=sp))
    return out


@pytest.mark.parametrize("deployment", [EPD, PD, AGG], ids=lambda d: d.name)
def test_async_scheduling_keeps_every_output(ray_cluster, deployment):
    """Greedy and stop-token requests: the same tokens with the next batch scheduled while one runs
    as one batch at a time, and as the single-process runtime. Sampled requests run beside them to
    their length (their draws follow the logits, which batch shapes move in the last bits)."""
    reqs = _stopping_workload()
    ref = reference(reqs)
    outputs = {}
    for mode in (True, False):
        with OfflineLLM(MODEL, dataclasses.replace(deployment, async_scheduling=mode), "ray") as llm:
            outs = llm.generate(reqs)
            llm.core.drain_check()  # every block free, every worker sequence forgotten
            outputs[mode] = [o.token_ids for o in outs]
            reasons = [o.finish_reason for o in outs]
    greedy = [i for i, r in enumerate(reqs) if r.sampling.greedy]
    for mode in (True, False):
        assert [outputs[mode][i] for i in greedy] == [list(ref[i]) for i in greedy], mode
        assert all(len(outputs[mode][i]) == reqs[i].sampling.max_tokens for i in range(len(reqs)) if i not in greedy)
    assert reasons[0] == "stop" and len(outputs[True][0]) < reqs[0].sampling.max_tokens


def test_decode_batches_are_queued_before_the_previous_one_ends(ray_cluster):
    """The worker finds its next decode step waiting: with async scheduling most decode batches are
    sent before the one before it has ended on the worker (steps long enough to cover the round
    trip: 16 sequences of 800+ tokens), and the worker idles less between steps; one at a time, never."""
    prompts = [tuple((j * 7 + i) % 400 + 10 for j in range(800)) for i in range(16)]
    reqs = [Request(f"q{i}", prompt_token_ids=p, sampling=SamplingParams(max_tokens=40, ignore_eos=True)) for i, p in enumerate(prompts)]
    ahead, gap = {}, {}
    for mode in (True, False):
        pool = dataclasses.replace(AGG.aggregated, instances=1, kv_blocks=1024, max_decode_seqs=16)
        with OfflineLLM(MODEL, dataclasses.replace(AGG, aggregated=pool, async_scheduling=mode), "ray") as llm:
            llm.generate(reqs)
            decode = [b for b in llm.core.batches if b.kind == "DecodeBatch"]
        assert max(b.size for b in decode) == 16 and min(b.size for b in decode) >= 1  # sequences stepped, as recorded
        pairs = list(zip(decode, decode[1:]))
        assert len(pairs) >= 38
        ahead[mode] = sum(1 for a, b in pairs if b.submitted < a.end) / len(pairs)
        gap[mode] = statistics.median(b.begin - a.end for a, b in pairs)
    assert ahead[True] >= 0.8 and ahead[False] == 0.0, ahead
    assert gap[True] < gap[False], gap


@pytest.mark.parametrize("overhead,rpc", [(0.002, 0.003), (0.001, 0.0015), (0.004, 0.002), (0.0005, 0.0006), (0.001, 0.010)])
def test_async_scheduling_in_the_simulator_hides_the_round_trip(overhead, rpc):
    """The simulator runs the same dispatch: one batch at a time a decode step costs x = compute +
    worker overhead, plus the round trip; queued ahead, the round trip is gone while it fits in a step
    (x), and otherwise two steps share each round trip ((x + rpc) / 2 per step: the step sent in answer
    to one ending comes back to the worker a whole round trip later)."""
    from epd.models.runtime import load_family
    from simulator.latency import RooflineModel
    from simulator.shapes import ModelShape
    from simulator.sim import Simulation

    family = load_family(MODEL)
    shape = ModelShape.of(family, MODEL.dtype)
    hw = HardwareConfig(step_overhead=overhead, rpc_latency=rpc)
    reqs = [dataclasses.replace(r, sampling=SamplingParams(max_tokens=30, ignore_eos=True)) for r in workload(3)]
    tpot = {}
    for mode in (True, False):
        dep = dataclasses.replace(AGG, aggregated=dataclasses.replace(AGG.aggregated, instances=1), async_scheduling=mode)
        lat = RooflineModel(shape, hw)
        result = Simulation(dep, family, shape, lat).run(reqs)
        by_req = result.events.by_request()
        tokens = [e.time for e in by_req["r2"] if e.kind.value in ("first_token", "token")]
        tpot[mode] = (tokens[-1] - tokens[5]) / (len(tokens) - 6)  # steady state, all three decoding
    x = tpot[False] - rpc
    assert x > overhead, tpot  # compute on top of the worker overhead
    assert tpot[True] == pytest.approx(max(x, (x + rpc) / 2), rel=0.05), tpot


def test_pushes_to_a_receiver_go_out_in_ticket_order():
    """NCCL pushes of two batches queued at one receiver may start in any order on the sender's
    transfer threads; they are sent in the order the receiver reads them."""
    sent = []

    class Recorder:
        def push(self, handles, receiver):
            sent.append(handles[0])

    w = object.__new__(Worker)
    w.transfer, w._pushes_in_order = Recorder(), InOrder()
    threads = [threading.Thread(target=w.push, args=([t], "decode-0", t)) for t in (3, 1, 2, 0)]
    for th in threads:
        th.start()
        time.sleep(0.01)
    for th in threads:
        th.join(5)
    assert sent == [0, 1, 2, 3]


def test_engine_warms_up_every_instance_before_it_is_ready():
    """Each instance runs a batch of every kind its roles serve before the engine is ready; the run
    then starts empty (no events, outputs or batches of the warm-up)."""
    core = EngineCore(EngineConfig(MODEL, dataclasses.replace(EPD, transfer="local"), "local", BackendConfig()))
    try:
        assert core.warmup_s is not None and core.warmup_s > 0
        kinds = {"encode": "EncodeBatch", "prefill": "PrefillBatch", "decode": "DecodeBatch"}
        assert {(i, kinds[i.split("-")[0]]) for i in core.pipeline.instances} <= set(core.warmup_batches)
        assert not core.pipeline.states and not core.pipeline.outputs and not list(core.pipeline.events) and not core.batches
        core.drain_check()
    finally:
        core.close()
    cold = EngineCore(EngineConfig(MODEL, dataclasses.replace(EPD, transfer="local"), "local", BackendConfig(warmup=False)))
    cold.close()
    assert cold.warmup_s is None


@pytest.mark.parametrize("steps", ["mixed", "alternate"])
def test_the_warm_up_runs_mixed_steps_and_batches_at_their_limits(steps):
    """An aggregated instance with chunked prefill runs a mixed step before it is ready (where it mixes);
    the full-size wave fills an encode batch to `max_images_per_batch` and a
    prefill step with several prompts, so no large shape is first met while a run measures (both on by
    default for GPU workers)."""
    pool = dataclasses.replace(AGG.aggregated, instances=1, kv_blocks=256, max_images_per_batch=6, max_prefill_tokens=96)
    dep = dataclasses.replace(AGG, aggregated=pool, chunked_prefill=True, prefill_decode_steps=steps)
    for full_size, mixed_steps in ((False, True), (True, False)):  # an engine each: a second warm-up would hit the encoder cache
        core = EngineCore(EngineConfig(MODEL, dep, "local", BackendConfig(warmup=False)))
        sent: list = []
        submit = core.executor.submit
        core.executor.submit = lambda iid, batch, submit=submit, sent=sent: (sent.append(batch), submit(iid, batch))[1]
        try:
            core.warm_up(full_size=full_size, mixed_steps=mixed_steps)
            ran = core.warmup_batches
            if mixed_steps:
                assert (("aggregated-0", "MixedBatch") in ran) == (steps == "mixed"), ran
                if steps == "mixed":  # several decode rows beside a prefill chunk: not the kernels' one-row case
                    assert max(len(b.decode.step) for b in sent if isinstance(b, MixedBatch)) >= 2, sent
            else:  # images encoded in one batch (cache hits are not counted)
                assert ran[("aggregated-0", "EncodeBatch")] == 6
                assert max(ran.get(("aggregated-0", k), 0) for k in ("PrefillBatch", "MixedBatch")) >= 2, ran
            assert not core.batches and not core.pipeline.states
            core.drain_check()
        finally:
            core.close()


def test_an_instance_that_encodes_and_prefills_encodes_shortly_before_it_prefills():
    """A burst of one-image requests on one aggregated instance: with `encode_ahead_steps` the first prefill
    comes after a few encode batches, not after all of them, and encoding stops while the prefill queue holds
    that many steps of prompts; the tokens are those of the unbounded order."""
    reqs = one_image_requests("b", 16, 96, 80, max_tokens=4)
    order, tokens = {}, {}
    for ahead in (0, 1):
        pool = dataclasses.replace(
            AGG.aggregated,
            instances=1,
            kv_blocks=512,
            mm_blocks=512,
            max_images_per_batch=2,
            max_prefill_tokens=64,
            encode_ahead_steps=ahead,
        )
        with OfflineLLM(MODEL, dataclasses.replace(AGG, aggregated=pool), "local") as llm:
            outs = llm.generate(reqs)
            order[ahead] = [b.kind for b in sorted(llm.core.batches, key=lambda b: b.begin)]
        tokens[ahead] = [o.token_ids for o in outs]
    assert tokens[0] == tokens[1]
    with pytest.raises(ValueError, match="aggregated.encode_ahead_steps must be a whole number >= 0"):
        dataclasses.replace(AGG, aggregated=dataclasses.replace(AGG.aggregated, encode_ahead_steps=-1)).validate()
    first_prefill = {a: next(i for i, k in enumerate(kinds) if k != "EncodeBatch") for a, kinds in order.items()}
    assert order[0][: first_prefill[0]] == ["EncodeBatch"] * 8  # unbounded: every image of the burst first
    assert first_prefill[1] < 8 and "EncodeBatch" in order[1][first_prefill[1] :], order[1]


def test_an_engine_that_fails_its_warm_up_raises_and_leaves_nothing(monkeypatch):
    closed = []
    monkeypatch.setattr(Worker, "_encode_images", lambda self, pixels: (_ for _ in ()).throw(RuntimeError("tower broke")))
    monkeypatch.setattr(Worker, "close", lambda self: closed.append(self.worker_id))
    with pytest.raises(RuntimeError, match="warm-up.*tower broke"):
        EngineCore(EngineConfig(MODEL, dataclasses.replace(EPD, transfer="local"), "local", BackendConfig()))
    assert sorted(closed) == ["decode-0", "encode-0", "encode-1", "prefill-0"]
