"""Block managers, workloads, routing, tiling: small pieces with exact answers."""

import numpy as np
import pytest

from epd.config import DeploymentConfig, PoolConfig, WorkloadConfig
from epd.models.image_processing import num_tiles, tile_grid
from epd.stages.blocks import KVBlockManager
from epd.workload import arrival_times, build_workload


def test_block_pool_accounting():
    kv = KVBlockManager("p0", 4, 16)
    assert kv.blocks_for(1) == 1 and kv.blocks_for(16) == 1 and kv.blocks_for(17) == 2
    a = kv.allocate(3)
    assert kv.allocate(2) is None and kv.num_free == 1
    kv.free(a)
    with pytest.raises(RuntimeError, match="freed twice"):
        kv.free(a[:1])
    kv.assert_all_free()
    b = kv.allocate(1)
    with pytest.raises(AssertionError, match="still held"):
        kv.assert_all_free()
    kv.free(b)


def test_arrivals_are_seeded_and_have_the_right_rate():
    cfg = WorkloadConfig(rate=4.0, num_requests=4000)
    a = arrival_times(cfg, 4000, np.random.default_rng(1))
    assert a == arrival_times(cfg, 4000, np.random.default_rng(1))
    assert 4000 / a[-1] == pytest.approx(4.0, rel=0.05)
    g = np.diff(arrival_times(WorkloadConfig(arrival="gamma", rate=2.0, cv=3.0), 4000, np.random.default_rng(2)))
    assert g.mean() == pytest.approx(0.5, rel=0.1) and g.std() / g.mean() == pytest.approx(3.0, rel=0.15)
    assert arrival_times(WorkloadConfig(arrival="constant", rate=2.0), 3, np.random.default_rng(0)) == [0.0, 0.5, 1.0]


def test_trace_and_errors(tmp_path):
    (tmp_path / "t.txt").write_text("5.0\n5.5\n7.0\n")
    assert arrival_times(WorkloadConfig(arrival="trace", trace_path=str(tmp_path / "t.txt")), 3, None) == [0.0, 0.5, 2.0]
    with pytest.raises(ValueError, match="rate"):
        arrival_times(WorkloadConfig(rate=0), 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown workload.arrival"):
        arrival_times(WorkloadConfig(arrival="burst"), 3, np.random.default_rng(0))


def test_synthetic_workload_shapes():
    cfg = WorkloadConfig(num_requests=50, images_per_request=2, images_per_request_max=8, prompt_tokens=22, output_tokens=10)
    reqs = build_workload(cfg, vocab_size=512, reserved_ids={3})
    assert len(reqs) == 50 and reqs == build_workload(cfg, 512, {3})
    counts = [len(r.images) for r in reqs]
    assert min(counts) >= 2 and max(counts) <= 8 and len(set(counts)) > 3
    assert all(len(r.prompt_token_ids) == 22 and 3 not in r.prompt_token_ids for r in reqs)
    assert all(r.sampling.max_tokens == 10 and r.sampling.ignore_eos for r in reqs)


def test_dataset_workload_reads_the_shipped_sample():
    reqs = build_workload(WorkloadConfig(kind="dataset", dataset_path="data/sample/requests.jsonl", num_requests=6), 512, set())
    assert reqs[1].prompt.startswith("Compare") and len(reqs[1].images) == 2
    assert reqs[4].prompt == reqs[0].prompt  # cycles through the rows


def test_internvl_tiling_follows_aspect_ratio():
    assert tile_grid(4032, 3024, 12, 448) == (4, 3)
    assert num_tiles(4032, 3024, 12, 448, True) == 13
    assert num_tiles(448, 448, 12, 448, True) == 1
    assert tile_grid(1000, 200, 6, 448) == (5, 1)


def test_deployment_description_and_validation():
    epd = DeploymentConfig(encode=PoolConfig(instances=2), prefill=PoolConfig(), decode=PoolConfig())
    assert epd.describe() == "2E1P1D"
    assert DeploymentConfig(encode_prefill=PoolConfig(instances=3), decode=PoolConfig()).describe() == "3EP1D"
    assert DeploymentConfig(aggregated=PoolConfig(instances=4)).describe() == "4EPD"
    with pytest.raises(ValueError, match="role 'decode'"):
        DeploymentConfig(encode=PoolConfig(), prefill=PoolConfig()).validate()
    with pytest.raises(ValueError, match="irp"):
        DeploymentConfig(encode_prefill=PoolConfig(), decode=PoolConfig(), irp=True).validate()


def test_phased_workload_follows_in_time():
    cfg = WorkloadConfig(rate=4.0, phases=[{"num_requests": 5, "images_per_request": 3}, {"num_requests": 7, "images_per_request": 0}])
    reqs = build_workload(cfg, 512, {3})
    assert [r.request_id[:2] for r in reqs] == ["p0"] * 5 + ["p1"] * 7
    assert all(len(r.images) == 3 for r in reqs[:5]) and not any(r.images for r in reqs[5:])
    assert max(r.arrival_time for r in reqs[:5]) < min(r.arrival_time for r in reqs[5:])
    with pytest.raises(ValueError, match=r"phases\[0\]: unknown fields \['imgs'\]"):
        build_workload(WorkloadConfig(phases=[{"imgs": 2}]), 512, {3})


def test_goodput_interpolates_between_rates():
    from epd.metrics import goodput

    assert goodput([(1, 1.0), (2, 0.95), (4, 0.5)], 0.9) == pytest.approx(2 + 2 * (0.05 / 0.45))
    assert goodput([(1, 0.5)], 0.9) is None
    assert goodput([(1, 1.0), (2, 0.99)], 0.9) == 2


def test_without_an_address_the_engine_starts_its_own_ray_cluster(monkeypatch):
    """Asked for no address, Ray joins whatever cluster it finds on the host (a `ray start`, a test's
    multi-node cluster in another process); the engine asks for a local one, or for the address it is given."""
    import ray

    from epd.config import BackendConfig
    from epd.engine.executor import ensure_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    dep = DeploymentConfig()
    assert ensure_ray(BackendConfig(), [dep])
    assert calls[-1]["address"] == "local" and calls[-1]["num_cpus"] >= 1
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    ensure_ray(BackendConfig(), [dep])
    assert calls[-1]["address"] == "10.0.0.1:6379" and "num_cpus" not in calls[-1]
    ensure_ray(BackendConfig(address="auto"), [dep])
    assert calls[-1]["address"] == "auto"


def test_the_drivers_turnaround_comes_from_batches_sent_in_answer_to_the_one_before():
    """`return`: a batch's end to the driver sending the next one; `send`: that to the worker starting it;
    only where the next was sent in answer (soon after the end, the worker idle) and is no encode batch."""
    from epd.run_result import BatchRecord, batch_stats, turnaround

    ms = 1e-3
    records = [
        BatchRecord("a", "EncodeBatch", 0.0, 0.010, 0.020),
        BatchRecord("a", "PrefillBatch", 0.020 + 4 * ms, 0.020 + 6 * ms, 0.050),  # answered: return 4, send 2
        BatchRecord("a", "DecodeBatch", 0.050 + 2 * ms, 0.050 + 3 * ms, 0.060),  # answered: return 2, send 1
        BatchRecord("a", "DecodeBatch", 0.055, 0.060, 0.070),  # queued while the one before ran: not counted
        BatchRecord("a", "EncodeBatch", 0.071, 0.300, 0.310),  # an encode batch: its begin waits on host work
        BatchRecord("a", "PrefillBatch", 0.900, 0.901, 0.950),  # sent long after: a new arrival, not an answer
        BatchRecord("b", "DecodeBatch", 0.0, 0.0, 0.010),
        BatchRecord("b", "DecodeBatch", 0.010 + 6 * ms, 0.010 + 9 * ms, 0.020),  # another instance: return 6, send 3
    ]
    got = turnaround(records)
    assert got["driver_turnarounds"] == 3
    assert got["driver_return_p50_ms"] == pytest.approx(4.0) and got["driver_send_p50_ms"] == pytest.approx(2.0)
    assert batch_stats(records)["driver_turnarounds"] == 3
    assert turnaround(records[:1]) == {}
