"""Process groups among a deployment's worker processes (tensor parallelism, NCCL transfers).

The driver hosts the rendezvous stores and describes the groups (`CommSpec`); the workers of a world
create the same groups in the same order, as torch.distributed requires. Push-based transfers need one
world of every worker (a group per pair); otherwise each tensor-parallel instance is a world of its
own ranks, so a lost instance can be started again in a fresh world while the others go on.
NCCL on GPUs, gloo on CPU (so the same code paths run in CI).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class CommSpec:
    host: str
    port: int
    world_size: int
    tp_groups: tuple[tuple[int, ...], ...]  # global ranks of each instance with tp > 1
    pairs: bool  # one group per ordered pair of ranks (point-to-point transfers)
    backend: str = "gloo"
    first_rank: int = 0  # the global rank of this world's rank 0 (a world of one instance's ranks starts past 0)

    def rank_of(self, global_rank: int) -> int:
        return global_rank - self.first_rank


@dataclass
class Comm:
    """A worker's handles on the world: its rank, its tensor-parallel group, its pair groups."""

    rank: int
    tp_group: Any = None
    pair: dict[tuple[int, int], Any] = field(default_factory=dict)

    def pair_group(self, src: int, dst: int) -> Any:
        return self.pair[(src, dst)]


def join(spec: CommSpec, rank: int, device: Optional[torch.device]) -> Comm:
    store = dist.TCPStore(spec.host, spec.port, spec.world_size, is_master=False, timeout=TIMEOUT)
    kwargs: dict[str, Any] = {}
    if spec.backend == "nccl" and device is not None:
        kwargs["device_id"] = device
    dist.init_process_group(spec.backend, store=store, rank=rank, world_size=spec.world_size, timeout=TIMEOUT, **kwargs)
    comm = Comm(rank)
    for ranks in spec.tp_groups:
        group = dist.new_group(list(ranks))
        if rank in ranks:
            comm.tp_group = group
    if spec.pairs:
        for src in range(spec.world_size):
            for dst in range(spec.world_size):
                if src != dst:
                    group = dist.new_group([src, dst])
                    if rank in (src, dst):
                        comm.pair[(src, dst)] = group
    return comm


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
