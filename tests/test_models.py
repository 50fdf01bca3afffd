"""Our paged runtime against transformers on the same tiny random checkpoints."""

import pytest
import torch
from transformers import AutoModelForImageTextToText

from epd.config import ModelConfig
from epd.models.generate import generate, lm_step
from epd.models.runtime import ModelRuntime
from epd.models.weights import CheckpointError
from epd.request import SamplingParams
from tests.helpers import save_hf_checkpoint

LOGIT_ATOL = 2e-4  # fp32 on CPU; differences come from summation order only


@pytest.fixture(scope="module", params=["llava", "internvl"])
def checkpoint(request, tmp_path_factory):
    family = request.param
    path = save_hf_checkpoint(family, tmp_path_factory.mktemp(family))
    hf = AutoModelForImageTextToText.from_pretrained(path).eval()
    ours = ModelRuntime(ModelConfig(load_format="hf", path=str(path)), {"vision", "lm"})
    return family, hf, ours


def _pixels(ours: ModelRuntime, n_tiles: int, seed: int) -> torch.Tensor:
    side = ours.family.hf.vision_config.image_size
    side = side[0] if isinstance(side, list) else side
    return torch.randn(n_tiles, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _case(ours, images, text, seed):
    """images: tiles per image. Returns prompt ids and per-image pixel tensors."""
    pixels = [_pixels(ours, t, seed + i) for i, t in enumerate(images)]
    per_tile = ours.family.num_image_tokens(1, 1) if ours.family.model_type == "llava" else ours.family.tokens_per_tile()
    prompt = [ours.text_cfg.bos_token_id]
    for p in pixels:
        prompt += [ours.family.image_token_id] * (per_tile * p.shape[0])
    return prompt + text, pixels


def _hf_logits(hf, prompt, pixels):
    kw = {"pixel_values": torch.cat(pixels)} if pixels else {}
    with torch.no_grad():
        return hf(input_ids=torch.tensor([prompt]), **kw).logits[0, -1]


def test_vision_embeddings_match(checkpoint):
    _, hf, ours = checkpoint
    px = _pixels(ours, 3, seed=1)
    with torch.no_grad():
        ref = hf.model.get_image_features(pixel_values=px).pooler_output
    ref = torch.cat(list(ref)) if isinstance(ref, (list, tuple)) else ref.reshape(-1, ref.shape[-1])
    got = torch.cat(ours.encode([px[:1], px[1:]]))
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [1, 16, 5])
def test_prefill_logits_batched_and_paged(checkpoint, block_size):
    family, hf, ours = checkpoint
    tiles = (lambda n: n) if family == "internvl" else (lambda n: 1)
    cases = [
        _case(ours, [tiles(2), tiles(1)], [40, 41, 42], 10),
        _case(ours, [], [50, 51, 52, 53, 54, 55, 56], 20),
        _case(ours, [tiles(1)], [60] * 11, 30),
    ]
    prompts = [c[0] for c in cases]
    mm = [torch.cat(ours.encode(c[1])) if c[1] else None for c in cases]
    kv = ours.allocate_kv_cache(256, block_size)
    tables, nxt = [], 255
    for p in prompts:  # hand out blocks from the top down so no table is contiguous from 0
        n = -(-len(p) // block_size)
        tables.append(list(range(nxt, nxt - n, -1)))
        nxt -= n
    logits = lm_step(ours, kv, prompts, [0] * 3, tables, block_size, mm)
    for i, (prompt, pixels) in enumerate(cases):
        ref = _hf_logits(hf, prompt, pixels)
        assert (logits[i] - ref).abs().max().item() < LOGIT_ATOL


def test_greedy_generation_identical_for_32_tokens(checkpoint):
    family, hf, ours = checkpoint
    tiles = 2 if family == "internvl" else 1
    cases = [_case(ours, [tiles], [70, 71, 72], 40), _case(ours, [1, tiles], [80] * 9, 50), _case(ours, [], [90, 91], 60)]
    params = [SamplingParams(max_tokens=32, ignore_eos=True)] * 3
    ours_out = generate(ours, [c[0] for c in cases], [torch.cat(ours.encode(c[1])) if c[1] else None for c in cases], params, block_size=7)
    for (prompt, pixels), got in zip(cases, ours_out):
        kw = {"pixel_values": torch.cat(pixels)} if pixels else {}
        with torch.no_grad():
            ref = hf.generate(input_ids=torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False, **kw)
        assert got == ref[0, len(prompt) :].tolist()
        assert len(set(got)) > 1  # the model is not degenerate


def test_sampling_is_seeded_per_token():
    from epd.models.sampling import sample

    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=7)
    a = sample(logits, [p, p], [3, 3])
    assert a == [sample(logits[:1], [p], [3])[0], sample(logits[1:], [p], [3])[0]]  # batching changes nothing
    draws = {sample(logits[:1], [p], [step])[0] for step in range(20)}
    assert len(draws) > 1  # but each token index draws afresh
    assert sample(logits[:1], [SamplingParams()], [0])[0] == int(logits[0].argmax())


def test_vision_part_alone_holds_no_lm_weights(tmp_path):
    path = save_hf_checkpoint("llava", tmp_path / "ck")
    vision_only = ModelRuntime(ModelConfig(load_format="hf", path=str(path)), {"vision"})
    assert vision_only.lm is None
    sizes = vision_only.weight_bytes()
    assert sizes["vision"] > 0 and sizes["lm"] == 0
    lm_only = ModelRuntime(ModelConfig(load_format="hf", path=str(path)), {"lm"})
    assert lm_only.vision is None and lm_only.weight_bytes()["lm"] > 0


def test_missing_and_mismatched_checkpoints_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="not found|cannot read"):
        ModelRuntime(ModelConfig(load_format="hf", path=str(tmp_path / "nope")), {"lm"})
    path = save_hf_checkpoint("llava", tmp_path / "ck")
    import json

    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 300
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="mlp.*shape"):
        ModelRuntime(ModelConfig(load_format="hf", path=str(path)), {"lm"})


def test_dummy_weights_are_seeded_and_shared_between_parts():
    a = ModelRuntime(ModelConfig(seed=3), {"lm"})
    b = ModelRuntime(ModelConfig(seed=3), {"vision", "lm"})
    for (n, p), (_, q) in zip(a.lm.named_parameters(), b.lm.named_parameters()):
        assert torch.equal(p, q), n
    c = ModelRuntime(ModelConfig(seed=4), {"lm"})
    assert not torch.equal(a.lm.lm_head.weight, c.lm.lm_head.weight)


@pytest.mark.parametrize("lens", [[5, 9, 5, 1], [6, 6, 6], [11]])
def test_fast_path_pieces_match_the_reference_on_cpu(lens):
    """Fresh-prefill SDPA (grouped by length) and fused projections compute what the reference does."""
    from epd.kernels.attention import AttentionMetadata, paged_attention_ref, prefill_attention_sdpa

    g = torch.Generator().manual_seed(0)
    t = sum(lens)
    q, k, v = torch.randn(t, 4, 8, generator=g), torch.randn(t, 2, 8, generator=g), torch.randn(t, 2, 8, generator=g)
    tables, start = [], 0
    for n in lens:
        tables.append(list(range(start, start + n)))
        start += n
    meta = AttentionMetadata.build(tables, lens, lens, 1, torch.device("cpu"))
    ref = paged_attention_ref(q, k.reshape(t, 1, 2, 8), v.reshape(t, 1, 2, 8), meta, 0.35)
    for _ in range(2):  # the second call (the next layer) reuses the step's length groups
        torch.testing.assert_close(prefill_attention_sdpa(q, k, v, meta, 0.35), ref, atol=1e-5, rtol=1e-5)

    rt = ModelRuntime(ModelConfig(), {"lm"})
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    kv = rt.allocate_kv_cache(8, 4)
    before = lm_step(rt, kv, prompts, [0, 0], [[0, 1], [2]], 4)
    rt.lm.fuse()
    after = lm_step(rt, rt.allocate_kv_cache(8, 4), prompts, [0, 0], [[0, 1], [2]], 4)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_sampling_draws_from_the_filtered_distribution():
    from epd.models.sampling import sample

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    for top_p, top_k, expected in [(1.0, 0, [0.5, 0.3, 0.15, 0.05]), (0.7, 0, [0.625, 0.375, 0, 0]), (1.0, 3, [0.526, 0.316, 0.158, 0])]:
        p = SamplingParams(temperature=1.0, top_p=top_p, top_k=top_k, seed=11)
        counts = torch.zeros(4)
        for step in range(3000):
            counts[sample(logits, [p], [step])[0]] += 1
        assert (counts / 3000 - torch.tensor(expected)).abs().max() < 0.03, (top_p, top_k, counts / 3000)


@pytest.mark.parametrize("lengths", [[5, 5, 5], [3, 7, 3, 1, 7, 7], [9]])
def test_grouped_varlen_attention_equals_attention_per_sequence(lengths):
    """Packed sequences of equal length share one SDPA (contiguous or not); each attends only to itself."""
    import torch.nn.functional as F

    from epd.models.varlen_attention import grouped_varlen_attention

    g = torch.Generator().manual_seed(len(lengths))
    total, heads, d = sum(lengths), 4, 8
    q, k, v = (torch.randn(1, heads, total, d, generator=g) for _ in range(3))
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    got, _ = grouped_varlen_attention(None, q, k, v, scaling=0.3, cu_seq_lens_q=cu)
    want = torch.cat(
        [F.scaled_dot_product_attention(q[..., a:b, :], k[..., a:b, :], v[..., a:b, :], scale=0.3) for a, b in zip(cu[:-1], cu[1:])], dim=2
    )
    torch.testing.assert_close(got, want.transpose(1, 2), atol=1e-6, rtol=1e-6)
