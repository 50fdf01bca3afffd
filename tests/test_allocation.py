"""Load estimation, allocation policies and role switching: engine (real Ray workers) and simulator."""

import dataclasses
import functools
import time
from collections import Counter
from pathlib import Path

import pytest

from epd.allocation.controller import AllocationController
from epd.allocation.policies import POLICIES
from epd.config import AllocationConfig, DeploymentConfig, PoolConfig, RunConfig, WorkloadConfig
from epd.lifetime import LifetimeEvent as Ev
from epd.metrics import summarize
from epd.serve.offline import OfflineLLM
from tests.helpers import MODEL, reference, workload

PROFILE = Path(__file__).resolve().parent.parent / "simulator" / "profiles" / "cpu-tiny-llava.json"

DEP = DeploymentConfig(
    name="epd",
    encode=PoolConfig(instances=2, mm_blocks=64),
    prefill=PoolConfig(instances=2, kv_blocks=64),
    decode=PoolConfig(instances=2, kv_blocks=64, max_decode_seqs=3),
)
# Every direction once, back to back while the requests are being served:
# 2E2P2D -> 1E3P2D -> 1E2P3D -> 2E2P2D -> 1E2P3D -> 1E3P2D -> 2E2P2D
ALL_DIRECTIONS = [
    "0:encode-1:prefill",  # E -> P
    "0:prefill-1:decode",  # P -> D
    "0:decode-1:encode",  # D -> E
    "0:encode-0:decode",  # E -> D
    "0:decode-0:prefill",  # D -> P
    "0:prefill-0:encode",  # P -> E
]


def controller(policy: str, **kw) -> AllocationController:
    cfg = AllocationConfig(policy=policy, interval_s=0.01, cooldown_s=0.0, **kw)
    return AllocationController(POLICIES.get(policy)(cfg), cfg.interval_s, cfg.cooldown_s)


@pytest.fixture(scope="module")
def requests():
    longer = [
        dataclasses.replace(
            r, request_id=f"{k}-{r.request_id}", sampling=dataclasses.replace(r.sampling, max_tokens=r.sampling.max_tokens + 30)
        )
        for k in range(10)
        for r in workload(7)
    ]
    reqs = workload(7) + longer
    return reqs, dict(zip([r.request_id for r in reqs], reference(reqs)))


def _serve_until_switched(llm, reqs, switches: int, keep_active: int = 12):
    """Feed requests so the engine stays loaded until `switches` role switches have ended, then drain.
    A workload that runs out first is sent again under new ids ("<round>~<id>": `base_id` gives the
    request it repeats), so a slow machine's switches still end under load.
    Returns how many requests were active at each switch's end, and the ids sent."""
    core, pending, active_at, sent, again = llm.core, list(reqs), [], [], 0
    deadline = time.time() + 300
    while True:
        ends = [e for e in core.pipeline.events.system() if e.kind == Ev.ROLE_SWITCH_END]
        active_at += [core.pipeline.num_active] * (len(ends) - len(active_at))
        if len(ends) >= switches:
            break
        if not pending:
            again += 1
            assert time.time() < deadline, f"{len(ends)} of {switches} switches in 300 s"
            pending = [dataclasses.replace(r, request_id=f"{again}~{r.request_id}") for r in reqs]
        while pending and core.in_flight < keep_active:
            sent.append(pending[0].request_id)
            core.add_request(pending.pop(0))
        core.step()
    if not again:  # the whole workload, once
        for r in pending:
            sent.append(r.request_id)
            core.add_request(r)
    core.run_until_idle()
    return active_at, sent


def base_id(rid: str) -> str:
    return rid.split("~", 1)[-1]


def test_switching_every_direction_under_load(ray_cluster, requests):
    reqs, expected = requests
    ctl = controller("scripted", script=ALL_DIRECTIONS)
    with OfflineLLM(MODEL, DEP, "ray", allocation=ctl) as llm:
        active_at_switch, sent = _serve_until_switched(llm, reqs, len(ALL_DIRECTIONS))
        llm.core.drain_check()  # every block free, every worker forgot every sequence
        events = list(llm.core.pipeline.events)
        outputs = dict(llm.core.pipeline.outputs)
        layout = llm.core.pipeline.layout()
    assert {rid: o.token_ids for rid, o in outputs.items()} == {rid: expected[base_id(rid)] for rid in sent}  # the static run's
    finished = Counter(e.request_id for e in events if e.kind == Ev.FINISHED)
    assert finished == Counter(sent) and set(map(base_id, sent)) == set(expected)  # every request exactly once
    assert not [e for e in events if e.kind == Ev.ABORTED]
    ends = [e for e in events if e.kind == Ev.ROLE_SWITCH_END]
    moves = [(e.data["from_pool"][0], e.data["to_pool"][0]) for e in ends]
    assert moves == [("e", "p"), ("p", "d"), ("d", "e"), ("e", "d"), ("d", "p"), ("p", "e")]
    assert all(e.data["duration"] >= e.data["reload"] > 0 for e in ends)
    assert layout == "2E2P2D"
    assert all(n > 0 for n in active_at_switch), active_at_switch  # every switch ended while serving
    s = summarize(events, 10.0, 10.0, "x")
    assert s["role_switches"] == 6 and s["num_finished"] == len(sent)


def test_switch_keeps_weights_in_host_memory(requests):
    """E -> P builds the LM; back to E and to P again, each part comes back from host memory."""
    reqs, expected = requests
    ctl = controller("scripted", script=["0:encode-1:prefill", "0:encode-1:encode", "0:encode-1:prefill"])
    with OfflineLLM(MODEL, DEP, "local", allocation=ctl) as llm:
        _, sent = _serve_until_switched(llm, reqs, 3)
        llm.core.drain_check()
        ends = [e for e in llm.core.pipeline.events if e.kind == Ev.ROLE_SWITCH_END]
        outputs = dict(llm.core.pipeline.outputs)
    assert {rid: o.token_ids for rid, o in outputs.items()} == {rid: expected[base_id(rid)] for rid in sent}
    assert [e.data["weights"] for e in ends] == [{"lm": "built"}, {"vision": "host copy"}, {"lm": "host copy"}]


@pytest.mark.parametrize(
    "script,msg",
    [
        (["0:encode-9:prefill"], "no instance 'encode-9'"),
        (["0:encode-0:prefill", "0:encode-1:decode"], "would leave no encode worker"),
        (["0:encode-0:encode"], "already in encode"),
    ],
)
def test_refused_moves_are_reported(script, msg, requests):
    reqs, _ = requests
    dep = dataclasses.replace(DEP, encode=PoolConfig(instances=1 if "leave" in msg else 2, mm_blocks=64))
    ctl = controller("scripted", script=script)
    with OfflineLLM(MODEL, dep, "local", allocation=ctl) as llm:
        llm.generate(reqs[:4])
        llm.core.drain_check()
    assert any(msg in r for r in ctl.rejected), ctl.rejected


def _sim_cfg(policy: str, **kw) -> RunConfig:
    cfg = RunConfig()
    shifting = WorkloadConfig(
        name="shifting",
        arrival="poisson",
        rate=20.0,
        phases=[
            {"num_requests": 60, "images_per_request": 4, "output_tokens": 2},  # encode-heavy
            {"num_requests": 60, "images_per_request": 0, "output_tokens": 48},  # decode-heavy
        ],
    )
    return dataclasses.replace(
        cfg,
        backend=dataclasses.replace(cfg.backend, kind="sim", latency_model="profiled", profile_path=str(PROFILE)),
        deployment=dataclasses.replace(DEP, encode=PoolConfig(instances=3, mm_blocks=512), decode=PoolConfig(instances=1, kv_blocks=1024)),
        workload=shifting,
        allocation=AllocationConfig(policy=policy, interval_s=0.05, cooldown_s=0.2, switch_cost_s=0.3, **kw),
    )


def _sim(cfg: RunConfig):
    from epd.experiment import make_requests
    from simulator.backend import SimBackend

    reqs = make_requests(cfg)
    return reqs, SimBackend(cfg).run(reqs)


def test_simulator_switches_with_the_configured_cost():
    cfg = _sim_cfg("scripted", script=["0.5:encode-2:decode", "1:encode-1:prefill"])
    reqs, result = _sim(cfg)
    ends = [e for e in result.events if e.kind == Ev.ROLE_SWITCH_END]
    assert [e.data["reload"] for e in ends] == [pytest.approx(0.3)] * 2
    assert ends[-1].data["layout"] == "1E3P2D"
    assert len(result.outputs) == len(reqs) and all(o.finish_reason == "length" for o in result.outputs.values())
    assert result.stage_load and {r["stage"] for r in result.stage_load} == {"encode", "prefill", "decode"}


@pytest.mark.parametrize("policy", ["queue", "simulated"])
def test_dynamic_policies_follow_a_shifting_mix(policy):
    """Encode-heavy then decode-heavy: the policy gives decode more workers, and the run ends sooner."""
    static_reqs, static = _sim(_sim_cfg("static"))
    reqs, dynamic = _sim(_sim_cfg(policy, window=16))
    moves = [(e.data["from_pool"], e.data["to_pool"]) for e in dynamic.events if e.kind == Ev.ROLE_SWITCH_END]
    assert ("encode", "decode") in moves or ("encode", "prefill") in moves, moves
    s_static = summarize(static.events, 1.0, 0.1, "static")
    s_dyn = summarize(dynamic.events, 1.0, 0.1, policy)
    assert s_dyn["num_finished"] == s_static["num_finished"] == len(reqs)
    assert s_dyn["duration"] < s_static["duration"]


def test_load_estimator_rows_reach_the_record(tmp_path):
    from epd.tracking import write_record

    cfg = _sim_cfg("queue")
    _, result = _sim(cfg)
    write_record(tmp_path, {}, result, {"x": 1})
    lines = (tmp_path / "stage_load.jsonl").read_text().splitlines()
    assert len(lines) >= 3 and '"pressure"' in lines[0]


def test_simulated_policy_searches_off_the_engine_loop(requests):
    """In the engine the simulator search runs in a thread: the loop keeps serving meanwhile."""
    from epd.allocation.policies import SimulatedPolicy

    reqs, expected = requests
    run_cfg = _sim_cfg("simulated", window=16)
    run_cfg = dataclasses.replace(run_cfg, deployment=DEP, allocation=dataclasses.replace(run_cfg.allocation, interval_s=0.05))
    from simulator.backend import best_split

    policy = SimulatedPolicy(run_cfg.allocation, run_cfg, functools.partial(best_split, run_cfg))
    ctl = AllocationController(policy, 0.05, 0.0)
    steps_while_searching = 0
    with OfflineLLM(MODEL, DEP, "local", allocation=ctl) as llm:
        core, pending = llm.core, list(reqs)
        while pending or core.has_work():
            while pending and core.in_flight < 12:
                core.add_request(pending.pop(0))
            core.step()
            if policy._thread is not None and policy._thread.is_alive():
                steps_while_searching += 1
        if policy._thread is not None:
            policy._thread.join(timeout=60)
        while core.has_work() or any(i.busy for i in core.pipeline.instances.values()):
            core.step()
        core.drain_check()
        outputs = dict(core.pipeline.outputs)
    assert policy.searches >= 1 and policy.target is not None
    assert steps_while_searching > 0  # batches kept running while the search was under way
    assert {rid: o.token_ids for rid, o in outputs.items()} == expected


def test_what_a_switching_worker_sent_is_pulled_first(monkeypatch):
    """An E worker switching away waits until prefill has pulled what it sent; those requests move to
    the front of prefill's queue, so the drain is shorter than behind the whole queue (simulator:
    prefill is the bottleneck of an offline encode-heavy burst). Both drains include the batches the worker
    had out when the switch began, images preparing included, which pulling first cannot shorten."""
    from epd.stages.pipeline import Pipeline

    cfg = _sim_cfg("scripted", script=["0.2:encode-2:prefill"])
    dep = DeploymentConfig(
        name="epd",
        encode=PoolConfig(instances=3, mm_blocks=512),
        prefill=PoolConfig(instances=1, kv_blocks=1024, max_prefill_tokens=128),
        decode=PoolConfig(instances=1, kv_blocks=1024),
    )
    cfg = dataclasses.replace(cfg, deployment=dep, workload=dataclasses.replace(cfg.workload, arrival="offline"))

    def drain() -> float:
        reqs, result = _sim(cfg)
        assert len(result.outputs) == len(reqs)
        (end,) = [e for e in result.events if e.kind == Ev.ROLE_SWITCH_END]
        return end.data["duration"] - end.data["reload"]

    first = drain()
    monkeypatch.setattr(Pipeline, "_pull_first", lambda self, iid: None)
    assert first < 0.6 * drain()


def test_a_worker_joining_a_stage_takes_its_share_of_the_queued_work():
    """Decode-heavy requests queued at decode-0 before an encoder switched to decode are shared with it
    (from the back of the queue): the new decode worker serves some of them and the burst ends sooner."""
    dep = DeploymentConfig(
        name="epd",
        encode=PoolConfig(instances=2, mm_blocks=512),
        prefill=PoolConfig(instances=1, kv_blocks=4096),
        decode=PoolConfig(instances=1, kv_blocks=4096, max_decode_seqs=4),
    )
    burst = WorkloadConfig(name="burst", arrival="offline", num_requests=24, images_per_request=1, output_tokens=64)
    runs = {}
    for policy, script in (("static", []), ("scripted", ["0.4:encode-1:decode"])):
        cfg = dataclasses.replace(_sim_cfg(policy, script=script), deployment=dep, workload=burst)
        reqs, result = _sim(cfg)
        assert len(result.outputs) == len(reqs)
        routed_before = {e.request_id for e in result.events if e.kind == Ev.PREFILL_END and e.time < 0.4}
        runs[policy] = (summarize(result.events, 1.0, 0.1, policy), result.events, routed_before)
    _, events, before = runs["scripted"]
    moved = {e.request_id for e in events if e.kind == Ev.DECODE_BEGIN and e.instance == "encode-1"} & before
    assert moved  # queued at decode-0 before the switch, decoded by the worker that joined
    assert runs["scripted"][0]["duration"] < runs["static"][0]["duration"]
