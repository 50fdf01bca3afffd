"""Several Ray nodes on one machine (`ray.cluster_utils.Cluster`): a 2E2P2D engine (tiny LLaVA, CPU)
placed over three nodes, object-store transfers between them, and one node removed mid-run.

    HF_HUB_OFFLINE=1 python bench/multi_node.py --out multi_node.json [--nodes 3] [--cpus-per-node 4] \
        [--transfer nccl|object_store|nccl,object_store] [--keep-nodes]

With several transfers, an engine each runs in turn on the same nodes, and the node goes in the last run.

Reports where each worker ran, how the requests ended (finished with a fault-free run's tokens,
redone, aborted, lost: must be 0) and which instances were lost and replaced after the node went.
tests/test_multi_node.py runs it and checks those counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from helpers import MODEL, reference  # noqa: E402
from test_faults import TWO_OF_EACH, _requests  # noqa: E402

from epd.config import BackendConfig, EngineConfig  # noqa: E402
from epd.engine.core import EngineCore  # noqa: E402
from epd.lifetime import LifetimeEvent as Ev  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="multi_node.json")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--cpus-per-node", type=int, default=4)
    ap.add_argument(
        "--transfer",
        default="object_store",
        help="object_store, or nccl (gloo process groups on CPU); several, comma-separated: an engine each in turn on the same nodes",
    )
    ap.add_argument("--keep-nodes", action="store_true", help="remove no node: transfers between nodes only")
    a = ap.parse_args()
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the driver's node runs no worker
    nodes = [cluster.add_node(num_cpus=a.cpus_per_node) for _ in range(a.nodes)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    transfers = a.transfer.split(",")
    reports = []
    try:
        for k, transfer in enumerate(transfers):  # a node is removed (unless --keep-nodes) in the last run only
            remove = not a.keep_nodes and k == len(transfers) - 1
            reports.append(_run(cluster, nodes, transfer, remove, f"r{k}-"))
    finally:
        ray.shutdown()
        cluster.shutdown()
    report = reports[0] if len(reports) == 1 else {r["transfer"]: r for r in reports}
    Path(a.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def _run(cluster, nodes, transfer: str, remove: bool, prefix: str) -> dict:
    import ray

    reqs, later = _requests(prefix + "m", 12), _requests(prefix + "n", 6)
    expected = {r.request_id: list(t) for r, t in zip(reqs + later, reference(reqs + later))}
    deployment = dataclasses.replace(TWO_OF_EACH, transfer=transfer)
    core = EngineCore(EngineConfig(MODEL, deployment, "ray", BackendConfig(address=cluster.address, placement="SPREAD")))
    report: dict = {"nodes": len(nodes), "transfer": transfer}
    try:
        ids = {n.node_id: f"node{i}" for i, n in enumerate(nodes)}

        def node_of(iid: str) -> str:
            return ids.get(core.executor.call_one(iid, "probe", lambda w: ray.get_runtime_context().get_node_id()), "head")

        where = {iid: node_of(iid) for iid in core.pipeline.instances}
        report["placement"] = where
        for r in reqs:
            core.add_request(r)
        deadline = time.time() + 120
        while sum(1 for e in core.pipeline.events if e.kind == Ev.FIRST_TOKEN) < 3:
            assert time.time() < deadline, "no first tokens"
            core.step()
        victim = next(n for n in nodes if any(ids[n.node_id] == w for w in where.values()))
        gone = sorted(iid for iid, w in where.items() if w == ids[victim.node_id]) if remove else []
        if remove:
            cluster.remove_node(victim, allow_graceful=False)
        removed = time.time()
        core.run_until_idle(180)
        for r in later:
            core.add_request(r)
        core.run_until_idle(180)
        deadline = time.time() + 120  # replacements need room: the other nodes' spare cores
        while len([e for e in core.pipeline.events if e.kind == Ev.WORKER_REPLACED]) < len(gone) and time.time() < deadline:
            core.step()
        events = list(core.pipeline.events)
        outs = core.pipeline.outputs
        aborted = {rid: o.abort_reason for rid, o in outs.items() if o.finish_reason == "abort"}
        report.update(
            removed_node=ids[victim.node_id] if remove else None,
            instances_on_it=gone,
            requests=len(expected),
            ended=len(outs),
            lost=len(expected) - len(outs),
            finished_as_fault_free=sum(1 for rid, o in outs.items() if rid not in aborted and o.token_ids == expected[rid]),
            aborted=aborted,
            redone=sum(1 for e in events if e.kind == Ev.PREEMPTED and e.data.get("cause") == "worker_lost"),
            lost_instances=sorted(e.instance for e in events if e.kind == Ev.WORKER_LOST),
            replaced_instances=sorted(e.instance for e in events if e.kind == Ev.WORKER_REPLACED),
            seconds_to_replace={e.instance: e.data["took_s"] for e in events if e.kind == Ev.WORKER_REPLACED},
            seconds_from_removal_to_end=time.time() - removed,
        )
        report["placement_after"] = {iid: node_of(iid) for iid, inst in core.pipeline.instances.items() if not inst.failed}
        core.drain_check()
        report["drained"] = True
    finally:
        core.close()
    return report


if __name__ == "__main__":
    main()
