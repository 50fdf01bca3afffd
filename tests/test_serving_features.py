"""Serving-grade scheduling: chunked prefill, KV on demand with preemption, the encoder cache and
answer lengths the schedulers do not know. Outputs must not change (greedy tokens equal the
single-process runtime's), nothing may be lost or leaked, and the simulator runs the same code."""

from __future__ import annotations

import dataclasses

import pytest
from helpers import AGG, EPD, MODEL, PD, reference, tiny_model_config

from epd.config import DeploymentConfig, HardwareConfig, PoolConfig
from epd.lifetime import LifetimeEvent as Ev
from epd.metrics import scheduling_counts
from epd.models.runtime import load_family
from epd.request import ImageInput, Request, SamplingParams
from epd.serve.offline import OfflineLLM
from simulator.latency import RooflineModel
from simulator.shapes import ModelShape
from simulator.sim import Simulation


def _pools(dep: DeploymentConfig, **kw) -> DeploymentConfig:
    """`dep` with every pool's fields `kw` replaced."""
    return dataclasses.replace(dep, **{n: dataclasses.replace(p, **kw) for n, p in dep.pools().items()})


def _run(model, dep, reqs, executor="local"):
    with OfflineLLM(model, dep, executor) as llm:
        outs = llm.generate(reqs)
        llm.core.drain_check()  # every block free (cached images aside), every worker sequence forgotten
        events = list(llm.core.pipeline.events)
    return [o.token_ids for o in outs], [o.finish_reason for o in outs], events


def _long_workload(n: int = 6, seed: int = 0) -> list[Request]:
    """Prompts from a few tokens to several steps' budgets, images placed so chunk edges fall inside them."""
    reqs = []
    for i in range(n):
        length = 5 + (i * 37 + seed * 11) % 90
        images = tuple(ImageInput(width=140 + 20 * k, height=100, seed=seed * 100 + 10 * i + k) for k in range(i % 3))
        prompt = tuple((j * 13 + i * 7 + seed) % 400 + 10 for j in range(length))
        reqs.append(
            Request(f"c{i}", prompt_token_ids=prompt, images=images, sampling=SamplingParams(max_tokens=4 + i % 5, ignore_eos=True))
        )
    return reqs


@pytest.mark.parametrize("family", ["llava", "internvl"])
@pytest.mark.parametrize(
    "dep", [EPD, PD, AGG, dataclasses.replace(AGG, name="agg-alternate", prefill_decode_steps="alternate")], ids=lambda d: d.name
)
@pytest.mark.parametrize("budget", [7, 16, 41])
def test_chunked_prefill_gives_the_unchunked_tokens(family, dep, budget):
    """Prompts longer than a step's token budget (7 tokens: every image is cut by chunk edges) give the
    greedy tokens of the single-process runtime, in every deployment and family; without chunking
    the same prompts are refused at admission."""
    model = tiny_model_config(family)
    reqs = _long_workload(seed=budget)
    ref = reference(reqs, model)
    chunked = _pools(dep, max_prefill_tokens=budget, kv_blocks=96)
    toks, _, events = _run(model, chunked, reqs)
    assert toks == [list(r) for r in ref]
    longest = max(e.data["tokens"] for e in events if e.kind == Ev.PREFILL_BEGIN)
    assert longest > budget  # some prompt did go in chunks
    with OfflineLLM(model, dataclasses.replace(chunked, chunked_prefill=False), "local") as llm:
        outs = llm.generate(reqs)
    refused = [o for o in outs if o.finish_reason == "abort"]
    assert refused and all("max_prefill_tokens" in o.abort_reason for o in refused)


def test_chunked_prefill_mixes_decodes_and_chunks_in_one_step_on_ray(ray_cluster):
    """An aggregated instance runs its decodes and a long prompt's chunks in the same steps (decodes
    first): a long prompt arriving mid-run does not stall the running decodes for its whole length."""
    pool = PoolConfig(instances=1, kv_blocks=128, max_prefill_tokens=24)
    dep = DeploymentConfig(name="aggregated", aggregated=pool)
    short = [
        Request(f"s{i}", prompt_token_ids=tuple(range(10 + i, 20 + i)), sampling=SamplingParams(max_tokens=30, ignore_eos=True))
        for i in range(3)
    ]
    long = [
        Request(
            "long", prompt_token_ids=tuple((j * 5) % 300 + 10 for j in range(300)), sampling=SamplingParams(max_tokens=3, ignore_eos=True)
        )
    ]
    reqs = short + long
    ref = reference(reqs)
    with OfflineLLM(MODEL, dep, "ray") as llm:
        outs = llm.generate(reqs)
        kinds = [b.kind for b in llm.core.batches]
        llm.core.drain_check()
    assert [o.token_ids for o in outs] == [list(r) for r in ref]
    assert kinds.count("MixedBatch") >= 300 // 24 - 3, kinds  # the long prompt's chunks rode on decode steps
    with OfflineLLM(MODEL, dataclasses.replace(dep, prefill_decode_steps="alternate"), "ray") as llm:
        outs = llm.generate(reqs)
        kinds = [b.kind for b in llm.core.batches]
    assert [o.token_ids for o in outs] == [list(r) for r in ref]
    assert "MixedBatch" not in kinds
    # a decode step after every chunk while the short requests decode: none waits behind the whole prompt
    chunks = [i for i, k in enumerate(kinds) if k == "PrefillBatch"]
    assert any(kinds[i + 1] == "DecodeBatch" for i in chunks[:-1])


@pytest.mark.parametrize("dep", [EPD, PD, AGG], ids=lambda d: d.name)
@pytest.mark.parametrize("kv_blocks", [11, 16])
def test_preemption_under_a_tiny_kv_pool_loses_nothing(dep, kv_blocks):
    """KV on demand with too few blocks for the running sequences (each fits alone: at most 10 blocks of
    8 tokens): the newest is preempted, its blocks freed, and recomputed later; every request still
    finishes with the runtime's greedy tokens, and every block comes back.
    With the reserve policy the same requests run without preemption."""
    reqs = [
        Request(
            f"p{i}",
            prompt_token_ids=tuple((j * 3 + i) % 300 + 10 for j in range(10 + 3 * i)),
            images=tuple(ImageInput(width=120, height=90, seed=i * 10 + k) for k in range(i % 2)),
            sampling=SamplingParams(max_tokens=24 + 2 * i, ignore_eos=True),
        )
        for i in range(6)
    ]
    ref = reference(reqs)
    tight = _pools(dep, kv_blocks=kv_blocks, kv_block_size=8, max_decode_seqs=6)
    toks, reasons, events = _run(MODEL, tight, reqs)
    assert toks == [list(r) for r in ref]
    assert reasons == ["length"] * len(reqs)
    counts = scheduling_counts(events)
    assert counts["preemptions"] > 0 and counts["recomputed_prefills"] == counts["preemptions"]
    toks, _, events = _run(MODEL, dataclasses.replace(tight, kv_allocation="reserve"), reqs)
    assert toks == [list(r) for r in ref]
    assert scheduling_counts(events)["preemptions"] == 0


def test_preemption_on_ray_with_async_steps_in_flight(ray_cluster):
    """Preempted while a step of it is in flight (async scheduling): that step's token is dropped, the
    sequence recomputed; sampled requests keep their seeded draws; nothing is left on the workers."""
    reqs = [
        Request(
            f"q{i}",
            prompt_token_ids=tuple((j * 7 + i) % 300 + 10 for j in range(10 + 3 * i)),
            sampling=SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.0 if i % 2 else 0.9, top_k=5, seed=i),
        )
        for i in range(6)
    ]
    ref = reference(reqs)
    dep = DeploymentConfig(name="aggregated", aggregated=PoolConfig(instances=1, kv_blocks=12, kv_block_size=8))
    toks, reasons, events = _run(MODEL, dep, reqs, "ray")
    greedy = [i for i, r in enumerate(reqs) if r.sampling.greedy]
    assert [toks[i] for i in greedy] == [list(ref[i]) for i in greedy]
    assert all(len(t) == 40 for t in toks) and reasons == ["length"] * len(reqs)
    assert scheduling_counts(events)["preemptions"] > 0


def _repeated_images(n: int = 10) -> list[Request]:
    """Requests drawing their images from a pool of three pictures, sent as the same JPEG bytes."""
    import io

    from epd.images import load_image

    pics = []
    for k in range(3):
        buf = io.BytesIO()
        load_image(ImageInput(width=160 + 40 * k, height=120, seed=k)).save(buf, format="JPEG", quality=90)
        pics.append(ImageInput(data=buf.getvalue()))
    return [
        Request(
            f"e{i}",
            prompt_token_ids=tuple(range(30 + i, 40 + i)),
            images=tuple(pics[(i + k) % 3] for k in range(1 + i % 2)),
            sampling=SamplingParams(max_tokens=4, ignore_eos=True),
            arrival_time=0.05 * i,
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("dep", [EPD, PD, AGG], ids=lambda d: d.name)
def test_encoder_cache_hits_give_identical_outputs(dep):
    """A repeated image is encoded once per encoder instance: later requests hit the cache (events and
    summary say so) and get the tokens they get with the cache off."""
    reqs = _repeated_images()
    on, _, ev_on = _run(MODEL, dep, reqs)
    off, _, ev_off = _run(MODEL, _pools(dep, encoder_cache_blocks=0), reqs)
    assert on == off == [list(r) for r in reference(reqs)]
    hits_on, hits_off = scheduling_counts(ev_on)["encoder_cache_hits"], scheduling_counts(ev_off)["encoder_cache_hits"]
    images = sum(len(r.images) for r in reqs)
    encoders = dep.pools()[dep.pool_for("encode")].instances
    assert hits_off == 0 and hits_on >= images - 3 * encoders  # at most each picture once per encoder is a miss


def test_encoder_cache_evicts_least_recently_used_within_capacity():
    """A cache of one image's blocks keeps only the latest picture; a pool too small for two images
    evicts unreferenced ones to make room, and every block is free at the end."""
    reqs = _repeated_images(8)
    dep = DeploymentConfig(
        name="epd",
        encode=PoolConfig(mm_blocks=4, mm_block_tokens=8, encoder_cache_blocks=2),
        prefill=PoolConfig(kv_blocks=64, mm_blocks=8, mm_block_tokens=8),
        decode=PoolConfig(kv_blocks=64),
    )
    toks, _, events = _run(MODEL, dep, reqs)
    assert toks == [list(r) for r in reference(reqs)]
    hits = [e for e in events if e.kind == Ev.ENCODE_END and e.data.get("cached")]
    assert 0 < len(hits) < sum(len(r.images) for r in reqs) - 3


def test_answer_tokens_end_requests_with_eos_at_their_length():
    """A request told its answer is N tokens stops with EOS at N (the schedulers only see max_tokens);
    the simulator ends it at the same length."""
    reqs = [
        Request(f"a{i}", prompt_token_ids=tuple(range(10, 20 + i)), sampling=SamplingParams(max_tokens=50, answer_tokens=1 + 7 * i))
        for i in range(5)
    ]
    toks, reasons, _ = _run(MODEL, AGG, reqs)
    eos = load_family(MODEL).text_config().eos_token_id
    assert [len(t) for t in toks] == [1 + 7 * i for i in range(5)]
    assert all(t[-1] == eos and eos not in t[:-1] for t in toks) and reasons == ["stop"] * 5
    sim = _simulate(AGG, reqs)
    assert [len(sim.outputs[r.request_id].token_ids) for r in reqs] == [1 + 7 * i for i in range(5)]


def _simulate(dep, reqs):
    family = load_family(MODEL)
    shape = ModelShape.of(family, MODEL.dtype)
    return Simulation(dep, family, shape, RooflineModel(shape, HardwareConfig())).run(reqs)


@pytest.mark.parametrize("dep", [EPD, PD, AGG], ids=lambda d: d.name)
def test_the_simulator_runs_the_same_schedulers(dep):
    """Chunks, preemptions and encoder-cache hits happen in the simulator as in the engine: the same
    number of cache hits and recomputes of the same requests for an offline batch, every block free."""
    reqs = [dataclasses.replace(r, arrival_time=0.0) for r in _repeated_images(8)]
    reqs += [
        Request(
            f"long{i}",
            prompt_token_ids=tuple((j * 3 + i) % 300 + 10 for j in range(70)),
            sampling=SamplingParams(max_tokens=24, ignore_eos=True),
        )
        for i in range(3)
    ]
    tight = _pools(dep, kv_blocks=20, kv_block_size=8, max_prefill_tokens=32)
    _, _, events = _run(MODEL, tight, reqs)
    sim = _simulate(tight, reqs)
    engine, predicted = scheduling_counts(events), scheduling_counts(list(sim.events))
    assert predicted["encoder_cache_hits"] == engine["encoder_cache_hits"] > 0
    assert (predicted["preemptions"] > 0) == (engine["preemptions"] > 0)
    assert all(o.finish_reason == "length" for o in sim.outputs.values())


@pytest.mark.parametrize("order", ["interleaved", "decodes_first", "decodes_last"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_mixed_step_split_into_decodes_and_chunks_attends_as_one(seed, order):
    """The GPU path of a mixed step (decode rows apart from prefill chunks, fresh or after earlier
    chunks) gives the reference attention over the whole step; where the decodes are adjacent (the
    engine puts them first) both parts are row ranges, not gathers."""
    import random

    import torch

    from epd.kernels.attention import AttentionMetadata, paged_attention_ref, split_attention, write_kv

    rnd = random.Random(seed)
    bs, heads, kv_heads, dim = 4, 4, 2, 8
    qlens = [rnd.choice([1, 1, 1, 3, 7]) for _ in range(6)] + [5, 1]
    if order != "interleaved":
        qlens.sort(key=lambda q: (q != 1) == (order == "decodes_first"))
    ctx = [q + rnd.choice([0, 2, 9]) if q > 1 else rnd.randint(1, 20) for q in qlens]
    free = list(range(64))
    rnd.shuffle(free)
    tables = [[free.pop() for _ in range(-(-c // bs))] for c in ctx]
    meta = AttentionMetadata.build(tables, qlens, ctx, bs, torch.device("cpu"))
    assert meta.split is not None
    if order != "interleaved":
        assert isinstance(meta.split.decode_rows, slice) and isinstance(meta.split.rest_rows, slice)
    torch.manual_seed(seed)
    kc, vc = torch.randn(64, bs, kv_heads, dim), torch.randn(64, bs, kv_heads, dim)
    n = sum(qlens)
    q, k, v = torch.randn(n, heads, dim), torch.randn(n, kv_heads, dim), torch.randn(n, kv_heads, dim)
    write_kv(k, v, kc, vc, meta.slot_mapping)
    whole = paged_attention_ref(q, kc, vc, meta, 0.3)
    parts = split_attention(q, k, v, kc, vc, meta.split, 0.3, lambda q, k, v, kc, vc, m, s: paged_attention_ref(q, kc, vc, m, s))
    torch.testing.assert_close(parts, whole)


def _shared_prefixes() -> list[Request]:
    """Requests beginning with one of two system prompts, some with the same picture, some with a
    different picture of the same size (same placeholder count: only the image hash tells them apart)."""
    systems = [tuple((j * 11) % 300 + 10 for j in range(40)), tuple((j * 17) % 300 + 10 for j in range(23))]
    reqs = []
    for i in range(10):
        images = (ImageInput(width=120, height=90, seed=7 if i % 3 else 100 + i),) if i % 2 else ()
        tail = tuple((j * 5 + i) % 300 + 10 for j in range(3 + i))
        reqs.append(
            Request(
                f"x{i}",
                0.02 * i,
                prompt_token_ids=systems[i % 4 == 0] + tail,
                images=images,
                sampling=SamplingParams(max_tokens=5, ignore_eos=True),
            )
        )
    return reqs


@pytest.mark.parametrize("dep", [EPD, PD, AGG], ids=lambda d: d.name)
def test_prefix_caching_reuses_shared_prompts_and_keeps_outputs(dep):
    """A second wave of requests that begin as the first wave's did (system prompt, and the same picture)
    prefills only its own tails; a different picture behind the same text is not a hit; every output
    equals the runtime's and the one with prefix caching off; the simulator caches the same way."""
    reqs = _shared_prefixes()
    ref = [list(r) for r in reference(reqs)]
    dep = _pools(dep, kv_block_size=8, instances=1)
    outs, cached = {}, {}
    for caching in (True, False):
        with OfflineLLM(MODEL, dataclasses.replace(dep, prefix_caching=caching), "local") as llm:
            first = llm.generate(reqs[:4])
            second = llm.generate(reqs[4:])  # the same engine: what the first wave left is cached
            events = list(llm.core.pipeline.events)
            llm.core.drain_check()
        outs[caching] = [o.token_ids for o in first + second]
        cached[caching] = {e.request_id: e.data["cached_tokens"] for e in events if e.kind == Ev.PREFILL_BEGIN}
    assert outs[True] == outs[False] == ref
    assert not any(cached[False].values())
    assert cached[True]["x9"] == 0  # its picture differs from x3's, though the placeholders are the same
    assert all(cached[True][f"x{i}"] > 0 and cached[True][f"x{i}"] % 8 == 0 for i in (4, 5, 6, 7, 8)), cached[True]
    assert cached[True]["x5"] >= 16  # BOS, the shared picture's placeholders and the system prompt
    sim = _simulate(dep, [dataclasses.replace(r, arrival_time=0.0 if i < 4 else 5.0) for i, r in enumerate(reqs)])
    hits = {e.request_id: e.data["cached_tokens"] for e in sim.events if e.kind == Ev.PREFILL_BEGIN}
    assert {r: hits[r] for r in cached[True]} == cached[True]  # the simulator's scheduler finds the same prefixes
    assert not any(hits[f"x{i}"] for i in range(4))


def test_block_hashes_chain_tokens_and_image_contents():
    from epd.stages.prefix_cache import block_hashes

    toks = [1, 3, 3, 3, 3, 5, 6, 7, 8]
    a = block_hashes(toks, 4, 3, ["pic-a"], [4], 9)
    b = block_hashes(toks, 4, 3, ["pic-b"], [4], 9)
    assert len(a) == 2 and a[0] != b[0] and a[1] != b[1]  # the picture changes its blocks and every one after
    assert block_hashes(toks[:8] + [9], 4, 3, ["pic-a"], [4], 9) == a  # a partial last block is not hashed
    assert block_hashes([2] + toks[1:], 4, 3, ["pic-a"], [4], 9)[1] != a[1]  # a change early changes later ones
    assert block_hashes(toks, 4, 3, ["pic-a"], [4], 2)[0] != a[0]  # placeholder ids after the prompt are tokens


def test_cache_accounting_references_eviction_and_failure():
    """Both caches over a block pool: a referenced entry is never evicted, unreferenced ones go least
    recently used first when blocks are wanted, a failed encoding frees with its last reference."""
    from epd.stages.blocks import BlockPool
    from epd.stages.encoder_cache import EncoderCache
    from epd.stages.prefix_cache import PrefixCache

    pool = BlockPool("MM", "e", 6, 4)
    enc = EncoderCache(pool, capacity_blocks=4)
    a = enc.add("a", 2)
    b = enc.add("b", 2)
    assert a and b and enc.add("c", 1) is None  # over capacity while a and b are referenced
    enc.free(a)
    enc.free(b)
    assert enc.lookup("a") == a  # a is now the most recently used
    enc.free(a)
    c = enc.add("c", 2)  # room by evicting b, the least recently used
    assert c and "b" not in enc and "a" in enc and enc.evictions == 1
    enc.fail(c, "unreadable")
    assert "c" not in enc and enc.failure(c) == "unreadable" and pool.num_free == 2
    enc.free(c)  # its last reference: the blocks go back
    assert pool.num_free == 4
    d = enc.add("d", 2)
    enc.free(d)  # its request started over (a lost worker) before the failed batch came back
    enc.fail(d, "worker lost")
    assert "d" not in enc and pool.num_free == 4  # nobody holds it: freed at once, not left behind
    enc.clear()
    pool.assert_all_free()

    kv = BlockPool("KV", "p", 5, 2)
    pc = PrefixCache(kv)
    seq1 = kv.allocate(3)
    pc.register([b"h1", b"h2"], seq1)  # two full blocks cached, the third not
    pc.free(seq1)
    assert kv.num_free == 3 and pc.evictable == 2
    hit = pc.match([b"h1", b"h2", b"h3"], limit=1)  # at most one block: the rest is computed
    assert hit == seq1[:1] and pc.evictable == 1
    assert pc.make_room(5) is False and kv.num_free == 4  # h2 evicted; h1 is held
    pc.free(hit)
    pc.clear()
    kv.assert_all_free()
    block = kv.allocate(1)
    pc.register([b"x"], block)
    pc.free(block)
    with pytest.raises(RuntimeError, match="more often"):
        pc.free(block)  # a hold released twice


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_image_markers_place_images_after_a_shared_system_prompt(family):
    """One image token per image in the prompt marks where it goes: the runtime's tokens, a system prompt
    before the images is a prefix-cache hit whatever the pictures, and a wrong marker count is refused."""
    model = tiny_model_config(family)
    tok = model.image_token_id
    system = tuple((j * 13) % 300 + 10 for j in range(35))
    reqs = [
        Request(
            f"m{i}",
            prompt_token_ids=system + (tok,) * (1 + i % 2) + tuple(range(20 + i, 30 + i)),
            images=tuple(ImageInput(width=130 + 10 * k, height=100, seed=50 * i + k) for k in range(1 + i % 2)),
            sampling=SamplingParams(max_tokens=4, ignore_eos=True),
        )
        for i in range(4)
    ]
    ref = [list(r) for r in reference(reqs, model)]
    dep = _pools(AGG, kv_block_size=8, instances=1)
    with OfflineLLM(model, dep, "local") as llm:
        first = llm.generate(reqs[:1])
        rest = llm.generate(reqs[1:])
        events = list(llm.core.pipeline.events)
        bad = llm.generate([dataclasses.replace(reqs[0], request_id="bad", images=())])
    assert [o.token_ids for o in first + rest] == ref
    cached = {e.request_id: e.data["cached_tokens"] for e in events if e.kind == Ev.PREFILL_BEGIN}
    assert all(cached[f"m{i}"] == 32 for i in (1, 2, 3))  # BOS + the 35-token system prompt: 4 full blocks of 8
    assert bad[0].finish_reason == "abort" and "placeholder" in bad[0].abort_reason


def test_a_full_decode_batch_does_not_starve_prefill_in_mixed_steps():
    """Decodes take the step's budget first; with more running sequences than the budget a waiting
    prompt still advances (a token per step) and every request finishes with the runtime's tokens."""
    dep = DeploymentConfig(name="aggregated", aggregated=PoolConfig(instances=1, kv_blocks=64, max_prefill_tokens=4, max_decode_seqs=8))
    reqs = [Request(f"s{i}", prompt_token_ids=(10 + i, 11, 12), sampling=SamplingParams(max_tokens=40, ignore_eos=True)) for i in range(6)]
    reqs.append(Request("late", 0.0, prompt_token_ids=tuple(range(20, 45)), sampling=SamplingParams(max_tokens=3, ignore_eos=True)))
    toks, reasons, events = _run(MODEL, dep, reqs)
    assert toks == [list(r) for r in reference(reqs)] and reasons == ["length"] * len(reqs)
    first = {e.request_id: e.time for e in events if e.kind == Ev.FIRST_TOKEN}
    ends = [e.time for e in events if e.kind == Ev.FINISHED and e.request_id.startswith("s")]
    assert first["late"] < min(ends)  # it was prefilled while the six decoded, not after them


def test_an_encode_batch_of_cache_hits_does_not_wait_for_the_device(monkeypatch):
    """A batch whose images are all encoder-cache hits launches nothing: it must not synchronise the device,
    which would drain the decode steps queued there (each such batch cost a full decode step on a GPU)."""
    from epd.engine.worker import Worker
    from epd.stages.work import EncodeBatch, EncodeItem

    w = Worker("e", ("encode",), MODEL, PoolConfig(mm_blocks=64, mm_block_tokens=16), "local")
    syncs = []
    monkeypatch.setattr(w, "_sync", lambda: syncs.append(1))
    image = ImageInput(width=64, height=48, seed=3)
    n = w.rt.family.num_image_tokens(64, 48)
    blocks = list(range(-(-n // 16)))
    first = w.execute(EncodeBatch([EncodeItem("a", 0, image, n, blocks, False, False)]))
    assert not first.items[0].error and syncs == [1]
    hit = w.execute(EncodeBatch([EncodeItem("b", 0, image, n, blocks, False, True)]))
    assert not hit.items[0].error and syncs == [1]
