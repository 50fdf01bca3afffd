"""Several Ray nodes made on this machine (ray.cluster_utils.Cluster, in a process of its own so the
suite's cluster is left alone): workers spread over three nodes, object-store transfers between them,
one node removed mid-run — every request finishes with a fault-free run's tokens, the lost instances
are replaced on the surviving nodes, every block is free at the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_node_removed_mid_run_loses_no_request(tmp_path):
    out = tmp_path / "multi_node.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, str(ROOT / "bench" / "multi_node.py"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert len(set(r["placement"].values())) == 3 and "head" not in r["placement"].values()  # spread over the worker nodes
    assert r["instances_on_it"] and r["lost_instances"] == r["instances_on_it"]
    assert r["lost"] == 0 and not r["aborted"] and r["finished_as_fault_free"] == r["requests"]
    assert r["replaced_instances"] == r["instances_on_it"]
    assert r["removed_node"] not in r["placement_after"].values() and set(r["placement_after"]) == set(r["placement"])
    assert r["drained"]


def test_process_group_transfers_between_nodes(tmp_path):
    """The same three nodes with `deployment.transfer=nccl` (gloo on CPU): prefill pushes KV and encode
    pushes embeddings to workers on other nodes through process groups hosted by the driver."""
    out = tmp_path / "multi_node.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, str(ROOT / "bench" / "multi_node.py"), "--out", str(out), "--transfer", "nccl", "--keep-nodes"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["transfer"] == "nccl" and len(set(r["placement"].values())) == 3
    assert r["lost"] == 0 and not r["aborted"] and r["finished_as_fault_free"] == r["requests"] and r["drained"]
