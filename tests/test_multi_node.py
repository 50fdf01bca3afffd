"""Several Ray nodes made on this machine (ray.cluster_utils.Cluster, in a process of its own so the
suite's cluster is left alone): workers spread over three nodes, process-group and then object-store
transfers between them, one node removed mid-run — every request finishes with a fault-free run's tokens, the lost instances
are replaced on the surviving nodes, every block is free at the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_transfers_between_nodes_and_a_node_removed_mid_run(tmp_path):
    """On the same three nodes, in turn: `deployment.transfer=nccl` (gloo on CPU), prefill pushing KV and encode
    pushing embeddings to workers on other nodes through process groups hosted by the driver; then object-store
    transfers with one node removed mid-run, its instances replaced on the others. No request lost either time."""
    out = tmp_path / "multi_node.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, str(ROOT / "bench" / "multi_node.py"), "--out", str(out), "--transfer", "nccl,object_store"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(out.read_text())
    kept, r = runs["nccl"], runs["object_store"]
    assert len(set(kept["placement"].values())) == 3 and not kept["instances_on_it"] and kept["removed_node"] is None
    assert kept["lost"] == 0 and not kept["aborted"] and kept["finished_as_fault_free"] == kept["requests"] and kept["drained"]
    assert len(set(r["placement"].values())) == 3 and "head" not in r["placement"].values()  # spread over the worker nodes
    assert r["instances_on_it"] and r["lost_instances"] == r["instances_on_it"]
    assert r["lost"] == 0 and not r["aborted"] and r["finished_as_fault_free"] == r["requests"]
    assert r["replaced_instances"] == r["instances_on_it"]
    assert r["removed_node"] not in r["placement_after"].values() and set(r["placement_after"]) == set(r["placement"])
    assert r["drained"]
