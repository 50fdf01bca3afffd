"""An encode batch's images are prepared on the host (decoded, resized) before the batch joins its worker's queue:
on an instance that also prefills and decodes, the steps sent after the batch run while its images are prepared,
instead of waiting behind it. The simulator runs the same scheduling and models the same wait."""

from __future__ import annotations

import dataclasses
import time

import pytest
from helpers import MODEL, reference

from epd.config import BackendConfig, DeploymentConfig, EngineConfig, HardwareConfig, PoolConfig, RunConfig, WorkloadConfig
from epd.engine.core import EngineCore
from epd.experiment import make_requests
from epd.lifetime import LifetimeEvent as Ev
from epd.request import ImageInput, Request, SamplingParams
from epd.stages.pipeline import Pipeline
from simulator.backend import SimBackend


def _long_decode(rid: str, max_tokens: int) -> Request:
    return Request(rid, prompt_token_ids=tuple(range(40, 52)), sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def _photos(rid: str, n: int, seed: int) -> Request:
    """A request with n photo-sized images: their host preparation takes a while on any machine."""
    images = tuple(ImageInput(width=4032, height=3024, seed=seed + k) for k in range(n))
    return Request(rid, prompt_token_ids=tuple(range(60, 70)), images=images, sampling=SamplingParams(max_tokens=4, ignore_eos=True))


def _aggregated(**pool) -> DeploymentConfig:
    base = dict(instances=1, num_cpus=1, kv_blocks=256, mm_blocks=256, max_images_per_batch=8)
    return DeploymentConfig(name="aggregated", aggregated=PoolConfig(**(base | pool)))


def test_the_engine_decodes_while_an_encode_batchs_images_are_prepared(ray_cluster):
    """A sequence decodes; a request with four 12 MP images arrives. Its encode batch is sent at once, but joins
    the worker's queue only once its images are ready: decode steps run in between, the batch hardly waits
    for its images when it runs, and the running sequence's tokens never pause for the preparation."""
    longer, photos = _long_decode("long", 400), _photos("photos", 4, seed=5)
    core = EngineCore(EngineConfig(MODEL, _aggregated(), "ray", BackendConfig(warmup=False)))
    try:
        core.add_request(longer)
        deadline = time.time() + 120
        while "long" not in core.pipeline.states or len(core.pipeline.states["long"].output) < 20:  # decoding in earnest
            assert time.time() < deadline, "the first request did not start decoding"
            core.step()
        core.add_request(photos)
        core.run_until_idle(timeout_s=300)
        outs = {rid: core.pipeline.outputs[rid].token_ids for rid in ("long", "photos")}
        encode = next(b for b in core.batches if b.kind == "EncodeBatch")
        during = [b for b in core.batches if b.kind == "DecodeBatch" and encode.submitted < b.begin < encode.begin]
        events = sorted((e for e in core.pipeline.events if e.request_id == "long" and e.kind == Ev.TOKEN), key=lambda e: e.time)
        core.drain_check()
    finally:
        core.close()
    waited = encode.begin - encode.submitted  # the images' preparation (and a round trip to learn it is done)
    assert waited > 0.05, waited  # four 12 MP images: well above a step on any machine
    assert len(during) >= 5, (len(during), waited)
    assert encode.host_wait < 0.25 * waited, (encode.host_wait, waited)
    gaps = [b.time - a.time for a, b in zip(events, events[1:])]
    assert max(gaps) < 0.5 * waited, (max(gaps), waited)
    assert [list(outs[r.request_id]) for r in (longer, photos)] == [list(t) for t in reference([longer, photos])]


def test_the_simulator_decodes_while_an_encode_batchs_images_are_prepared():
    """The same in the simulator: with a slow host, the running sequence's token gaps stay a decode step's while
    the photos are prepared, and the photos' encode spans their preparation (the encode stage's service)."""
    hw = HardwareConfig(preprocess_s_per_mpixel=0.05, rpc_latency=0.0005)
    reqs = [_long_decode("long", 300), dataclasses.replace(_photos("photos", 4, seed=5), arrival_time=0.05)]
    cfg = RunConfig(
        deployment=_aggregated(), workload=WorkloadConfig(num_requests=2, arrival="offline"), hardware=hw, backend=BackendConfig(kind="sim")
    )
    events = SimBackend(cfg).run(reqs).events
    tokens = sorted(e.time for e in events if e.request_id == "long" and e.kind in (Ev.FIRST_TOKEN, Ev.TOKEN))
    begin = min(e.time for e in events if e.request_id == "photos" and e.kind == Ev.ENCODE_BEGIN)
    end = max(e.time for e in events if e.request_id == "photos" and e.kind == Ev.ENCODE_END)
    prep = 4 * 12.19 * 0.05  # four photos' preparation on the one core
    assert end - begin > prep
    inside = [t for t in tokens if begin < t < end]
    assert len(inside) > 10 and max(b - a for a, b in zip(inside, inside[1:])) < 0.1 * prep


@pytest.mark.parametrize("async_scheduling", [True, False])
@pytest.mark.parametrize("name", ["aggregated", "epd"])
def test_the_batches_an_instance_has_out_stay_bounded(monkeypatch, async_scheduling, name):
    """At most `depth` encode batches preparing, at most 2 x depth batches out in all (preparing or queued for
    the device), and the rest waits: swept over the scheduling depth and deployments, on a burst of images."""
    seen: list[tuple[int, int, int]] = []
    dispatch = Pipeline.dispatch

    def recording(self, inst):
        batch = dispatch(self, inst)
        seen.append((self.depth, inst.inflight, len(inst.preparing)))
        return batch

    monkeypatch.setattr(Pipeline, "dispatch", recording)
    pool = dict(max_images_per_batch=2, num_cpus=1)
    if name == "aggregated":
        dep = _aggregated(**pool)
    else:
        dep = DeploymentConfig(name="epd", encode=PoolConfig(**pool), prefill=PoolConfig(), decode=PoolConfig())
    dep = dataclasses.replace(dep, async_scheduling=async_scheduling)
    wl = WorkloadConfig(num_requests=12, arrival="offline", images_per_request=1, images_per_request_max=4, output_tokens=6)
    hw = HardwareConfig(preprocess_s_per_mpixel=0.2)
    cfg = RunConfig(deployment=dep, workload=wl, hardware=hw, backend=BackendConfig(kind="sim"))
    events = SimBackend(cfg).run(make_requests(cfg)).events
    assert sum(1 for e in events if e.kind == Ev.FINISHED) == 12
    depth = seen[0][0]
    assert depth == (2 if async_scheduling else 1)
    assert max(p for _, _, p in seen) == depth  # the bound is reached, and kept
    assert max(i for _, i, _ in seen) <= 2 * depth


class _ActorDied(Exception):
    pass


class _FakeRay:
    """What the executor asks of Ray about preparing batches: which replies are in, and each one's outcome."""

    class exceptions:
        RayActorError = _ActorDied

    def __init__(self):
        self.outcomes: dict = {}  # reply -> None (done) or the exception it raises

    def wait(self, refs, num_returns, timeout):
        return [r for r in refs if r in self.outcomes], [r for r in refs if r not in self.outcomes]

    def get(self, refs):
        for r in refs if isinstance(refs, list) else [refs]:
            if self.outcomes.get(r) is not None:
                raise self.outcomes[r]

    def put(self, value):
        return value


class _FakeActor:
    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls
        self.execute = type("M", (), {"remote": lambda _, arg, ticket: calls.append((name, ticket)) or object()})()
        self.prepare = type("M", (), {"options": lambda _, **kw: type("R", (), {"remote": lambda _, arg: object()})()})()


def _executor(instances: list[str], calls: list):
    """A Ray executor over fake Ray and fake actors (one rank each): `calls` gets every (actor, ticket) executed."""
    from epd.engine.deadlines import BatchDeadlines
    from epd.engine.executor import RayExecutor
    from epd.engine.ordering import Tickets

    ex = RayExecutor.__new__(RayExecutor)
    ex.ray, ex.needs_push, ex.lost = _FakeRay(), False, set()
    ex._inflight, ex._preparing, ex._prepared, ex._failed_early = {}, {}, [], []
    ex._tickets, ex.deadlines = Tickets(), BatchDeadlines(3.0, 0.0)
    ex.actors = {iid: [_FakeActor(iid, calls)] for iid in instances}
    return ex


def test_a_batch_whose_worker_went_while_its_images_were_prepared_fails_as_a_dead_workers():
    """Ready images join the worker's order with the next ticket; a worker that died while they were prepared, or
    was replaced meanwhile, fails its batch as a lost worker's (the requests start over) and takes no ticket: the
    replacement numbers its own batches from 0."""
    from epd.stages.work import EncodeBatch

    calls: list = []
    ex = _executor(["e0", "e1", "e2"], calls)
    batches = {iid: EncodeBatch([]) for iid in ex.actors}
    for iid, batch in batches.items():
        ex.submit(iid, batch)
    assert not calls and ex.inflight == 3  # nothing queued on a worker while its images are prepared
    replies = {entry[0]: ref for ref, entry in ex._preparing.items()}
    ex.ray.outcomes = {replies["e0"]: None, replies["e1"]: _ActorDied("e1 died"), replies["e2"]: None}
    ex.actors["e2"] = [_FakeActor("e2-new", calls)]  # e2 was replaced while its images were prepared
    assert [iid for iid, _ in ex.take_prepared()] == ["e0", "e1", "e2"]
    assert calls == [("e0", 0)]  # only e0's batch is queued, with its worker's next ticket
    failed = {iid: result for iid, _, result in ex._failed_early}
    assert set(failed) == {"e1", "e2"} and all(r.worker_lost for r in failed.values())
    assert ex.lost == {"e1"} and ex._tickets.take("e2") == 0


def test_an_instances_prepared_batches_join_its_worker_in_the_order_sent():
    """A later encode batch whose images were ready first (one of encoder-cache hits has none to prepare) waits for
    the one sent before it, which may be encoding the very images it hits: the worker runs them in the order sent.
    Meanwhile the executor waits on the earlier batch's reply only, not on the ready one (no busy loop)."""
    from epd.stages.work import EncodeBatch

    calls: list = []
    ex = _executor(["e0", "e1"], calls)
    first, hits, other = EncodeBatch([]), EncodeBatch([]), EncodeBatch([])
    ex.submit("e0", first)
    ex.submit("e0", hits)
    ex.submit("e1", other)
    reply = {id(entry[1]): ref for ref, entry in ex._preparing.items()}
    ex.ray.outcomes = {reply[id(hits)]: None, reply[id(other)]: None}  # the later batch of e0 is ready first
    assert [b for _, b in ex.take_prepared()] == [other]  # another instance's order is its own
    assert calls == [("e1", 0)]
    assert ex._preparing_heads() == [reply[id(first)]]
    ex.ray.outcomes[reply[id(first)]] = None
    assert [b for _, b in ex.take_prepared()] == [first, hits]
    assert calls == [("e1", 0), ("e0", 0), ("e0", 1)]
    assert not ex._preparing and ex._preparing_heads() == []


def test_an_encoder_cache_hit_sent_behind_the_batch_encoding_its_image_reads_the_encoded_image(ray_cluster):
    """Request A's encode batch holds a 12 MP photo (slow to prepare) and a small picture; request B, sent while A's
    batch is prepared, has the same small picture: B's batch is all encoder-cache hits, ready at once, and must
    not run before A's batch has encoded the picture it reads. Both answers equal the runtime's."""
    small = ImageInput(width=320, height=240, seed=11)
    a = Request(
        "a", prompt_token_ids=tuple(range(60, 70)), images=(ImageInput(width=4032, height=3024, seed=12), small),
        sampling=SamplingParams(max_tokens=6, ignore_eos=True),
    )  # fmt: skip
    b = Request("b", prompt_token_ids=tuple(range(80, 86)), images=(small,), sampling=SamplingParams(max_tokens=6, ignore_eos=True))
    dep = DeploymentConfig(
        name="epd",
        encode=PoolConfig(num_cpus=1, mm_blocks=256),
        prefill=PoolConfig(mm_blocks=256),
        decode=PoolConfig(),
        async_scheduling=True,
    )
    core = EngineCore(EngineConfig(MODEL, dep, "ray", BackendConfig(warmup=False)))
    try:
        core.add_request(a)
        deadline = time.time() + 60
        while not core.pipeline.instances["encode-0"].preparing:  # A's batch is out, its photo being prepared
            assert time.time() < deadline, "A's encode batch was not sent"
            core.step()
        core.add_request(b)
        core.run_until_idle(timeout_s=300)
        outs = {rid: list(core.pipeline.outputs[rid].token_ids) for rid in ("a", "b")}
        hits = core.pipeline.instances["encode-0"].encoder_cache.hits
        core.drain_check()
    finally:
        core.close()
    assert hits >= 1  # B's picture came from the cache
    assert [outs["a"], outs["b"]] == [list(t) for t in reference([a, b])]
