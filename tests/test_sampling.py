"""The sampler's logits processing against transformers' logits processors, through the engine, and
the request checks that keep one bad request from harming another."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForImageTextToText, LogitsProcessor, LogitsProcessorList

from epd.config import DeploymentConfig, ModelConfig, PoolConfig
from epd.models.sampling import sample, sample_full
from epd.request import INTERNAL, INVALID, ImageInput, Request, SamplingParams
from epd.serve.offline import OfflineLLM
from tests.helpers import save_hf_checkpoint

EPD = DeploymentConfig(encode=PoolConfig(), prefill=PoolConfig(kv_blocks=128), decode=PoolConfig(kv_blocks=128, max_decode_seqs=8))
PD = DeploymentConfig(name="pd", encode_prefill=PoolConfig(kv_blocks=128), decode=PoolConfig(kv_blocks=128))
AGG = DeploymentConfig(name="aggregated", aggregated=PoolConfig(kv_blocks=128))


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties over the generated tokens, as a transformers processor."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        out = input_ids[:, self.prompt_len :]
        counts = torch.zeros_like(scores).scatter_add_(1, out, torch.ones_like(out, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    path = save_hf_checkpoint("llava", tmp_path_factory.mktemp("llava"))
    return path, AutoModelForImageTextToText.from_pretrained(path).eval()


CASES = {
    "repetition": SamplingParams(max_tokens=24, repetition_penalty=1.7, ignore_eos=True),
    "repetition_below_1": SamplingParams(max_tokens=24, repetition_penalty=0.6, ignore_eos=True),
    "presence_frequency": SamplingParams(max_tokens=24, presence_penalty=1.5, frequency_penalty=0.9, ignore_eos=True),
    "negative_penalties": SamplingParams(max_tokens=24, presence_penalty=-0.5, frequency_penalty=-1.2, ignore_eos=True),
    "logit_bias": SamplingParams(max_tokens=24, logit_bias=((7, 4.0), (11, 3.5), (100, -100.0)), ignore_eos=True),
    "everything": SamplingParams(
        max_tokens=24, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.3, logit_bias=((9, 2.5),), ignore_eos=True
    ),
}


def _hf_generate(hf, prompt, sp: SamplingParams, pixels=None, eos=None, **kw):
    procs = LogitsProcessorList()
    if sp.presence_penalty or sp.frequency_penalty:
        procs.append(OpenAIPenalties(len(prompt), sp.presence_penalty, sp.frequency_penalty))
    extra = {"pixel_values": pixels} if pixels is not None else {}
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor([prompt]),
            max_new_tokens=sp.max_tokens,
            do_sample=False,
            repetition_penalty=sp.repetition_penalty,
            sequence_bias={(t,): b for t, b in sp.logit_bias} or None,
            logits_processor=procs,
            eos_token_id=eos,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
            **extra,
            **kw,
        )
    return out.sequences[0, len(prompt) :].tolist(), out.logits


@pytest.mark.parametrize("deployment", [EPD, PD, AGG], ids=["epd", "pd", "aggregated"])
def test_penalties_and_bias_equal_transformers_processors(tiny_llava, deployment):
    path, hf = tiny_llava
    model = ModelConfig(load_format="hf", path=str(path))
    from epd.models.runtime import load_family

    fam = load_family(model)
    text = [40, 41, 42, 40, 41, 43, 44]
    reqs, refs = [], []
    for i, (name, sp) in enumerate(CASES.items()):
        images = (ImageInput(width=64 + 9 * i, height=48, seed=i),) if i % 2 else ()
        reqs.append(Request(name, prompt_token_ids=tuple(text), images=images, sampling=sp))
        prompt = fam.build_prompt(text, [(64 + 9 * i, 48)] if images else [])
        pixels = None
        if images:
            from epd.images import load_image

            pixels = fam.preprocess(load_image(images[0])).float() / 255.0
            mean = torch.tensor(fam.pixel_mean)[:, None, None]
            std = torch.tensor(fam.pixel_std)[:, None, None]
            pixels = (pixels - mean) / std
        refs.append(_hf_generate(hf, prompt, sp, pixels)[0])
    with OfflineLLM(model, deployment, "local") as llm:
        outs = llm.generate(reqs)
        llm.core.drain_check()
    plain = _hf_generate(hf, fam.build_prompt(text, []), SamplingParams(max_tokens=24))[0]
    for name, out, ref in zip(CASES, outs, refs):
        assert out.token_ids == ref, name
    assert outs[0].token_ids != plain  # the penalty changed the output


def test_min_tokens_and_logprobs_equal_transformers(tiny_llava):
    path, hf = tiny_llava
    model = ModelConfig(load_format="hf", path=str(path))
    text = [50, 51, 52]
    prompt = [1, *text]
    # The EOS the plain greedy run emits first: min_tokens must hold it back.
    first = _hf_generate(hf, prompt, SamplingParams(max_tokens=6))[0]
    eos = first[2]
    sp = SamplingParams(max_tokens=10, min_tokens=5, stop_token_ids=(eos,), logprobs=3)
    ref, logits = _hf_generate(hf, prompt, sp, eos=eos, min_new_tokens=5)
    with OfflineLLM(model, EPD, "local") as llm:
        plain, held = llm.generate(
            [
                Request("plain", prompt_token_ids=tuple(text), sampling=SamplingParams(max_tokens=10, stop_token_ids=(eos,))),
                Request("held", prompt_token_ids=tuple(text), sampling=sp),
            ]
        )
    assert plain.token_ids == first[:3] and plain.finish_reason == "stop"
    assert held.token_ids == ref and len(held.token_ids) >= 5
    assert len(held.logprobs) == len(held.token_ids)
    for lp, step_logits, tok in zip(held.logprobs, logits, held.token_ids):
        raw = torch.log_softmax(step_logits[0].float(), -1)
        assert lp.token_id == tok and abs(lp.logprob - raw[tok].item()) < 1e-4
        top = raw.topk(3)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert max(abs(v - w) for (_, v), w in zip(lp.top, top.values.tolist())) < 1e-4
    assert plain.logprobs is None


def test_sampling_with_penalties_is_seeded_and_batch_independent():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(temperature=0.9, top_k=12, top_p=0.8, seed=5, presence_penalty=1.0, repetition_penalty=1.2)
    hist = dict(prompts=[[1, 2, 3]] * 3, outputs=[[4, 4, 5]] * 3, eos_token_id=2)
    batched = sample(logits, [p] * 3, [3] * 3, **hist)
    alone = [sample(logits[i : i + 1], [p], [3], prompts=[[1, 2, 3]], outputs=[[4, 4, 5]], eos_token_id=2)[0] for i in range(3)]
    assert batched == alone
    with pytest.raises(ValueError, match="penalties need"):
        sample(logits, [p], [0])


def test_top_p_applies_to_the_renormalised_top_k():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    # top_k=2 keeps {0.4, 0.3} -> renormalised 0.571, 0.429; top_p=0.5 then keeps the first alone
    p = SamplingParams(temperature=1.0, top_k=2, top_p=0.5, seed=3)
    assert {sample(logits, [p], [s])[0] for s in range(200)} == {0}


def test_tiny_temperatures_are_greedy_and_logprobs_only_when_asked():
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(2))
    out = sample_full(logits, [SamplingParams(temperature=5e-324, logprobs=0), SamplingParams(temperature=1e-6)], [0, 0])
    assert out.tokens == logits.argmax(-1).tolist()
    assert out.logprobs[0].top == () and out.logprobs[1] is None


BAD = [
    (dict(seed=2**63), "seed"),
    (dict(seed=-(2**63) - 1), "seed"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=1.5), "top_k"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=True), "max_tokens"),
    (dict(min_tokens=20, max_tokens=10), "min_tokens"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3.0), "frequency_penalty"),
    (dict(logit_bias=((10**9, 1.0),)), "logit_bias"),
    (dict(logit_bias=((5, 101.0),)), "logit_bias"),
    (dict(logit_bias=((5, 1.0), (5, 2.0))), "twice"),
    (dict(stop_token_ids=(-1,)), "stop_token_ids"),
    (dict(stop_token_ids=(10**12,)), "stop_token_ids"),
    (dict(logprobs=21), "logprobs"),
]


def test_every_bad_field_is_refused_alone_and_huge_top_k_means_off():
    """Requests that pass admission run; those that cannot are aborted with a reason naming the field,
    and the requests batched with them are served as if alone."""
    good = [
        Request(f"ok{i}", prompt_token_ids=(20 + i, 21), sampling=SamplingParams(max_tokens=6, ignore_eos=True, seed=2**63 - 1 - i))
        for i in range(3)
    ]
    huge_k = Request("huge_k", prompt_token_ids=(30, 31), sampling=SamplingParams(max_tokens=6, temperature=1.0, top_k=10**30, seed=4))
    no_k = Request("no_k", prompt_token_ids=(30, 31), sampling=SamplingParams(max_tokens=6, temperature=1.0, top_k=0, seed=4))
    bad = [Request(f"bad{i}", prompt_token_ids=(5, 6), sampling=SamplingParams(**kw)) for i, (kw, _) in enumerate(BAD)]
    weird = [
        Request("str_tokens", prompt_token_ids=("a", "b")),
        Request("bad_image", prompt_token_ids=(5,), images=("not an image",)),
        Request("nan_arrival", arrival_time=float("nan"), prompt_token_ids=(5,)),
        Request("no_images", prompt_token_ids=(5,), images=None),
        Request("giant_image", prompt_token_ids=(5,), images=(ImageInput(width=100_000, height=100_000),)),
        # passes admission, fails on the E worker (numpy refuses negative seeds): aborted alone
        Request("bad_image_seed", prompt_token_ids=(5,), images=(ImageInput(width=50, height=40, seed=-5), ImageInput(width=9, height=9))),
    ]
    with OfflineLLM(ModelConfig(), EPD, "local") as llm:
        alone = {r.request_id: o.token_ids for r in good for o in llm.generate([r])}
        outs = {o.request_id: o for o in llm.generate(bad[:10] + good + [huge_k, no_k] + bad[10:] + weird)}
        llm.core.drain_check()
    for i, (_, field) in enumerate(BAD):
        o = outs[f"bad{i}"]
        assert o.finish_reason == "abort" and field in o.abort_reason and o.error_kind == INVALID, (field, o.abort_reason)
    for name in ("str_tokens", "bad_image", "nan_arrival", "no_images", "giant_image", "bad_image_seed"):
        assert outs[name].finish_reason == "abort" and outs[name].error_kind == INVALID, (name, outs[name])
    assert "exceeds the limit" in outs["giant_image"].abort_reason and "could not be prepared" in outs["bad_image_seed"].abort_reason
    for r in good:
        assert outs[r.request_id].token_ids == alone[r.request_id]
    assert outs["huge_k"].token_ids == outs["no_k"].token_ids and len(outs["huge_k"].token_ids) == 6


def test_a_failure_inside_a_batch_aborts_only_its_request(monkeypatch):
    """A worker error that belongs to one request (here: the sampler raising for seed 666, at prefill
    and at decode) aborts that request alone; the others in its batches finish as if alone."""
    import epd.engine.worker as worker

    real = {name: getattr(worker, name) for name in ("sample_full", "sample_ids")}  # host-synced and device-fed decode paths

    def poisoned(name):
        def flaky(logits, params, steps, *args, **kw):
            for p, s in zip(params, steps):
                if p.seed == 666 and s == 0 or p.seed == 667 and s == 3:
                    raise RuntimeError(f"poisoned row at step {s}")
            return real[name](logits, params, steps, *args, **kw)

        return flaky

    reqs = [
        Request(f"r{i}", prompt_token_ids=(10 + i, 11), sampling=SamplingParams(max_tokens=8, ignore_eos=True, seed=i)) for i in range(4)
    ]
    poison = [
        Request("at_prefill", prompt_token_ids=(12, 13), sampling=SamplingParams(max_tokens=8, ignore_eos=True, seed=666)),
        Request("at_decode", prompt_token_ids=(14, 15), sampling=SamplingParams(max_tokens=8, ignore_eos=True, seed=667)),
    ]
    for dep in (EPD, AGG):
        with OfflineLLM(ModelConfig(), dep, "local") as llm:
            clean = {o.request_id: o.token_ids for o in llm.generate(reqs)}
            for name in real:
                monkeypatch.setattr(worker, name, poisoned(name))
            outs = {o.request_id: o for o in llm.generate(reqs[:2] + poison + reqs[2:])}
            for name, fn in real.items():
                monkeypatch.setattr(worker, name, fn)
            llm.core.drain_check()
        for r in reqs:
            assert outs[r.request_id].token_ids == clean[r.request_id], dep.name
        for name, step in (("at_prefill", 0), ("at_decode", 3)):
            o = outs[name]
            assert o.finish_reason == "abort" and o.error_kind == INTERNAL and f"poisoned row at step {step}" in o.abort_reason
        assert len(outs["at_decode"].token_ids) == 3


def test_offline_ids_refused_before_anything_runs_and_forgotten_after():
    r = lambda rid, t=5: Request(rid, prompt_token_ids=(t, 6), sampling=SamplingParams(max_tokens=3, ignore_eos=True))  # noqa: E731
    with OfflineLLM(ModelConfig(), EPD, "local") as llm:
        with pytest.raises(ValueError, match="duplicate request ids: \\['a'\\]"):
            llm.generate([r("a"), r("b"), r("a")])
        assert not llm.core.pipeline.states and not llm.core.has_work()
        with pytest.raises(ValueError, match="non-empty string id"):
            llm.generate([r("c"), r("")])
        assert not llm.core.pipeline.states and not llm.core.has_work()
        first = llm.generate([r("a"), r("b")])
        again = llm.generate([r("a", 7)])  # a finished id may come back
        assert [o.finish_reason for o in first + again] == ["length"] * 3 and again[0].request_id == "a"
        assert not llm.core.pipeline.states and not llm.core.pipeline.outputs
        llm.core.drain_check()


def test_in_process_executor_validates_the_copies_it_makes():
    dep = dataclasses.replace(EPD, prefill=PoolConfig(kv_blocks=64, kv_block_size=16), decode=PoolConfig(kv_blocks=64, kv_block_size=8))
    dep.validate()  # fine for the object store, which moves rows
    with pytest.raises(ValueError, match="backend=local.*kv_block_size"):
        OfflineLLM(ModelConfig(), dep, "local")
    dep = dataclasses.replace(EPD, encode=PoolConfig(mm_block_tokens=32), prefill=PoolConfig(kv_blocks=64, mm_block_tokens=16))
    with pytest.raises(ValueError, match="backend=local.*mm_block_tokens"):
        OfflineLLM(ModelConfig(), dep, "local")
