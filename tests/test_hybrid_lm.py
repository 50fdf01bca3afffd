"""MiniCPM-V 4.6's hybrid LM (Qwen3.5: Gated DeltaNet linear-attention layers between gated full-attention
ones): the gated delta rule's chunked form against its token-by-token form, greedy tokens against
transformers, then every deployment of the engine against the runtime, with state slots moved between
workers, carried across prefill chunks, and started over on preemption."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import MiniCPMV4_6ForConditionalGeneration

from epd.config import DeploymentConfig, ModelConfig, PoolConfig, TextModelConfig, VisionTowerConfig
from epd.kernels import gated_delta
from epd.models.runtime import ModelRuntime, load_family
from epd.request import ImageInput, Request, SamplingParams
from epd.serve.offline import OfflineLLM
from tests.helpers import AGG, EPD, PD, reference, run
from tests.test_minicpmv import greedy_pairs

SHAPE = dict(image_token_id=3, max_tiles=9, scale_resolution=112, vision_merger_layer=1)


def tiny(**text) -> ModelConfig:
    vision = VisionTowerConfig(
        hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4, image_size=112, hidden_act="gelu_pytorch_tanh"
    )
    t = dict(
        arch="qwen3_5_text",
        rope_theta=1e6,
        max_position_embeddings=8192,
        num_layers=4,
        head_dim=32,
        partial_rotary_factor=0.5,
        full_attention_interval=2,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
    )
    return ModelConfig(name="tiny-minicpmv4.6", family="minicpmv4_6", vision=vision, text=TextModelConfig(**{**t, **text}), **SHAPE)


@pytest.mark.parametrize("length", [1, 5, 63, 64, 65, 150])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_chunked_rule_equals_the_token_by_token_one(length, seed):
    g = torch.Generator().manual_seed(seed)
    heads, dk, dv = 3, 8, 5
    q = gated_delta.l2_normalized(torch.randn(heads, length, dk, generator=g)) * dk**-0.5
    k = gated_delta.l2_normalized(torch.randn(heads, length, dk, generator=g))
    v = torch.randn(heads, length, dv, generator=g)
    gate = -torch.rand(heads, length, generator=g)
    beta = torch.rand(heads, length, generator=g)
    state = torch.randn(heads, dk, dv, generator=g)
    out, final = gated_delta.chunked(q, k, v, gate, beta, state, chunk=16)
    s = state[None]
    for t in range(length):
        o, s = gated_delta.recurrent_step(q[None, :, t], k[None, :, t], v[None, :, t], gate[None, :, t], beta[None, :, t], s)
        torch.testing.assert_close(out[:, t], o[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, s[0], atol=1e-5, rtol=1e-5)


def test_sequences_side_by_side_padded_with_no_op_tokens_equal_each_alone():
    g = torch.Generator().manual_seed(3)
    heads, dk, dv, lengths = 2, 8, 4, [5, 40, 17, 1]
    longest = max(lengths)
    q = gated_delta.l2_normalized(torch.randn(4, heads, longest, dk, generator=g)) * dk**-0.5
    k = gated_delta.l2_normalized(torch.randn(4, heads, longest, dk, generator=g))
    v = torch.randn(4, heads, longest, dv, generator=g)
    gate, beta = -torch.rand(4, heads, longest, generator=g), torch.rand(4, heads, longest, generator=g)
    real = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
    state = torch.randn(4, heads, dk, dv, generator=g)
    out, final = gated_delta.chunked(q, k, v, gate * real[:, None], beta * real[:, None], state, chunk=16)
    for i, n in enumerate(lengths):
        o, s = gated_delta.chunked(q[i, :, :n], k[i, :, :n], v[i, :, :n], gate[i, :, :n], beta[i, :, :n], state[i], chunk=16)
        torch.testing.assert_close(out[i, :, :n], o, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(final[i], s, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 5, 16, 64, 100])
def test_the_unit_lower_inverse_inverts(n):
    lower = torch.randn(3, n, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64).tril(-1) * 0.3
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(gated_delta.unit_lower_inverse(lower) @ (eye + lower), eye.expand(3, n, n), atol=1e-9, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a Triton kernel: needs a GPU")
@pytest.mark.parametrize("dims", [(4, 16, 16), (32, 128, 128), (6, 64, 32)])
def test_the_triton_decode_update_equals_torch(dims):
    """In place in the pool (other slots and the conv windows untouched), fresh sequences from zeros."""
    from epd.kernels import triton_gated_delta

    heads, dk, dv = dims
    g = torch.Generator(device="cuda").manual_seed(heads)
    n, slots_total, offset = 5, 9, 7
    pool = torch.randn(slots_total, offset + heads * dk * dv + 3, device="cuda", generator=g)
    before = pool.clone()
    slots = torch.tensor([4, 0, 8, 2, 5], device="cuda")
    fresh = torch.tensor([0, 1, 0, 0, 1], dtype=torch.int32, device="cuda")
    q = gated_delta.l2_normalized(torch.randn(n, heads, dk, device="cuda", generator=g)) * dk**-0.5
    k = gated_delta.l2_normalized(torch.randn(n, heads, dk, device="cuda", generator=g))
    v = torch.randn(n, heads, dv, device="cuda", generator=g)
    gate, beta = -torch.rand(n, heads, device="cuda", generator=g), torch.rand(n, heads, device="cuda", generator=g)
    state = before[slots, offset : offset + heads * dk * dv].view(n, heads, dk, dv).masked_fill(fresh.bool()[:, None, None, None], 0.0)
    want_o, want_state = gated_delta.recurrent_step(q, k, v, gate, beta, state)
    got_o = triton_gated_delta.step_in_pool(q, k, v, gate, beta, pool, slots, fresh, offset)
    torch.testing.assert_close(got_o, want_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pool[slots, offset : offset + heads * dk * dv].view(n, heads, dk, dv), want_state, atol=1e-5, rtol=1e-5)
    untouched = torch.ones(slots_total, dtype=torch.bool, device="cuda")
    untouched[slots] = False
    assert torch.equal(pool[untouched], before[untouched])
    assert torch.equal(pool[:, :offset], before[:, :offset]) and torch.equal(pool[:, -3:], before[:, -3:])


def _image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(
    scope="module",
    params=[
        dict(),
        dict(full_attention_interval=4, num_layers=4, linear_num_value_heads=2),
        # rotary on every dim, head_dim from hidden/heads, three value heads a key head, a 2-tap convolution
        dict(
            partial_rotary_factor=1.0,
            head_dim=0,
            linear_num_value_heads=6,
            linear_conv_kernel_dim=2,
            num_layers=3,
            full_attention_interval=3,
        ),
    ],
)
def checkpoint(request, tmp_path_factory):
    """transformers' model with non-trivial norms, decays and step sizes, saved; ours loaded from it."""
    torch.manual_seed(0)
    hf = MiniCPMV4_6ForConditionalGeneration(load_family(tiny(**request.param)).hf).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            else:
                p.normal_(0, 0.3 if "A_log" in name or "dt_bias" in name else 0.1)
    path = tmp_path_factory.mktemp("minicpmv46")
    hf.save_pretrained(path)
    return hf, ModelRuntime(ModelConfig(load_format="hf", path=str(path), **SHAPE), {"vision", "lm"})


def test_greedy_tokens_equal_transformers(checkpoint):
    """Prompts on both sides of the chunked rule's 64-token blocks; 32 tokens each."""
    hf, ours = checkpoint
    assert type(ours.lm).__name__ == "HybridLM"
    images = [_image(640, 480, 0), _image(300, 200, 1)]
    cases = [[0], [1, 0], [], []]
    texts = [[20, 21, 22], list(range(40, 61)), list(range(30, 33)), list(range(30, 130))]
    for out, ref in greedy_pairs(hf, ours, images, texts, cases, 112, eos_free=True):  # ignore_eos: EOS may be the argmax
        assert out == ref
        assert len(set(out)) > 1


def test_a_step_without_state_slots_is_refused():
    from epd.models.generate import lm_step

    rt = ModelRuntime(tiny(), {"lm"})
    kv = rt.allocate_kv_cache(4, 4)
    with pytest.raises(ValueError, match="states"):
        lm_step(rt, kv, [[5, 6]], [0], [[0]], 4)


def _requests(n: int = 6) -> list[Request]:
    sizes = [(120, 90), (300, 200), (640, 480)]
    return [
        Request(
            f"h{i}",
            prompt_token_ids=tuple(range(30 + i, 36 + 5 * i)),
            images=tuple(ImageInput(width=sizes[(i + k) % 3][0], height=sizes[(i + k) % 3][1], seed=3 * i + k) for k in range(i % 3)),
            sampling=SamplingParams(max_tokens=6 + i, ignore_eos=True),
        )
        for i in range(n)
    ]


def test_engine_deployments_equal_the_runtime(ray_cluster):
    """States pulled from prefill by decode (local and Ray executors; object store and in-process transfers
    here, nccl in the tensor-parallel test), carried across prefill chunks, and recomputed from zero after a preemption; never more
    sequences at once than an instance has slots."""
    model = dataclasses.replace(tiny(), seed=1)
    reqs = _requests()
    expected = dict(zip([r.request_id for r in reqs], reference(reqs, model)))
    irp = DeploymentConfig(**{**EPD.__dict__, "irp": True, "encode": PoolConfig(instances=3, mm_blocks=64)})
    chunked = DeploymentConfig(name="aggregated", aggregated=PoolConfig(instances=1, kv_blocks=64, max_prefill_tokens=7))
    few_slots = DeploymentConfig(
        name="pd", encode_prefill=PoolConfig(kv_blocks=64, state_slots=1), decode=PoolConfig(kv_blocks=64, state_slots=2)
    )
    # (nccl: the sender pushes the state after the KV, in test_tensor_parallel_ranks_split_heads_and_states)
    runs = [(EPD, "ray"), (PD, "local"), (AGG, "local"), (irp, "local"), (chunked, "local"), (few_slots, "local")]
    for deployment, executor in runs:
        outs, _, _ = run(deployment, reqs, executor, model=model)
        assert {k: v.token_ids for k, v in outs.items()} == expected, (deployment.name, executor)
    # Sequences outgrowing a small KV pool: the newest are preempted and recomputed, their state from zero.
    texts = [
        Request(f"t{i}", prompt_token_ids=tuple(range(40 + i, 50 + i)), sampling=SamplingParams(max_tokens=30, ignore_eos=True))
        for i in range(5)
    ]
    tight = DeploymentConfig(
        name="aggregated", aggregated=PoolConfig(instances=1, kv_blocks=14, kv_block_size=4), kv_allocation="on_demand"
    )
    outs, _, events = run(tight, texts, "local", model=model)
    assert {k: v.token_ids for k, v in outs.items()} == dict(zip([r.request_id for r in texts], reference(texts, model)))
    assert any(e.kind.value == "preempted" for e in events), "the small pool was meant to preempt"


def test_prefix_caching_stays_off_for_a_hybrid_lm():
    from epd.stages.instance import Instance

    inst = Instance("p-0", "prefill", ("prefill",), PoolConfig(), prefix_caching=True, keeps_state=True)
    assert inst.prefix_cache is None and inst.state is not None and inst.state.num_blocks == 2 * PoolConfig().max_decode_seqs


def test_a_failed_batch_reruns_only_what_can_start_from_zero():
    from epd.engine.isolation import Failed, isolated

    calls = []

    def run(idx):
        calls.append(list(idx))
        if len(idx) > 1 or idx == [2]:
            raise RuntimeError("boom")
        return [f"ok{i}" for i in idx]

    out = isolated(run, 4, "w", rerunnable=[False, True, True, False])
    assert calls == [[0, 1, 2, 3], [1], [2]]
    assert out[1] == "ok1" and isinstance(out[2], Failed) and "boom" in out[2].reason
    assert all(isinstance(out[i], Failed) and "not run again" in out[i].reason for i in (0, 3))


def test_a_decode_batch_that_fails_part_way_aborts_its_sequences_rather_than_corrupt_them(monkeypatch):
    """A hybrid step that raises after some linear layers advanced some states: the sequences it carried
    are aborted with the reason, never continued from a half-updated state; the others finish as the
    runtime does."""
    from epd.models.hybrid_lm import GatedDeltaNet

    model = dataclasses.replace(tiny(), seed=2)
    reqs = _requests(4)
    expected = dict(zip([r.request_id for r in reqs], reference(reqs, model)))
    forward, fired, armed = GatedDeltaNet.forward, [], []

    def flaky(self, x, meta):
        out = forward(self, x, meta)  # this layer's states advanced first
        several_decodes = len(meta.query_lens) >= 2 and all(n == 1 for n in meta.query_lens)
        if armed and not fired and self.index == 1 and several_decodes:
            fired.append(list(meta.states.slots))
            raise RuntimeError("device fault")
        return out

    monkeypatch.setattr(GatedDeltaNet, "forward", flaky)
    agg = DeploymentConfig(name="aggregated", aggregated=PoolConfig(instances=1, kv_blocks=64))
    with OfflineLLM(model, agg, "local") as llm:
        armed.append(True)  # after the warm-up
        outs = {o.request_id: o for o in llm.generate(reqs)}
        events = list(llm.core.pipeline.events)
    assert fired, "no decode batch of several sequences ran"
    aborted = {e.request_id for e in events if e.kind.value == "aborted"}
    assert aborted and all(
        "linear-attention state" in str(e.data.get("reason")) for e in events if e.request_id in aborted and e.kind.value == "aborted"
    )
    for rid, o in outs.items():
        if rid not in aborted:
            assert o.token_ids == expected[rid]


@pytest.mark.parametrize("text", [dict(), dict(hidden_size=256, intermediate_size=512, full_attention_interval=4)])
def test_the_simulators_shape_counts_the_hybrid_lm_it_models(text):
    """Its parameters (weights read by every decode step) as the module holds them, KV only for the full
    layers, and the per-sequence state the pools hold."""
    from simulator.shapes import ModelShape

    rt = ModelRuntime(tiny(**text), {"lm"})
    shape = ModelShape.of(rt.family, "float32")
    params = sum(p.numel() for p in rt.lm.parameters())
    assert abs(shape.lm_params / params - 1) < 0.01  # norms, convolution and decay parameters aside
    t = rt.text_cfg
    assert shape.kv_bytes_per_token == 2 * len(t.full_attention_layers) * t.num_kv_heads * t.attn_head_dim * 4
    assert shape.state_bytes_per_seq == rt.allocate_state_pool(1).numel() * 4 > 0
    assert shape.linear_layers == t.num_layers - len(t.full_attention_layers)


@pytest.mark.parametrize("floor,passes", [(1e-4, 1.0), (0.0, 2.5), (3e-4, 1.7)])
def test_the_simulators_linear_layer_costs_enter_hybrid_steps_only(floor, passes):
    """`hardware.linear_layer_floor` adds per linear layer to every LM step of a hybrid LM, `state_passes`
    scales the state bytes each sequence moves per step; a plain LM's steps do not change."""
    from epd.config import HardwareConfig
    from simulator.latency import DecodeShape, PrefillShape, RooflineModel
    from simulator.shapes import ModelShape

    hw = HardwareConfig(peak_flops=1e15, memory_bandwidth=4e12, memory_efficiency=0.9, step_floor=1e-3)
    fitted = dataclasses.replace(hw, linear_layer_floor=floor, state_passes=passes)
    hybrid = ModelShape.of(ModelRuntime(tiny(), {"lm"}).family, "bfloat16")
    plain = ModelShape.of(ModelRuntime(ModelConfig(seed=1), {"lm"}).family, "bfloat16")
    state_s = 2 * hybrid.state_bytes_per_seq / (4e12 * 0.9)
    for b in (1, 8, 64):
        extra = RooflineModel(hybrid, fitted).decode(DecodeShape(b, 100 * b)) - RooflineModel(hybrid, hw).decode(DecodeShape(b, 100 * b))
        assert extra == pytest.approx(hybrid.linear_layers * floor + (passes - 1) * b * state_s, rel=1e-6, abs=1e-12)
        assert RooflineModel(plain, fitted).decode(DecodeShape(b, 100 * b)) == RooflineModel(plain, hw).decode(DecodeShape(b, 100 * b))
    assert RooflineModel(hybrid, fitted).prefill(PrefillShape((50, 70))) >= RooflineModel(hybrid, hw).prefill(PrefillShape((50, 70)))


def test_tensor_parallel_ranks_split_heads_and_states(ray_cluster):
    """tp=2: each rank holds half the attention heads, linear heads and MLP, and half of every sequence's
    state (gloo all-reduces); P to D per rank over nccl; tokens as the single-process runtime's."""
    model = dataclasses.replace(tiny(), seed=3)
    reqs = _requests(4)
    expected = dict(zip([r.request_id for r in reqs], reference(reqs, model)))
    split = DeploymentConfig(
        name="epd",
        transfer="nccl",
        encode=PoolConfig(mm_blocks=64),
        prefill=PoolConfig(kv_blocks=64, tp=2, max_prefill_tokens=9),
        decode=PoolConfig(kv_blocks=64, max_decode_seqs=3, tp=2),
    )
    outs, info, _ = run(split, reqs, "ray", model=model)
    assert {k: v.token_ids for k, v in outs.items()} == expected
    whole = ModelRuntime(model, {"lm"}).allocate_state_pool(split.decode.state_slot_count + 1)  # + the graphs' scratch slot
    decode = next(i for i in info if i["worker"].startswith("decode"))
    assert decode["state_cache_bytes"] == whole.numel() * 4 // 2


def test_fused_projections_give_the_same_logits():
    """The fused input projections and MLP (as workers run them on GPUs) against the per-projection layers:
    a prefill of two prompts, then a decode step, from the same slots."""
    from epd.models.generate import lm_step

    plain, fused = ModelRuntime(tiny(), {"lm"}), ModelRuntime(tiny(), {"lm"})
    fused.lm.fuse()
    fused.lm.fuse()  # idempotent
    assert hasattr(fused.lm.model.layers[0].linear_attn, "in_proj") and hasattr(fused.lm.model.layers[1].self_attn, "qkv_proj")
    logits = []
    for rt in (plain, fused):
        kv, pool = rt.allocate_kv_cache(16, 4), rt.allocate_state_pool(3)
        first = lm_step(rt, kv, [list(range(5, 25)), list(range(30, 37))], [0, 0], [[0, 1, 2, 3, 4], [5, 6]], 4, states=(pool, [2, 0]))
        second = lm_step(rt, kv, [[9], [11]], [20, 7], [[0, 1, 2, 3, 4, 7], [5, 6]], 4, states=(pool, [2, 0]))
        logits.append((first, second))
    for a, b in zip(*logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_decode_step_from_static_buffers_equals_the_step_from_lists():
    """What a CUDA graph of a hybrid decode step replays (slots read from a device buffer, rows 0..n-1)
    against the step built from the sequences' lists: same logits, same states written."""
    from epd.kernels.attention import AttentionMetadata
    from epd.models.generate import lm_step
    from epd.models.hybrid_lm import DecodeStates

    rt = ModelRuntime(tiny(), {"lm"})
    kv, pool = rt.allocate_kv_cache(16, 4), rt.allocate_state_pool(4)
    tables = [[0, 1, 2, 3, 4, 7], [5, 6]]
    lm_step(rt, kv, [list(range(5, 25)), list(range(30, 37))], [0, 0], tables, 4, states=(pool, [3, 1]))
    kv2, pool2 = kv.clone(), pool.clone()
    want = lm_step(rt, kv, [[9], [11]], [20, 7], tables, 4, states=(pool, [3, 1]))
    meta = AttentionMetadata.build(tables, [1, 1], [21, 8], 4, torch.device("cpu"))
    meta.states = DecodeStates(pool2, torch.tensor([3, 1]))
    with torch.inference_mode():
        got = rt.lm(torch.tensor([9, 11]), torch.tensor([20, 7]), kv2, meta)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(pool2, pool)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs: needs a GPU")
@pytest.mark.parametrize("triton", ["0", "1"])
def test_decode_graphs_replay_the_eager_step(triton, monkeypatch):
    """The worker's decode graphs for a hybrid LM (captured at 4, replayed for 3 rows: one padded row
    writing the scratch slot and block) against the eager step: same logits, same states in the
    sequences' slots, every other slot untouched; with the torch and with the Triton state update."""
    from epd.models.decode_graphs import DecodeGraphs
    from epd.models.generate import lm_step

    monkeypatch.setenv("EPD_TRITON_DELTA", triton)
    rt = ModelRuntime(tiny(linear_key_head_dim=32, linear_value_head_dim=32), {"lm"}, "cuda")
    rt.lm.fuse()
    kv, pool = rt.allocate_kv_cache(17, 4), rt.allocate_state_pool(6)  # block 16 and slot 5: the graphs' scratch
    tables = [[0, 1, 2, 3, 4, 7], [5, 6], [8, 9, 10]]
    prompts = [list(range(5, 25)), list(range(30, 37)), list(range(40, 50))]
    lm_step(rt, kv, prompts, [0, 0, 0], tables, 4, states=(pool, [3, 1, 4]))
    kv2, pool2 = kv.clone(), pool.clone()
    want = lm_step(rt, kv, [[9], [11], [13]], [20, 7, 10], tables, 4, states=(pool, [3, 1, 4]))
    graphs = DecodeGraphs(rt.lm, kv2, 4, 16, 8, sizes=(4,), state=pool2)
    got = graphs.run([9, 11, 13], [20, 7, 10], tables, key="k", state_slots=[3, 1, 4])
    torch.cuda.synchronize()
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(pool2[:5], pool[:5], atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(kv2[:, :, :16], kv[:, :, :16])  # [layers, k/v, blocks, ...]: block 16 is the scratch


def test_memory_sizing_leaves_room_for_the_state_pool():
    """The regime map's KV blocks from memory: a hybrid LM's state slots come out of the same memory."""
    from simulator.regime import pool_in_memory
    from simulator.shapes import ModelShape

    shape = ModelShape.of(load_family(tiny()), "float32")
    pool = PoolConfig(max_decode_seqs=4, mm_blocks=1)
    memory = shape.lm_params * 4 + 200 * 16 * shape.kv_bytes_per_token + 9 * shape.state_bytes_per_seq + 64 * 64 * 4
    fitted = pool_in_memory("decode", pool, shape, memory, 0.0)
    assert fitted is not None and 195 <= fitted.kv_blocks <= 200
    without_state = pool_in_memory("decode", pool, dataclasses.replace(shape, state_bytes_per_seq=0), memory, 0.0)
    assert without_state.kv_blocks > fitted.kv_blocks


def test_role_switches_move_state_pools_with_the_roles(ray_cluster):
    """Every direction of role switch while hybrid sequences are served: the state pools go and come with the
    LM roles (driver and worker), nothing leaks, and the tokens stay the runtime's."""
    from collections import Counter

    from epd.lifetime import LifetimeEvent as Ev
    from tests.test_allocation import ALL_DIRECTIONS, DEP, _serve_until_switched, base_id, controller

    model = dataclasses.replace(tiny(), seed=4)
    reqs = [dataclasses.replace(r, request_id=f"{k}-{r.request_id}") for k in range(6) for r in _requests(6)]
    expected = dict(zip([r.request_id for r in reqs], reference(reqs, model)))
    with OfflineLLM(model, DEP, "ray", allocation=controller("scripted", script=ALL_DIRECTIONS)) as llm:
        _, sent = _serve_until_switched(llm, reqs, len(ALL_DIRECTIONS), keep_active=8)
        llm.core.drain_check()  # every block and state slot free, every worker forgot every sequence
        events = list(llm.core.pipeline.events)
        outputs = dict(llm.core.pipeline.outputs)
    assert {rid: o.token_ids for rid, o in outputs.items()} == {rid: expected[base_id(rid)] for rid in sent}
    assert Counter(e.request_id for e in events if e.kind == Ev.FINISHED) == Counter(sent)
    assert len([e for e in events if e.kind == Ev.ROLE_SWITCH_END]) == len(ALL_DIRECTIONS)
