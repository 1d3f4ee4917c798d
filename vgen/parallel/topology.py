"""Process topology: world = data-parallel x sequence-parallel.

SP groups are blocks of consecutive ranks (so they sit inside a node first); the data-parallel group of a
rank holds the ranks with the same position in every SP group. Data knows only (dp_rank, dp_size).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass
class Topology:
    world_size: int = 1
    rank: int = 0
    sp_size: int = 1
    sp_group: Any = None  # process group of this rank's SP block (None when sp_size == 1)
    dp_group: Any = None  # process group of the ranks holding the same sequence shard

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size


def init_process_group(device_type: str) -> None:
    """Start torch.distributed for any launcher: deepspeed, torchrun, or plain python (world size 1)."""
    if dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_topology(sp_cfg) -> Topology:
    """Groups for `parallel.sp`; call on every rank after init_process_group."""
    world, rank = dist.get_world_size(), dist.get_rank()
    sp = int(sp_cfg.degree)
    if sp < 1 or world % sp:
        raise ValueError(f"parallel.sp.degree={sp} must be >= 1 and divide the world size {world}")
    topo = Topology(world_size=world, rank=rank, sp_size=sp)
    if sp == 1:
        return topo
    for start in range(0, world, sp):  # every rank must create every group, in the same order
        group = dist.new_group(list(range(start, start + sp)))
        if start <= rank < start + sp:
            topo.sp_group = group
    for offset in range(sp):
        group = dist.new_group(list(range(offset, world, sp)))
        if rank % sp == offset:
            topo.dp_group = group
    return topo
