"""Process groups among a deployment's worker processes (tensor parallelism, NCCL transfers).

The driver hosts the rendezvous stores and describes the groups (`CommSpec`); each tensor-parallel
instance is a world of its own ranks, so a lost instance is started again in a fresh world while the
others go on. Push-based transfers use a group of two processes per ordered pair of workers, made
outside any world (`pair_group`) on the driver's pair store under a name that carries both workers'
incarnations: a replacement meets its peers in new pair groups and nobody else's change.
NCCL on GPUs, gloo on CPU (so the same code paths run in CI).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
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
    backend: str = "gloo"
    first_rank: int = 0  # the global rank of this world's rank 0 (a world of one instance's ranks starts past 0)

    def rank_of(self, global_rank: int) -> int:
        return global_rank - self.first_rank


@dataclass
class Comm:
    """A worker's handles on its world: its rank and its tensor-parallel group."""

    rank: int
    tp_group: Any = None


@dataclass(frozen=True)
class PairRendezvous:
    """Where the pair groups of push-based transfers meet: a store the driver hosts."""

    host: str
    port: int
    backend: str = "gloo"


Incarnation = tuple[int, str]  # (global rank, a token new with every worker process)


def pair_group(rdv: PairRendezvous, store: Any, src: Incarnation, dst: Incarnation, me: Incarnation) -> Any:
    """The two-process group that carries `src`'s pushes to `dst` (rank 0: src). For gloo, making it
    waits until the other side makes it too; NCCL connects at the first send."""
    prefix = dist.PrefixStore(f"pair/{src[0]}.{src[1]}/{dst[0]}.{dst[1]}", store)
    rank = 0 if me == src else 1
    if rdv.backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = TIMEOUT
        return dist.ProcessGroupNCCL(prefix, rank, 2, opts)
    return dist.ProcessGroupGloo(prefix, rank, 2, TIMEOUT)


def pair_store(rdv: PairRendezvous) -> Any:
    return dist.TCPStore(rdv.host, rdv.port, is_master=False, timeout=TIMEOUT)


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
    return comm


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
