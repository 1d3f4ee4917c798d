"""Collectives for sequence parallelism, with autograd and byte accounting, and the shard layout they move.

Layout: the (t, h, w) token sequence is padded at its end to `ShardPlan.padded` tokens and cut into equal
contiguous shards, shard i on SP rank i. Switch mode pads whole frames (each rank holds whole frames); the
other modes pad single tokens. Padding is always a suffix, so "strip the padding" is one slice everywhere.

Accounting: every wrapper adds to `COUNTER`, under "<label>/fwd" or "<label>/bwd", the bytes this rank puts
on the wire, taken from the tensor it hands to the torch.distributed call (the chunk an all-to-all keeps
for itself is not counted). Counts are per process; read them with `COUNTER.snapshot()`.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ShardPlan:
    tokens: int  # real tokens T*H*W
    padded: int  # tokens after padding; sp * local
    local: int  # tokens per rank
    frames: int  # real frames T
    positions: int  # tokens per frame H*W
    by_frames: bool  # every shard holds whole frames (switch mode)

    @property
    def frames_local(self) -> int:
        return self.local // self.positions


@functools.lru_cache(maxsize=256)
def shard_plan(grid: tuple[int, int, int], sp: int, mode: str) -> ShardPlan:
    """How a `grid` of tokens is laid out over `sp` ranks. Switch shards by frames when there are at least
    `sp` of them; with fewer it would leave ranks holding only padding, so it falls back to token shards
    (and to Ulysses, see vgen/parallel/switch.py)."""
    T, H, W = grid
    P = H * W
    by_frames = mode == "switch" and T >= sp
    local = -(-T // sp) * P if by_frames else -(-T * P // sp)
    return ShardPlan(T * P, local * sp, local, T, P, by_frames)


class CommCounter:
    """Bytes this process sent, by label."""

    def __init__(self):
        self.bytes: Counter = Counter()

    def add(self, label: str, nbytes: int) -> None:
        self.bytes[label] += int(nbytes)

    def reset(self) -> None:
        self.bytes.clear()

    def snapshot(self) -> dict[str, int]:
        return dict(self.bytes)


COUNTER = CommCounter()


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def pad_dim(x: torch.Tensor, length: int, dim: int, value: float = 0.0) -> torch.Tensor:
    """x padded with `value` at the end of `dim` to `length`."""
    extra = length - x.shape[dim]
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group, label: str) -> torch.Tensor:
    n = dist.get_world_size(group)
    if x.shape[scatter_dim] % n:
        raise ValueError(f"all-to-all: dim {scatter_dim} of {tuple(x.shape)} does not split over {n} ranks")
    send = torch.stack(x.chunk(n, dim=scatter_dim)).contiguous()  # (n, ...): chunk i goes to rank i
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    COUNTER.add(label, nbytes(send) * (n - 1) // n)
    return torch.cat(recv.unbind(0), dim=gather_dim)  # chunks from ranks 0..n-1, in order


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group, label):
        ctx.args = (scatter_dim, gather_dim, group, label)
        return _all_to_all(x, scatter_dim, gather_dim, group, f"{label}/fwd")

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim, group, label = ctx.args
        return _all_to_all(grad, gather_dim, scatter_dim, group, f"{label}/bwd"), None, None, None, None


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group, label: str) -> torch.Tensor:
    """Split `x` along `scatter_dim` over the ranks of `group` and concatenate what arrives along
    `gather_dim` in rank order. Backward is the reverse all-to-all."""
    return _AllToAll.apply(x, scatter_dim, gather_dim, group, label)


class _SplitSeq(torch.autograd.Function):
    """This rank's shard of a full sequence. Backward puts the shard's gradient back in place with zeros
    elsewhere (no communication), so whatever ran before the split gets a partial-sum gradient."""

    @staticmethod
    def forward(ctx, x, plan: ShardPlan, index: int):
        ctx.plan, ctx.index = plan, index
        start = index * plan.local
        return pad_dim(x, plan.padded, 1)[:, start : start + plan.local].contiguous()

    @staticmethod
    def backward(ctx, grad):
        plan, start = ctx.plan, ctx.index * ctx.plan.local
        full = grad.new_zeros(grad.shape[0], plan.padded, *grad.shape[2:])
        full[:, start : start + plan.local] = grad
        return full[:, : plan.tokens], None, None


class _GatherSeq(torch.autograd.Function):
    """Every rank's shard, concatenated, padding removed. Backward returns this rank's slice of the
    gradient, not a sum: every SP rank holds the same full loss, so summing would count it sp times."""

    @staticmethod
    def forward(ctx, x, plan: ShardPlan, index: int, group, label):
        ctx.plan, ctx.index = plan, index
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        COUNTER.add(f"{label}/fwd", nbytes(x) * (len(parts) - 1))
        return torch.cat(parts, dim=1)[:, : plan.tokens]

    @staticmethod
    def backward(ctx, grad):
        start = ctx.index * ctx.plan.local
        grad = pad_dim(grad, ctx.plan.padded, 1)
        return grad[:, start : start + ctx.plan.local].contiguous(), None, None, None, None


def split_sequence(x: torch.Tensor, plan: ShardPlan, index: int) -> torch.Tensor:
    """(B, N, ...) -> (B, plan.local, ...): shard `index`, padding included."""
    return _SplitSeq.apply(x, plan, index)


def gather_sequence(x: torch.Tensor, plan: ShardPlan, index: int, group, label: str = "seq_out") -> torch.Tensor:
    """(B, plan.local, ...) -> (B, N, ...) on every rank of `group`."""
    return _GatherSeq.apply(x, plan, index, group, label)


def exchange(send: torch.Tensor, to_rank: int, from_rank: int, group, label: str, tag: int = 0):
    """Post an async send of `send` to global rank `to_rank` and a receive of a tensor of the same shape
    from `from_rank`, both inside `group`. Returns (recv buffer, works); wait on the works before reading
    the buffer. Distinct tags keep two exchanges in flight between the same peers apart (gloo; NCCL
    matches by posting order, which is the same on every rank)."""
    send = send.contiguous()
    recv = torch.empty_like(send)
    ops = [dist.P2POp(dist.isend, send, to_rank, group, tag), dist.P2POp(dist.irecv, recv, from_rank, group, tag)]
    works = dist.batch_isend_irecv(ops)
    COUNTER.add(label, nbytes(send))
    return recv, works


def wait_all(works) -> None:
    for work in works or ():
        work.wait()
