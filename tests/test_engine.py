"""The disaggregated engine on a real local Ray cluster, tiny model, CPU."""

import pytest

from epd.config import DeploymentConfig, PoolConfig
from epd.request import ImageInput, Request, SamplingParams
from epd.serve.offline import OfflineLLM
from tests.helpers import AGG, EPD, MODEL, PD, reference, run, workload


@pytest.fixture(scope="module")
def expected():
    reqs = workload()
    return dict(zip([r.request_id for r in reqs], reference(reqs)))


@pytest.mark.parametrize("deployment", [EPD, PD, AGG], ids=["epd", "pd", "aggregated"])
def test_deployments_match_single_process_runtime(ray_cluster, expected, deployment):
    outs, _, _ = run(deployment, workload())
    assert {k: v.token_ids for k, v in outs.items()} == expected
    assert all(o.finish_reason == "length" for o in outs.values())


def test_intra_request_parallelism_same_outputs(ray_cluster, expected):
    irp = DeploymentConfig(**{**EPD.__dict__, "irp": True, "encode": PoolConfig(instances=3, mm_blocks=64)})
    outs, _, events = run(irp, workload())
    assert {k: v.token_ids for k, v in outs.items()} == expected
    # a 3-image request is encoded on more than one instance
    enc = {e.instance for e in events if e.request_id == "r3" and e.kind.value == "encode_begin"}
    assert len(enc) >= 2


def test_least_loaded_routing_and_local_executor(expected):
    dep = DeploymentConfig(**{**EPD.__dict__, "routing": "least_loaded"})
    outs, _, _ = run(dep, workload(), executor="local")
    assert {k: v.token_ids for k, v in outs.items()} == expected


def test_workers_hold_only_their_parts(ray_cluster):
    _, info, _ = run(EPD, workload(2))
    by_role = {tuple(w["roles"]): w for w in info}
    enc = by_role[("encode",)]
    assert enc["lm_weight_bytes"] == 0 and enc["kv_cache_bytes"] == 0 and enc["vision_weight_bytes"] > 0
    dec = by_role[("decode",)]
    assert dec["vision_weight_bytes"] == 0 and dec["lm_weight_bytes"] > 0 and dec["kv_cache_bytes"] > 0


def test_events_follow_the_stage_order(ray_cluster):
    _, _, events = run(EPD, workload(3))
    for rid in ("r1", "r2"):
        kinds = [e.kind.value for e in sorted(events, key=lambda e: e.time) if e.request_id == rid]
        order = [
            "issued",
            "encode_begin",
            "encode_end",
            "mm_transfer_begin",
            "mm_transfer_end",
            "prefill_begin",
            "prefill_end",
            "first_token",
            "kv_transfer_begin",
            "kv_transfer_end",
            "decode_begin",
            "finished",
        ]
        firsts = [kinds.index(k) for k in order]
        assert firsts == sorted(firsts), kinds


def test_decode_never_deadlocks_when_kv_is_short(ray_cluster, expected):
    # Room for one or two sequences at a time (the largest needs 18 of the 20 blocks): the rest wait.
    tight = DeploymentConfig(
        name="epd", encode=PoolConfig(mm_blocks=64), prefill=PoolConfig(kv_blocks=64), decode=PoolConfig(kv_blocks=20, kv_block_size=4)
    )
    outs, _, _ = run(tight, workload())
    assert {k: v.token_ids for k, v in outs.items()} == expected


def test_bad_requests_are_aborted_and_the_rest_finish(ray_cluster, tmp_path):
    bad_file = tmp_path / "bad.png"
    bad_file.write_bytes(b"not an image")
    small = DeploymentConfig(
        name="epd",
        encode=PoolConfig(mm_blocks=4, mm_block_tokens=4),
        prefill=PoolConfig(kv_blocks=64, mm_blocks=6, mm_block_tokens=4),
        decode=PoolConfig(kv_blocks=64),
    )
    good = workload(2)
    reqs = good + [
        Request("unreadable", prompt_token_ids=(5, 6), images=(ImageInput(path=str(bad_file)),)),
        Request("missing", prompt_token_ids=(5, 6), images=(ImageInput(path=str(tmp_path / "nope.png")),)),
        Request("too-long", prompt_token_ids=tuple([7] * 5000)),
        Request("placeholders", prompt_token_ids=(5, MODEL.image_token_id, 6)),
        Request("bad-sampling", prompt_token_ids=(5,), sampling=SamplingParams(top_p=0)),
        Request("too-many-image-tokens", prompt_token_ids=(5,), images=tuple(ImageInput(width=64, height=64, seed=k) for k in range(2))),
    ]
    outs, _, _ = run(small, reqs)
    for rid in ("unreadable", "missing", "too-long", "placeholders", "bad-sampling"):
        assert outs[rid].finish_reason == "abort" and outs[rid].abort_reason, rid
    assert "MM blocks" in outs["too-many-image-tokens"].abort_reason
    assert "context" in outs["too-long"].abort_reason
    assert "placeholder" in outs["placeholders"].abort_reason
    assert "not found" in outs["missing"].abort_reason
    # one image (16 tokens) fits E's 4 blocks of 4 and P's 6 blocks; two images do not fit P
    assert outs["r0"].finish_reason == outs["r1"].finish_reason == "length"


def test_failure_inside_encoding_aborts_only_that_request(ray_cluster, tmp_path):
    """An image whose header reads but whose pixels do not: caught by the E worker, not at admission."""
    from PIL import Image

    path = tmp_path / "truncated.png"
    Image.new("RGB", (64, 64), (10, 20, 30)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    reqs = workload(2) + [Request("trunc", prompt_token_ids=(5, 6), images=(ImageInput(path=str(path)),))]
    outs, _, _ = run(EPD, reqs)
    assert outs["trunc"].finish_reason == "abort" and "unreadable" in outs["trunc"].abort_reason
    assert outs["r0"].finish_reason == outs["r1"].finish_reason == "length"


def test_images_resized_on_the_device_match_the_runtime_doing_the_same():
    """model.image_resize=device: E workers decode on the host and resize with torch on their device."""
    import dataclasses

    model = dataclasses.replace(MODEL, image_resize="device")
    reqs = workload()
    expected = dict(zip([r.request_id for r in reqs], reference(reqs, model)))
    with OfflineLLM(model, EPD, "local") as llm:
        outs = llm.generate(reqs)
        llm.core.drain_check()
    assert {o.request_id: o.token_ids for o in outs} == expected
    # decoding on the GPU needs CUDA: on the CPU it falls back to the host's decoder, same tokens
    with OfflineLLM(dataclasses.replace(model, image_decode="device"), EPD, "local") as llm:
        assert llm.core.executor.workers["encode-0"]._jpeg is None
        assert {o.request_id: o.token_ids for o in llm.generate(reqs)} == expected
    with pytest.raises(ValueError, match="image_resize must be host or device"):
        OfflineLLM(dataclasses.replace(MODEL, image_resize="gpu"), EPD, "local")
