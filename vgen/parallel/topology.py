"""Process topology: world = data-parallel x sequence-parallel, sp = ulysses x ring.

SP groups are blocks of consecutive ranks (so they sit inside a node first); the data-parallel group of a
rank holds the ranks with the same position in every SP group. Inside an SP group of mode "hybrid", the
Ulysses groups are blocks of `ulysses_degree` consecutive ranks (all-to-all is the bandwidth-hungry
collective, so it gets the closest ranks) and the ring groups join the ranks holding the same head slice
in each Ulysses group. Data knows only (dp_rank, dp_size).

Everything checkable without processes (`sp_layout`, `check_heads`, `group_ranks`) is a pure function, so
bad settings fail at start-up with the setting's name and tier-1 tests cover them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

MODES = ("ulysses", "ring", "hybrid", "switch")


@dataclass
class Topology:
    world_size: int = 1
    rank: int = 0
    sp_size: int = 1
    sp_group: Any = None  # process group of this rank's SP block (None when sp_size == 1)
    dp_group: Any = None  # process group of the ranks holding the same sequence shard
    sp_mode: str = "ulysses"
    ulysses_size: int = 1  # ranks one all-to-all spans (the whole SP group for ulysses and switch)
    ring_size: int = 1  # ranks K/V blocks travel around (ring and hybrid)
    ulysses_group: Any = None
    ring_group: Any = None
    ring_ranks: list[int] = field(default_factory=list)  # global ranks of this rank's ring, in ring order

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size

    @property
    def ring_rank(self) -> int:
        return self.sp_rank // self.ulysses_size

    @property
    def sp_src(self) -> int:
        """Global rank of the first rank of this rank's SP group (the source of SP broadcasts)."""
        return self.rank - self.sp_rank


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


def sp_layout(sp_cfg, world_size: int) -> tuple[int, int]:
    """(ulysses_degree, ring_degree) of `parallel.sp` on `world_size` ranks; raises ValueError naming the
    setting when the combination is invalid."""
    mode, sp = str(sp_cfg.mode), int(sp_cfg.degree)
    if mode not in MODES:
        raise ValueError(f"parallel.sp.mode={mode!r} is not one of {MODES}")
    if sp < 1 or world_size % sp:
        raise ValueError(f"parallel.sp.degree={sp} must be >= 1 and divide the world size {world_size}")
    if mode in ("ulysses", "switch"):
        return sp, 1
    if mode == "ring":
        return 1, sp
    u = int(sp_cfg.ulysses_degree)
    if u < 1 or sp % u:
        raise ValueError(f"parallel.sp.ulysses_degree={u} must be >= 1 and divide parallel.sp.degree={sp} (mode=hybrid)")
    return u, sp // u


def check_heads(heads: int, mode: str, ulysses_size: int) -> None:
    """Ulysses scatters heads, so their count must split evenly. Switch scatters positions instead and
    only needs this for its few-frames fallback (checked when that happens)."""
    if mode in ("ulysses", "hybrid") and heads % ulysses_size:
        raise ValueError(
            f"model.heads={heads} must be divisible by the Ulysses degree {ulysses_size} "
            f"(parallel.sp.mode={mode}; for hybrid lower parallel.sp.ulysses_degree)"
        )


def group_ranks(world_size: int, sp: int, ulysses: int) -> dict[str, list[list[int]]]:
    """Every group of the topology as lists of global ranks, in the order all ranks must create them."""
    sp_groups = [list(range(s, s + sp)) for s in range(0, world_size, sp)]
    dp_groups = [list(range(o, world_size, sp)) for o in range(sp)]
    ulysses_groups = [g[i : i + ulysses] for g in sp_groups for i in range(0, sp, ulysses)]
    ring_groups = [g[o::ulysses] for g in sp_groups for o in range(ulysses)]
    return {"sp": sp_groups, "dp": dp_groups, "ulysses": ulysses_groups, "ring": ring_groups}


def _create_mine(groups: list[list[int]], rank: int):
    """Create every group (collective: all ranks, same order) and return (group, ranks) holding `rank`."""
    mine = (None, [])
    for ranks in groups:
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = (group, ranks)
    return mine


def build_topology(sp_cfg, heads: int | None = None) -> Topology:
    """Groups for `parallel.sp`; call on every rank after init_process_group.

    Args:
        sp_cfg: the `parallel.sp` config (degree, mode, ulysses_degree).
        heads: the model's attention heads, to fail here rather than at the first forward (optional;
            apply_sequence_parallel checks again).
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    u, r = sp_layout(sp_cfg, world)
    mode, sp = str(sp_cfg.mode), int(sp_cfg.degree)
    if heads is not None:
        check_heads(heads, mode, u)
    topo = Topology(world_size=world, rank=rank, sp_size=sp, sp_mode=mode, ulysses_size=u, ring_size=r)
    if sp == 1:
        return topo
    groups = group_ranks(world, sp, u)
    topo.sp_group, sp_ranks = _create_mine(groups["sp"], rank)
    topo.dp_group, _ = _create_mine(groups["dp"], rank)
    if 1 < u < sp:  # hybrid with both levels: sub-groups of their own
        topo.ulysses_group, _ = _create_mine(groups["ulysses"], rank)
        topo.ring_group, topo.ring_ranks = _create_mine(groups["ring"], rank)
    else:  # one level spans the whole SP group
        topo.ulysses_group = topo.sp_group if u == sp else None
        topo.ring_group, topo.ring_ranks = (topo.sp_group, sp_ranks) if r == sp else (None, [rank])
    return topo
