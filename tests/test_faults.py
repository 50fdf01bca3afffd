"""Chaos on CPU: a worker of each stage is killed while requests run. Every request finishes with the
tokens of a fault-free run (what the dead worker held or was doing starts over on its siblings); none
is lost or duplicated; every block is free at the end; the siblings go on serving what comes after."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter

import pytest
from helpers import MODEL, one_image_requests, reference

from epd.config import BackendConfig, DeploymentConfig, EngineConfig, PoolConfig
from epd.engine.core import EngineCore
from epd.lifetime import LifetimeEvent as Ev
from epd.request import ImageInput, Request, SamplingParams

TWO_OF_EACH = DeploymentConfig(
    name="epd",
    encode=PoolConfig(instances=2, mm_blocks=64),
    prefill=PoolConfig(instances=2, kv_blocks=128),
    decode=PoolConfig(instances=2, kv_blocks=128, max_decode_seqs=8),
)


def _siblings_for(victim: str, **kw) -> DeploymentConfig:
    """Two workers in the victim's stage (one to lose, one to go on), one in each other stage: every
    worker process costs a CPU run seconds of start-up."""
    stage = victim.split("-")[0]
    pools = {s: getattr(TWO_OF_EACH, s) for s in ("encode", "prefill", "decode")}
    pools = {s: p if s == stage else dataclasses.replace(p, instances=1) for s, p in pools.items()}
    return dataclasses.replace(TWO_OF_EACH, **pools, **kw)


def _requests(prefix: str, n: int) -> list[Request]:
    return [
        Request(
            f"{prefix}{i}",
            prompt_token_ids=tuple(range(20 + i, 30 + i)),
            images=tuple(ImageInput(width=100 + 10 * i, height=80, seed=7 * i + k) for k in range(1 + i % 2)),
            sampling=SamplingParams(max_tokens=24, ignore_eos=True),
        )
        for i in range(n)
    ]


def _step_until(core: EngineCore, done, seconds: float, what: str = "") -> None:
    """Run the engine's loop until `done()` holds, failing after `seconds`."""
    deadline = time.time() + seconds
    while not done():
        assert time.time() < deadline, what or "timed out"
        core.step()


def _first_tokens(core: EngineCore) -> int:
    return sum(1 for e in core.pipeline.events if e.kind == Ev.FIRST_TOKEN)


def _replaced(core: EngineCore) -> bool:
    return any(e.kind == Ev.WORKER_REPLACED for e in core.pipeline.events)


@pytest.mark.parametrize("victim,replace", [("encode-1", False), ("prefill-1", False), ("decode-1", True)])
def test_a_killed_worker_loses_no_request_and_its_siblings_go_on(ray_cluster, victim, replace):
    reqs, later = _requests("a", 12), _requests("b", 6)
    expected = {r.request_id: list(t) for r, t in zip(reqs + later, reference(reqs + later))}
    deployment = _siblings_for(victim, replace_lost_workers=replace)
    core = EngineCore(EngineConfig(MODEL, deployment, "ray", BackendConfig()))
    try:
        for r in reqs:
            core.add_request(r)
        # The victim holding work (queued, running, or sent and not yet pulled), so its loss has something to redo;
        # a prefill or decode worker mid-run (some decoding, some not started). An encoder is through its images
        # before the first token: it is taken while it has some.
        held = core.pipeline.instances[victim]
        mid_run = (lambda: True) if victim.startswith("encode") else (lambda: _first_tokens(core) >= 1)
        _step_until(core, lambda: mid_run() and (held.inflight or held.load() or held.outgoing), 120)
        ray_cluster.kill(core.executor.actors[victim][0], no_restart=True)
        core.run_until_idle(120)
        for r in later:  # after the loss: served by the siblings
            core.add_request(r)
        core.run_until_idle(120)
        outputs = core.pipeline.outputs
        events = list(core.pipeline.events)
        assert set(outputs) == set(expected)  # none lost
        ends = Counter(e.request_id for e in events if e.kind in (Ev.FINISHED, Ev.ABORTED))
        assert all(n == 1 for n in ends.values()) and len(ends) == len(expected)  # none ended twice
        aborted = {rid: o for rid, o in outputs.items() if o.finish_reason == "abort"}
        for rid, o in outputs.items():
            if rid not in aborted:
                assert o.token_ids == expected[rid], rid
        # what the dead worker held or was doing was redone by its siblings: nothing is aborted
        assert not aborted, {rid: o.abort_reason for rid, o in aborted.items()}
        assert any(e.kind == Ev.PREEMPTED and e.data.get("cause") == "worker_lost" for e in events)
        assert not [rid for rid in aborted if rid.startswith("b")]  # what came after: all served
        lost = [e for e in events if e.kind == Ev.WORKER_LOST]
        assert [e.instance for e in lost] == [victim]
        if replace:  # a new worker takes its place: the stage has both workers again
            _step_until(core, lambda: _replaced(core), 180, "no replacement came up")
            events = list(core.pipeline.events)
            assert [e.instance for e in events if e.kind == Ev.WORKER_REPLACED] == [victim]
            assert not core.pipeline.instances[victim].failed
        else:
            assert core.pipeline.instances[victim].failed and not any(e.kind == Ev.WORKER_REPLACED for e in events)
        core.drain_check()  # every block free, every live worker forgot its sequences
    finally:
        core.close()


@pytest.mark.parametrize(
    "victim,transfer", [("encode-0", "object_store"), ("prefill-1", "object_store"), ("decode-0", "object_store"), ("prefill-1", "nccl")]
)
def test_a_replaced_worker_rejoins_its_stage_and_serves(ray_cluster, victim, transfer):
    """The dead worker's replacement loads the model, rejoins, takes a share of queued work and serves
    requests with the tokens of a fault-free run; every block is free at the end. With pushed transfers
    (nccl; gloo on CPU) the new worker meets every peer in new pair groups, the old ones are let go."""
    first, later = _requests("c", 8), _requests("d", 16)
    expected = {r.request_id: list(t) for r, t in zip(first + later, reference(first + later))}
    core = EngineCore(EngineConfig(MODEL, _siblings_for(victim, transfer=transfer), "ray", BackendConfig()))
    try:
        for r in first:
            core.add_request(r)
        _step_until(core, lambda: _first_tokens(core) >= 2, 120)
        ray_cluster.kill(core.executor.actors[victim][0], no_restart=True)
        _step_until(core, lambda: _replaced(core), 180, "no replacement came up")
        replaced = next(e for e in core.pipeline.events if e.kind == Ev.WORKER_REPLACED)
        assert replaced.instance == victim and replaced.data["took_s"] > 0
        for r in later:
            core.add_request(r)
        core.run_until_idle(120)
        outputs = core.pipeline.outputs
        # Every request as fault-free, a request a live worker was reading from the dead one at that moment
        # (the pushes of nccl fail mid-copy) too: it starts over once the reading batch is back.
        aborted = {rid: o.abort_reason for rid, o in outputs.items() if o.finish_reason == "abort"}
        assert not aborted
        assert {rid: o.token_ids for rid, o in outputs.items()} == expected
        events = list(core.pipeline.events)
        after = [e for e in events if e.time > replaced.time and e.instance == victim and e.request_id]
        assert after, f"{victim} served nothing after it rejoined"
        if transfer == "nccl":  # transfers to and from the new worker went over its new pair groups
            assert any(e.kind == Ev.KV_TRANSFER_END and e.time > replaced.time for e in events)
            assert any(e.kind == Ev.MM_TRANSFER_END and e.time > replaced.time for e in events)
        core.drain_check()
    finally:
        core.close()


def test_a_hung_worker_is_found_by_its_deadline_killed_and_replaced(ray_cluster):
    """A worker process stopped mid-run (SIGSTOP: alive to Ray, answering nothing) is taken for hung
    once its oldest batch is past its deadline; its work is redone on the sibling, it is replaced, and
    every request finishes with the tokens of a fault-free run."""
    import os
    import signal

    reqs = _requests("h", 10)
    expected = {r.request_id: list(t) for r, t in zip(reqs, reference(reqs))}
    backend = BackendConfig(worker_deadline_floor_s=3.0, worker_deadline_factor=20.0)
    victim = "decode-0"
    core = EngineCore(EngineConfig(MODEL, _siblings_for(victim), "ray", backend))
    try:
        pid = core.executor.call_one(victim, "probe", lambda w: os.getpid())
        for r in reqs:
            core.add_request(r)
        _step_until(core, lambda: any(e.kind in (Ev.DECODE_BEGIN, Ev.TOKEN) and e.instance == victim for e in core.pipeline.events), 120)
        os.kill(pid, signal.SIGSTOP)
        stopped = time.time()
        _step_until(core, lambda: _replaced(core) and not core.has_work(), 180, "the hung worker was not replaced")
        events = list(core.pipeline.events)
        lost = [e for e in events if e.kind == Ev.WORKER_LOST]
        assert [e.instance for e in lost] == [victim] and "hung" in lost[0].data["reason"]
        assert lost[0].time - (stopped - core.origin) < 30  # found within its deadline (3 s) plus the loop's pace
        assert {rid: o.token_ids for rid, o in core.pipeline.outputs.items()} == expected
        core.drain_check()
    finally:
        core.close()


@pytest.mark.parametrize("victim", ["encode-0", "decode-0"])
def test_a_stage_left_without_workers_waits_for_the_replacement(ray_cluster, victim):
    """One worker per stage: while the lost one's replacement starts, requests that need its stage wait
    for it instead of being aborted, and then finish with a fault-free run's tokens."""
    one_each = DeploymentConfig(
        name="epd", encode=PoolConfig(mm_blocks=64), prefill=PoolConfig(kv_blocks=128), decode=PoolConfig(kv_blocks=128, max_decode_seqs=8)
    )
    reqs, later = _requests("w", 8), _requests("x", 4)
    expected = {r.request_id: list(t) for r, t in zip(reqs + later, reference(reqs + later))}
    core = EngineCore(EngineConfig(MODEL, one_each, "ray", BackendConfig()))
    try:
        for r in reqs:
            core.add_request(r)
        _step_until(core, lambda: _first_tokens(core) >= 2, 120)
        ray_cluster.kill(core.executor.actors[victim][0], no_restart=True)
        for r in later:  # arriving while the stage has no worker: they wait for the replacement
            core.add_request(r)
        _step_until(core, lambda: bool(core.pipeline.parked), 60, "nothing waited for the lost stage")
        core.run_until_idle(180)
        events = list(core.pipeline.events)
        assert [e.instance for e in events if e.kind == Ev.WORKER_REPLACED] == [victim]
        outputs = core.pipeline.outputs
        assert {rid: o.finish_reason for rid, o in outputs.items() if o.finish_reason == "abort"} == {}
        assert {rid: o.token_ids for rid, o in outputs.items()} == expected
        assert not core.pipeline.parked and not core.pipeline.coming
        core.drain_check()
    finally:
        core.close()


def test_a_tensor_parallel_instance_that_loses_a_rank_is_started_again_in_a_world_of_its_own(ray_cluster):
    """Killing one rank of a tp=2 instance loses the instance (its sibling's collectives fail with it):
    its work is redone on the other instance, both ranks are started again in a fresh process group,
    and the new instance serves with a fault-free run's tokens."""
    two_tp = DeploymentConfig(name="aggregated", aggregated=PoolConfig(instances=2, kv_blocks=128, max_decode_seqs=8, tp=2))
    first, later = _requests("t", 8), _requests("u", 16)  # the last 8 new: caches on the survivor do not draw them all
    expected = {r.request_id: list(t) for r, t in zip(first + later, reference(first + later))}
    core = EngineCore(EngineConfig(MODEL, two_tp, "ray", BackendConfig()))
    try:
        victim = "aggregated-0"
        old_world = core.executor._comms[victim].port
        for r in first:
            core.add_request(r)
        _step_until(core, lambda: _first_tokens(core) >= 2, 120)
        ray_cluster.kill(core.executor.actors[victim][1], no_restart=True)  # rank 1: rank 0 lives on
        _step_until(core, lambda: _replaced(core), 180, "no replacement came up")
        assert core.executor._comms[victim].port != old_world and len(core.executor.actors[victim]) == 2
        replaced = next(e for e in core.pipeline.events if e.kind == Ev.WORKER_REPLACED)
        for r in later:
            core.add_request(r)
        core.run_until_idle(120)
        events = list(core.pipeline.events)
        assert [e.instance for e in events if e.kind == Ev.WORKER_LOST] == [victim]
        assert {rid: o.token_ids for rid, o in core.pipeline.outputs.items()} == expected
        assert [e for e in events if e.time > replaced.time and e.instance == victim and e.request_id], "the new instance served nothing"
        core.drain_check()
    finally:
        core.close()


@pytest.mark.parametrize("sender_stage", ["prefill", "encode"])
def test_a_request_pulled_from_a_worker_that_dies_during_the_pull_starts_over(sender_stage):
    """The window between a batch that reads a sender's output (decode pulling KV, prefill pulling image
    embeddings) being sent and coming back: the sender dies in it. The request starts over once the
    reading batch is back (nothing of it is taken from that batch) and finishes with the tokens of a
    fault-free run; no request is aborted; every block is free at the end. Local executor, no Ray: the
    loss is injected right after the reading batch is submitted."""
    from epd.stages.work import DecodeBatch, MixedBatch, PrefillBatch

    reqs = _requests("p", 8)
    expected = {r.request_id: list(t) for r, t in zip(reqs, reference(reqs))}
    deployment = dataclasses.replace(TWO_OF_EACH, transfer="local")
    core = EngineCore(EngineConfig(MODEL, deployment, "local", BackendConfig()))
    pipe, submit = core.pipeline, core.executor.submit
    lost: list[tuple[str, list[str]]] = []

    def pulled(batch) -> list[str]:
        if isinstance(batch, MixedBatch):
            return pulled(batch.decode) + pulled(batch.prefill)
        if sender_stage == "prefill" and isinstance(batch, DecodeBatch):
            return [n.request_id for n in batch.new]
        if sender_stage == "encode" and isinstance(batch, PrefillBatch):
            return [it.request_id for it in batch.items if it.images]
        return []

    def submit_then_lose_a_sender(iid, batch):
        submit(iid, batch)
        if lost:
            return
        for rid in pulled(batch):
            senders = [s for s in pipe.states[rid].senders if s.startswith(sender_stage)]
            if pipe.states[rid].pulling and senders:
                pipe.lose_instance(pipe.instances[senders[0]], "killed during a pull", time.time())
                lost.append((senders[0], [r for r in pulled(batch) if pipe.states[r].pull_lost]))
                return

    core.executor.submit = submit_then_lose_a_sender
    try:
        for r in reqs:
            core.add_request(r)
        core.run_until_idle(120)
        assert lost and lost[0][1], "no batch pulled from a sender"
        victim, caught = lost[0]
        outputs = pipe.outputs
        assert {rid: o.finish_reason for rid, o in outputs.items() if o.finish_reason == "abort"} == {}
        assert {rid: o.token_ids for rid, o in outputs.items()} == expected
        events = list(pipe.events)
        redone = {e.request_id for e in events if e.kind == Ev.PREEMPTED and e.data.get("cause") == "worker_lost"}
        assert set(caught) <= redone
        ends = Counter(e.request_id for e in events if e.kind in (Ev.FINISHED, Ev.ABORTED))
        assert set(ends) == set(expected) and set(ends.values()) == {1}
        assert pipe.instances[victim].failed
        core.drain_check()
    finally:
        core.close()


@pytest.mark.parametrize("cache", ["kv", "mm"])
def test_a_pull_that_breaks_starts_the_request_over_and_one_that_keeps_breaking_aborts_it(monkeypatch, cache):
    """A failed KV pull (decode) or image pull (prefill) whose sender is not known lost — its loss may be
    reported after the failed batch, or the transfer broke on its own — starts the request over, up to
    PULL_RETRIES times; past them the request is aborted with the reason. Either way nothing leaks."""
    from epd.serve.offline import OfflineLLM
    from epd.stages.results import PULL_RETRIES
    from epd.transfer.local import LocalTransfer

    reqs = one_image_requests("p", 4, 64, 48, max_tokens=5)
    expected = dict(zip([r.request_id for r in reqs], reference(reqs)))
    recv, breaks = LocalTransfer.recv, [0]

    def flaky(self, handle, blocks):
        if handle.cache == cache and breaks[0] > 0:
            breaks[0] -= 1
            raise OSError("Broken pipe")
        return recv(self, handle, blocks)

    monkeypatch.setattr(LocalTransfer, "recv", flaky)
    epd = DeploymentConfig(name="epd", encode=PoolConfig(mm_blocks=64), prefill=PoolConfig(kv_blocks=64), decode=PoolConfig(kv_blocks=64))
    with OfflineLLM(MODEL, epd, "local") as llm:
        breaks[0] = 1  # after the warm-up: one pull breaks, its request is redone and finishes as a fault-free run
        outs = {o.request_id: o.token_ids for o in llm.generate(reqs)}
        events = list(llm.core.pipeline.events)
        assert outs == expected
        assert sum(1 for e in events if e.kind == Ev.PREEMPTED and e.data.get("cause") == "pull_failed") == 1
        breaks[0] = PULL_RETRIES + 1  # every pull of one request breaks: it is aborted with the reason
        out = llm.generate(reqs[:1])[0]
        assert out.finish_reason == "abort" and "Broken pipe" in (out.abort_reason or "")
        llm.core.drain_check()
