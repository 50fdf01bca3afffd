"""The simulator: same events as the engine, latency fits, and a search whose answer is known."""

import dataclasses
import json

import numpy as np
import pytest

from epd.config import BackendConfig, DeploymentConfig, PoolConfig, RunConfig, SearchConfig, SLOConfig, WorkloadConfig
from epd.experiment import make_requests
from epd.lifetime import LifetimeEvent as Ev
from epd.run_result import batch_rows
from epd.serve.offline import OfflineLLM
from simulator.backend import SimBackend
from simulator.latency import ProfiledModel, fit
from simulator.search import candidates, search

EPD = DeploymentConfig(name="epd", encode=PoolConfig(instances=2), prefill=PoolConfig(), decode=PoolConfig())
PD = DeploymentConfig(name="pd", encode_prefill=PoolConfig(), decode=PoolConfig())
AGG = DeploymentConfig(name="aggregated", aggregated=PoolConfig(instances=2))
STAGE_ORDER = [
    Ev.ISSUED,
    Ev.ENCODE_BEGIN,
    Ev.ENCODE_END,
    Ev.MM_TRANSFER_BEGIN,
    Ev.MM_TRANSFER_END,
    Ev.PREFILL_BEGIN,
    Ev.PREFILL_END,
    Ev.FIRST_TOKEN,
    Ev.KV_TRANSFER_BEGIN,
    Ev.KV_TRANSFER_END,
    Ev.DECODE_BEGIN,
    Ev.FINISHED,
]


def _cfg(deployment, **workload):
    wl = WorkloadConfig(num_requests=8, rate=4.0, images_per_request=1, images_per_request_max=3, output_tokens=4, **workload)
    return RunConfig(deployment=deployment, workload=wl, backend=BackendConfig(kind="sim"))


def _kinds_by_request(events):
    out = {}
    for ev in sorted(events, key=lambda e: e.time):
        out.setdefault(ev.request_id, []).append(ev.kind)
    return out


@pytest.mark.parametrize("deployment", [EPD, PD, AGG], ids=["epd", "pd", "aggregated"])
def test_sim_emits_the_engines_events_in_stage_order(deployment):
    cfg = _cfg(deployment, arrival="offline")
    reqs = make_requests(cfg)
    simulated = SimBackend(cfg).run(reqs)
    sim = _kinds_by_request(simulated.events)
    with OfflineLLM(cfg.model, deployment, executor="local") as llm:
        llm.generate(reqs)
        engine = _kinds_by_request(llm.core.pipeline.events)
        engine_batches = batch_rows(llm.core.batches, llm.core.origin)
    assert sim.keys() == engine.keys()
    # batch records alike: the same fields, the same kinds on the same instances, every image encoded once
    assert simulated.batches and {tuple(b) for b in simulated.batches} == {tuple(b) for b in engine_batches}
    assert {(b["instance"], b["kind"]) for b in simulated.batches} == {(b["instance"], b["kind"]) for b in engine_batches}
    images = sum(len(r.images) for r in reqs)
    assert sum(b["size"] for b in simulated.batches if b["kind"] == "encode") == images
    assert sum(b["size"] for b in engine_batches if b["kind"] == "encode") == images
    for b in simulated.batches:
        assert b["submitted"] <= b["begin"] <= b["end"] and b["host_wait"] <= b["end"] - b["begin"] + 1e-9
    assert simulated.batch_stats["batches_encode"] == sum(1 for b in simulated.batches if b["kind"] == "encode")
    for rid, kinds in sim.items():
        assert set(kinds) == set(engine[rid])
        firsts = [kinds.index(k) for k in STAGE_ORDER if k in kinds]
        assert firsts == sorted(firsts)
        assert kinds.count(Ev.TOKEN) == engine[rid].count(Ev.TOKEN) == 3  # 4 tokens: the first comes from prefill
        disaggregated = deployment.name == "epd"
        assert (Ev.MM_TRANSFER_BEGIN in kinds) == disaggregated
        assert (Ev.KV_TRANSFER_BEGIN in kinds) == (deployment.name != "aggregated")


def test_fits_recover_known_coefficients():
    rng = np.random.default_rng(0)
    rows = []
    for tiles in range(1, 9):
        rows.append({"stage": "encode", "tiles": tiles, "seconds": 0.01 + 0.02 * tiles})
    for tokens, seqs in [(32, 1), (128, 1), (256, 2), (512, 1), (1024, 4), (2048, 2), (600, 3)]:
        sq = tokens * tokens // seqs
        rows.append(
            {"stage": "prefill", "tokens": tokens, "square": sq, "seqs": seqs, "seconds": 0.005 + 1e-4 * tokens + 2e-8 * sq + 1e-3 * seqs}
        )
    for b in (1, 2, 4, 8, 16):
        for ctx in (64, 512, 2048):
            rows.append(
                {
                    "stage": "decode",
                    "batch": b,
                    "context": b * ctx,
                    "seconds": (0.003 + 2e-4 * b + 1e-7 * b * ctx) * (1 + rng.normal(0, 0.01)),
                }
            )
    coeffs, errors = fit(rows)
    assert coeffs["encode"] == pytest.approx([0.01, 0.02], rel=1e-6)
    assert coeffs["prefill"] == pytest.approx([0.005, 1e-4, 2e-8, 1e-3], rel=1e-5)
    assert coeffs["decode"] == pytest.approx([0.003, 2e-4, 1e-7], rel=0.05)
    assert errors["encode"] < 1e-9 and errors["decode"] < 0.02


def test_profiled_model_from_the_shipped_cpu_profile():
    model = ProfiledModel.load("simulator/profiles/cpu-tiny-llava.json")
    from simulator.latency import DecodeShape, EncodeShape, PrefillShape

    assert 0 < model.encode(EncodeShape(1)) < model.encode(EncodeShape(8))
    assert 0 < model.prefill(PrefillShape((64,))) < model.prefill(PrefillShape((1024,)))
    assert 0 < model.decode(DecodeShape(1, 64)) < model.decode(DecodeShape(16, 16 * 1024))
    assert model.overhead > 0


def test_search_finds_the_split_that_relieves_the_bottleneck(tmp_path):
    """Encoding costs 50x prefill and decode: with 4 GPUs the best EPD split gives E two of them."""
    rows = [{"stage": "encode", "tiles": t, "seconds": 0.05 * t} for t in (1, 2, 4)]
    rows += [{"stage": "prefill", "tokens": n, "square": n * n, "seqs": 1, "seconds": 0.001} for n in (16, 64, 256, 512)]
    rows += [{"stage": "decode", "batch": b, "context": b * 64, "seconds": 0.001} for b in (1, 4, 16)]
    rows += [{"stage": "transfer", "bytes": n, "seconds": 1e-4} for n in (1, 1 << 20)]
    (tmp_path / "p.json").write_text(json.dumps({"rows": rows, "overhead": 0.0}))
    cfg = RunConfig(
        deployment=EPD,
        workload=WorkloadConfig(num_requests=60, images_per_request=1, output_tokens=4, prompt_tokens=8),
        slo=SLOConfig(ttft=0.5, tpot=0.05, attainment_target=0.9),
        backend=BackendConfig(kind="sim", latency_model="profiled", profile_path=str(tmp_path / "p.json")),
        search=SearchConfig(
            gpus=4, include_irp=False, include_baselines=False, rate_low=1.0, rate_high=64.0, iterations=6, processes=1, num_requests=60
        ),
    )
    assert [d.describe() for d in candidates(cfg)] == ["1E1P2D", "1E2P1D", "2E1P1D"]
    rows, _, simulated = search(cfg)
    assert rows[0]["deployment"] == "2E1P1D"
    assert rows[0]["goodput"] > 1.5 * rows[1]["goodput"] > 0
    assert simulated > 0


def test_goodput_search_candidate_counts():
    cfg = dataclasses.replace(RunConfig(deployment=EPD), search=SearchConfig(gpus=8, include_irp=False, include_baselines=False))
    assert len(candidates(cfg)) == 21
    cfg = dataclasses.replace(cfg, search=SearchConfig(gpus=8, include_irp=True, include_baselines=True))
    names = [d.describe() + ("+IRP" if d.irp else "") for d in candidates(cfg)]
    assert "8EPD" in names and "7EP1D" in names and "6E1P1D+IRP" in names and len(names) == len(set(names))


def test_roofline_charges_host_preprocessing_per_image_over_the_workers_cores():
    """Encode spans = GPU roofline + host preprocessing (a * megapixels + b * tiles per image, images in
    parallel over the E worker's num_cpus); the profiled model measured it inside encode, so adds none."""
    from epd.config import HardwareConfig
    from epd.models.runtime import load_family
    from simulator.latency import RooflineModel
    from simulator.shapes import ModelShape

    cfg = _cfg(EPD, arrival="offline")
    hw = HardwareConfig(preprocess_s_per_mpixel=0.5, preprocess_s_per_tile=0.25)
    lat = RooflineModel(ModelShape.of(load_family(cfg.model), cfg.model.dtype), hw)
    assert lat.preprocess([(2.0, 1)], threads=4) == pytest.approx(1.25)
    assert lat.preprocess([(2.0, 1)] * 4, threads=4) == pytest.approx(1.25)  # one per core
    assert lat.preprocess([(2.0, 1)] * 8, threads=4) == pytest.approx(2.5)
    assert ProfiledModel({"encode": [0.1, 0.0]}).preprocess([(2.0, 1)], threads=1) == 0.0
    hw = dataclasses.replace(hw, decode_s_per_mpixel=0.1)
    assert RooflineModel(lat.m, hw).preprocess([(2.0, 1)], threads=1) == pytest.approx(1.45)
    assert RooflineModel(lat.m, hw, resize_on_device=True).preprocess([(2.0, 1)], threads=1) == pytest.approx(0.2)  # decode only
    # on the E worker's GPU: resizing per megapixel and tile, nvJPEG per megapixel; the host then does nothing
    hw = dataclasses.replace(hw, device_decode_s_per_mpixel=0.01, device_resize_s_per_mpixel=0.002, device_resize_s_per_tile=0.003)
    assert RooflineModel(lat.m, hw).device_prep([(2.0, 13)]) == 0.0
    assert RooflineModel(lat.m, hw, True).device_prep([(2.0, 13), (1.0, 1)]) == pytest.approx(0.004 + 0.039 + 0.002 + 0.003)
    nvjpeg = RooflineModel(lat.m, hw, True, True)
    assert nvjpeg.preprocess([(2.0, 1)], threads=1) == 0.0
    assert nvjpeg.device_prep([(2.0, 13)]) == pytest.approx(0.02 + 0.004 + 0.039)

    def encode_spans(hardware):
        run = dataclasses.replace(cfg, hardware=hardware)
        events = SimBackend(run).run(make_requests(run)).events
        begins = {(e.request_id, e.data.get("image")): e.time for e in events if e.kind == Ev.ENCODE_BEGIN}
        return [e.time - begins[(e.request_id, e.data.get("image"))] for e in events if e.kind == Ev.ENCODE_END]

    plain, slow = encode_spans(cfg.hardware), encode_spans(dataclasses.replace(cfg.hardware, preprocess_s_per_mpixel=1.0))
    assert min(s - p for s, p in zip(slow, plain)) > 0.9 * min(im.width * im.height for r in make_requests(cfg) for im in r.images) / 1e6


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_an_encode_batchs_host_preparation_overlaps_the_batches_before_it(async_scheduling):
    """As on the engine's E worker, a batch's images are prepared from when it is sent and it joins the worker's
    queue once they are ready: the next batch's host work runs under this one's tower, whatever the scheduling
    depth, and the last image is encoded well before four preparations and four towers one after another."""
    from epd.config import HardwareConfig

    one_e = DeploymentConfig(
        name="epd",
        encode=PoolConfig(instances=1, max_images_per_batch=1),
        prefill=PoolConfig(),
        decode=PoolConfig(),
        async_scheduling=async_scheduling,
    )
    hw = HardwareConfig(peak_flops=1.25e7, preprocess_s_per_mpixel=1.5, rpc_latency=0.0, step_overhead=0.0)  # ~0.5 s each a photo

    def last_encode_end(hardware) -> float:
        run = dataclasses.replace(_cfg(one_e, arrival="offline"), hardware=hardware)
        run = dataclasses.replace(
            run, workload=dataclasses.replace(run.workload, num_requests=4, images_per_request=1, images_per_request_max=1)
        )
        events = SimBackend(run).run(make_requests(run)).events
        return max(e.time for e in events if e.kind == Ev.ENCODE_END)

    towers = last_encode_end(dataclasses.replace(hw, preprocess_s_per_mpixel=0.0, decode_s_per_mpixel=0.0))
    preps = last_encode_end(dataclasses.replace(hw, peak_flops=1e18))
    both = last_encode_end(hw)
    assert towers > 0.5 and preps > 1.0, (towers, preps)  # both matter here
    assert both < 0.8 * (towers + preps), (both, towers, preps)  # serial: 4 x (prep + tower); overlapped: ~4 x prep + tower


@pytest.mark.parametrize("transfer,frees", [("object_store", True), ("local", False)])
def test_sim_frees_a_senders_blocks_when_the_engines_backend_does(transfer, frees):
    """object_store copies the data out at send: the encoder's MM blocks are free at once, and with room
    for one image its next image is encoded before the first one is pulled. Block-copying backends keep
    them until the pull has completed: the next encode waits for it, as it does in the engine."""
    e = PoolConfig(mm_blocks=1, mm_block_tokens=64, encoder_cache_blocks=0)  # room for one tiny-LLaVA image (16 tokens)
    dep = DeploymentConfig(name="epd", encode=e, prefill=PoolConfig(mm_block_tokens=64), decode=PoolConfig(), transfer=transfer)
    wl = WorkloadConfig(num_requests=6, arrival="offline", images_per_request=1, output_tokens=4)
    cfg = RunConfig(deployment=dep, workload=wl, backend=BackendConfig(kind="sim"))
    reqs = make_requests(cfg)
    events = sorted(SimBackend(cfg).run(reqs).events, key=lambda ev: ev.time)
    pulls = [ev.time for ev in events if ev.kind == Ev.MM_TRANSFER_END]
    encodes = [ev.time for ev in events if ev.kind == Ev.ENCODE_BEGIN]
    assert len(encodes) == len(reqs) and len(pulls) == len(reqs)
    waited = all(encodes[i + 1] >= pulls[i] - 1e-9 for i in range(len(reqs) - 1))
    assert waited == (not frees)


def test_the_simulators_view_of_the_backends_is_theirs():
    from epd.config import COPIES_ON_SEND, TRANSFER_BACKENDS
    from epd.transfer import transfer_class

    assert {t for t in TRANSFER_BACKENDS if transfer_class(t).frees_on_send} == COPIES_ON_SEND


def test_native_resolution_towers_pay_attention_per_image():
    """Qwen2-VL attends over a whole image: the roofline charges its patches squared per image (one
    big image costs more than as many tokens in small ones); Qwen2.5-VL's windows cost less; tiled
    towers keep their attention inside the per-tile cost."""
    from epd.config import HardwareConfig, ModelConfig, TextModelConfig, VisionTowerConfig
    from epd.models.runtime import load_family
    from simulator.latency import EncodeShape, RooflineModel
    from simulator.shapes import ModelShape

    vision = VisionTowerConfig(hidden_size=1280, intermediate_size=5120, num_layers=32, num_heads=16)
    text = TextModelConfig(arch="qwen2", hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4)
    shapes = {
        fam: ModelShape.of(load_family(ModelConfig(name=fam, family=fam, vision=vision, text=text, max_pixels=12845056)), "bfloat16")
        for fam in ("qwen2_vl", "qwen2_5_vl")
    }
    m = shapes["qwen2_vl"]
    full, windowed, _, per_token, width = m.native_attention
    assert (full, windowed, per_token, width) == (32, 0, 4, 1280)
    assert m.image_attention_flops(1000) == 4.0 * 1280 * 32 * 4000**2
    roof = RooflineModel(m, HardwareConfig())
    one_big = roof.encode(EncodeShape(16, m.image_attention_flops(4096)))
    four_small = roof.encode(EncodeShape(16, 4 * m.image_attention_flops(1024)))
    assert one_big > 2 * four_small
    assert shapes["qwen2_5_vl"].image_attention_flops(4096) < m.image_attention_flops(4096) / 4  # 4 full layers of 32
    tiled = ModelShape.of(load_family(ModelConfig()), "float32")
    assert tiled.native_attention == () and tiled.image_attention_flops(576) == 0.0


def test_the_simulator_encodes_a_videos_segments_as_the_engine_does():
    """Qwen2-VL with video requests: the simulator's encode items are the engine's (one per two-frame
    segment, images after), every request finishes, and more frames cost the E stage more host time."""
    from tests.test_qwen2_vl import tiny

    def run(frames):
        wl = WorkloadConfig(num_requests=6, rate=4.0, images_per_request=1, videos_per_request=1, video_frames=frames, output_tokens=3)
        cfg = RunConfig(model=tiny("qwen2_vl"), deployment=EPD, workload=wl, backend=BackendConfig(kind="sim"))
        return cfg, SimBackend(cfg).run(make_requests(cfg)).events

    cfg, events = run(6)
    ends = [e for e in events if e.kind == Ev.ENCODE_END]
    assert len(ends) == 6 * (3 + 1)  # three segments of two frames and the image, per request
    assert sum(e.kind == Ev.FINISHED for e in events) == 6
    with OfflineLLM(cfg.model, EPD, executor="local") as llm:
        llm.generate(make_requests(cfg))
        engine_ends = [e for e in llm.core.pipeline.events if e.kind == Ev.ENCODE_END]
    assert sorted((e.request_id, e.data.get("image")) for e in engine_ends) == sorted((e.request_id, e.data.get("image")) for e in ends)

    def encode_time(evs):
        begin = {(e.request_id, e.data.get("image")): e.time for e in evs if e.kind == Ev.ENCODE_BEGIN}
        return sum(e.time - begin[(e.request_id, e.data.get("image"))] for e in evs if e.kind == Ev.ENCODE_END)

    assert encode_time(run(16)[1]) > encode_time(events)


def test_regime_map_scales_the_encoder_fits_kv_in_memory_and_names_the_winner(tmp_path):
    """`task=regime` on the tiny model: the encoder/LM ratio axis scales with the encoder cost; a memory
    smaller than the weights fits no deployment; KV blocks grow with memory; a costlier encoder lowers
    every family's goodput and moves GPUs to E in the best E/P/D split; the files are written."""
    from epd.config import HardwareConfig, RegimeConfig
    from epd.models.runtime import load_family
    from simulator.regime import pool_in_memory, run_regime
    from simulator.shapes import ModelShape

    shape = ModelShape.of(load_family(RunConfig().model), "float32")
    heavy = shape.with_encoder_scale(8.0)
    assert heavy.encoder_to_lm_ratio(64) == pytest.approx(8 * shape.encoder_to_lm_ratio(64))
    assert heavy.vision_params == round(8 * shape.vision_params) and heavy.lm_params == shape.lm_params
    pool = PoolConfig(mm_blocks=4, kv_block_size=16)
    small, big = (pool_in_memory("prefill", pool, shape, m, 0.1) for m in (2e8, 4e8))
    assert 0 < small.kv_blocks < big.kv_blocks and pool_in_memory("prefill", pool, shape, 1e3, 0.1) is None
    assert pool_in_memory("encode", pool, shape, 2e8, 0.1) == pool  # no KV where a pool only encodes
    cfg = RunConfig(
        deployment=DeploymentConfig(
            name="epd", encode=PoolConfig(max_images_per_batch=4), prefill=PoolConfig(), decode=PoolConfig(max_decode_seqs=16)
        ),
        workload=WorkloadConfig(num_requests=60, output_tokens=4, prompt_tokens=8, image_width=64, image_height=64),
        slo=SLOConfig(ttft=0.4, tpot=0.05, attainment_target=0.9),
        hardware=HardwareConfig(peak_flops=1e11, memory_bandwidth=1e11, compute_efficiency=1.0, memory_efficiency=1.0),
        backend=BackendConfig(kind="sim"),
        search=SearchConfig(include_irp=False, rate_low=0.5, rate_high=100.0, iterations=5, processes=1, num_requests=60),
        regime=RegimeConfig(gpus=4, encoder_scales=[1.0, 800.0], images_per_request=[2], memory_gb=[1e-6, 1.0]),
        task="regime",
    )
    run_regime(cfg, tmp_path, {})
    points = json.loads((tmp_path / "regime.json").read_text())["points"]
    fits = {p["encoder_scale"]: p for p in points if p["memory_gb"] == 1.0}
    for p in points:
        if p["memory_gb"] < 1:
            assert p["winner"] is None and all(p[k] is None for k in ("epd", "pd", "aggregated"))
    light, costly = fits[1.0], fits[800.0]
    for k in ("epd", "pd", "aggregated"):
        assert light[k]["goodput"] > costly[k]["goodput"] > 0, k
    encoders = {s: int(p["epd"]["deployment"].split("E")[0]) for s, p in fits.items()}
    assert encoders[800.0] >= 2 and encoders[800.0] >= encoders[1.0]
    assert costly["winner"] is not None and light["winner"] is not None
    assert "does not fit" in (tmp_path / "regime.md").read_text() and (tmp_path / "regime.png").stat().st_size > 0


@pytest.mark.parametrize("family", ["llava", "internvl"])
@pytest.mark.parametrize("efficiency,floor", [(0.0, 0.0), (0.42, 1.1e-3), (0.2, 0.0)])
def test_the_towers_own_efficiency_and_batch_floor_price_encode_batches_only(family, efficiency, floor):
    """`hardware.vision_efficiency` (0: the LM's compute_efficiency) and `encode_floor` set an encode batch's
    time, compute bound: floor + FLOPs / (efficiency x peak); prefill and decode steps do not change."""
    from helpers import tiny_model_config

    from epd.config import HardwareConfig
    from epd.models.runtime import load_family
    from simulator.latency import DecodeShape, EncodeShape, PrefillShape, RooflineModel
    from simulator.shapes import ModelShape

    shape = ModelShape.of(load_family(tiny_model_config(family)), "bfloat16")
    hw = HardwareConfig(peak_flops=1e12, memory_bandwidth=1e15, compute_efficiency=0.6)
    fitted = RooflineModel(shape, dataclasses.replace(hw, vision_efficiency=efficiency, encode_floor=floor))
    for tiles in (1, 7, 32):
        want = floor + tiles * shape.vision_flops_per_tile / (1e12 * (efficiency or 0.6))
        assert fitted.encode(EncodeShape(tiles)) == pytest.approx(want, rel=1e-9)
    plain = RooflineModel(shape, hw)
    assert fitted.prefill(PrefillShape((40, 9))) == plain.prefill(PrefillShape((40, 9)))
    assert fitted.decode(DecodeShape(4, 300)) == plain.decode(DecodeShape(4, 300))
