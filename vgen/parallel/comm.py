"""Collectives for sequence parallelism, with autograd and byte accounting, and the shard layout they move.

Layout (`ShardPlan`): token modes (ulysses, ring, hybrid) cut the (t, h, w) token sequence into equal
contiguous shards, the last ones padded at their end, shard i on SP rank i. Switch cuts whole frames,
unevenly when the frames do not divide (the first T % sp ranks hold one frame more), with no padding.

All-to-alls are PyTorch's functional collectives (`_c10d_functional.all_to_all_single`, with uneven
splits): the op returns at once with the transfer in flight (on CUDA, NCCL runs it on its own stream), and
`wait_tensor` is called only where the result is read (`Pending.wait`). Being functional ops, they are what
selective checkpointing recognises and keeps, so recomputation does not send them again.

Accounting: every wrapper adds to `COUNTER` the bytes this rank puts on the wire (the chunk it keeps for
itself is not counted), under "<label>/fwd", "<label>/bwd", or "<label>/recompute" for a forward
collective that runs again inside backward (block/nested checkpointing). Counts are per process; read
them with `COUNTER.snapshot()`.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack


def even_bounds(total: int, parts: int) -> tuple[int, ...]:
    """Offsets of `parts` contiguous pieces of `total` differing by at most one, larger ones first."""
    base, extra = divmod(total, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + base + (i < extra))
    return tuple(bounds)


@dataclass(frozen=True)
class ShardPlan:
    tokens: int  # real tokens T*H*W
    padded: int  # sp * local
    local: int  # tokens per rank, padding included (switch: the largest shard)
    frames: int  # real frames T
    positions: int  # tokens per frame H*W
    by_frames: bool  # every shard holds whole frames (switch mode)
    frame_bounds: tuple[int, ...] = ()  # switch: frame offsets of the shards, sp + 1 of them

    def start(self, i: int) -> int:
        """First token of shard i."""
        return self.frame_bounds[i] * self.positions if self.by_frames else i * self.local

    def size(self, i: int) -> int:
        """Tokens of shard i, padding included."""
        return self.frame_count(i) * self.positions if self.by_frames else self.local

    def real(self, i: int) -> int:
        """Real (not padding) tokens of shard i."""
        return max(0, min(self.size(i), self.tokens - self.start(i)))

    def frame_count(self, i: int) -> int:
        return self.frame_bounds[i + 1] - self.frame_bounds[i]


@functools.lru_cache(maxsize=256)
def shard_plan(grid: tuple[int, int, int], sp: int, mode: str) -> ShardPlan:
    """How a `grid` of tokens is laid out over `sp` ranks. Switch shards by frames when there are at least
    `sp` of them; with fewer it uses token shards (and Ulysses, see vgen/parallel/switch.py)."""
    T, H, W = grid
    P = H * W
    if mode == "switch" and T >= sp:
        bounds = even_bounds(T, sp)
        local = (bounds[1] - bounds[0]) * P
        return ShardPlan(T * P, local * sp, local, T, P, True, bounds)
    local = -(-T * P // sp)
    return ShardPlan(T * P, local * sp, local, T, P, False)


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


def _forward_phase() -> str | None:
    """"fwd" in the forward pass; "recompute" when a forward collective runs inside backward (checkpoint
    recomputation); None when selective checkpointing serves the op from its cache (nothing is sent)."""
    if torch._C._current_graph_task_id() == -1:
        return "fwd"
    if any(type(m).__name__ == "_CachedTorchDispatchMode" for m in _get_current_dispatch_mode_stack()):
        return None  # the selective policy keeps _c10d_functional outputs (vgen/parallel/checkpointing.py)
    return "recompute"


@dataclass(frozen=True)
class _Route:
    """One all-to-all: elements this rank sends to / receives from each rank, the group, the label."""

    send: tuple[int, ...]
    recv: tuple[int, ...]
    group: object
    rank: int  # this rank's index in group
    label: str
    elem_bytes: int

    def sent_bytes(self, splits) -> int:
        return (sum(splits) - splits[self.rank]) * self.elem_bytes

    def reverse(self) -> "_Route":
        return _Route(self.recv, self.send, self.group, self.rank, self.label, self.elem_bytes)


def _post(flat: torch.Tensor, route: _Route) -> torch.Tensor:
    name = route.group.group_name if route.group is not None else dist.group.WORLD.group_name
    return torch.ops._c10d_functional.all_to_all_single(flat, list(route.recv), list(route.send), name)


class _Post(torch.autograd.Function):
    """Posts the all-to-all of a flat buffer and returns the receive buffer while it is still in flight.
    Backward waits for the reverse transfer that _Wait's backward posted (handed over in `box`: its shape
    is this op's input's, not the shape autograd expects between the two)."""

    @staticmethod
    def forward(ctx, flat, route: _Route, box: dict):
        ctx.box = box
        phase = _forward_phase()
        if phase is not None:
            COUNTER.add(f"{route.label}/{phase}", route.sent_bytes(route.send))
        return _post(flat.contiguous(), route)

    @staticmethod
    def backward(ctx, grad):
        return torch.ops._c10d_functional.wait_tensor(ctx.box.pop("in_flight")), None, None


class _Wait(torch.autograd.Function):
    """Waits for a posted all-to-all. Backward posts the reverse all-to-all of the gradient and leaves it
    in flight for _Post's backward, so it runs behind whatever backward computes between the two."""

    @staticmethod
    def forward(ctx, recv, route: _Route, box: dict):
        ctx.route, ctx.box = route, box
        return torch.ops._c10d_functional.wait_tensor(recv).view_as(recv)

    @staticmethod
    def backward(ctx, grad):
        route = ctx.route.reverse()
        COUNTER.add(f"{route.label}/bwd", route.sent_bytes(route.send))
        ctx.box["in_flight"] = _post(grad.contiguous(), route)
        return grad, None, None  # a placeholder of the right shape; _Post's backward reads the box


class Pending:
    """An all-to-all in flight; `wait()` returns the received blocks, one per source rank."""

    def __init__(self, recv: torch.Tensor, route: _Route, shapes: list, box: dict):
        self.recv, self.route, self.shapes, self.box = recv, route, shapes, box

    def wait(self) -> list[torch.Tensor]:
        flat = _Wait.apply(self.recv, self.route, self.box)
        return [part.view(shape) for part, shape in zip(flat.split(list(self.route.recv)), self.shapes)]


def post_blocks(blocks: list[torch.Tensor], recv_shapes: list, group, label: str) -> Pending:
    """Send blocks[j] to rank j of `group` and receive a block of recv_shapes[j] from it, asynchronously
    and with autograd; blocks may differ in size (uneven splits)."""
    rank = dist.get_rank(group)
    ref = blocks[0]
    numel = lambda shape: int(torch.Size(shape).numel())  # noqa: E731
    route = _Route(tuple(b.numel() for b in blocks), tuple(numel(s) for s in recv_shapes), group, rank, label, ref.element_size())
    flat = torch.cat([b.reshape(-1) for b in blocks])
    box: dict = {}
    return Pending(_Post.apply(flat, route, box), route, [tuple(s) for s in recv_shapes], box)


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group, label: str) -> torch.Tensor:
    """Split `x` along `scatter_dim` over the ranks of `group` and concatenate what arrives along
    `gather_dim` in rank order. Backward is the reverse all-to-all."""
    n = dist.get_world_size(group)
    if x.shape[scatter_dim] % n:
        raise ValueError(f"all-to-all: dim {scatter_dim} of {tuple(x.shape)} does not split over {n} ranks")
    chunks = x.chunk(n, dim=scatter_dim)
    return torch.cat(post_blocks(list(chunks), [c.shape for c in chunks], group, label).wait(), dim=gather_dim)


class _GatherSeq(torch.autograd.Function):
    """Every rank's shard, concatenated, padding removed. Backward returns this rank's slice of the
    gradient, not a sum: every SP rank holds the same full loss, so summing would count it sp times."""

    @staticmethod
    def forward(ctx, x, plan: ShardPlan, index: int, group, label):
        ctx.plan, ctx.index = plan, index
        x = pad_dim(x, plan.local, 1)  # switch's shards differ by a frame; all_gather needs one size
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        COUNTER.add(f"{label}/fwd", nbytes(x) * (len(parts) - 1))
        return torch.cat([p[:, : plan.real(i)] for i, p in enumerate(parts)], dim=1)

    @staticmethod
    def backward(ctx, grad):
        plan, i = ctx.plan, ctx.index
        mine = grad[:, plan.start(i) : plan.start(i) + plan.real(i)]
        return pad_dim(mine, plan.size(i), 1).contiguous(), None, None, None, None


def local_tokens(x: torch.Tensor, plan: ShardPlan, index: int) -> torch.Tensor:
    """(B, N, ...) -> (B, plan.size(index), ...): shard `index`, padding made locally. Differentiable;
    nothing of full length is made (the slice is a view)."""
    start = plan.start(index)
    return pad_dim(x[:, start : start + plan.real(index)], plan.size(index), 1)


def gather_sequence(x: torch.Tensor, plan: ShardPlan, index: int, group, label: str = "seq_out") -> torch.Tensor:
    """(B, N_local, ...) -> (B, N, ...) on every rank of `group`."""
    return _GatherSeq.apply(x, plan, index, group, label)


class _SumOverGroup(torch.autograd.Function):
    """All-reduce sum in forward; identity in backward, because every rank seeds backward with its own
    term (the sum's gradient with respect to each term is 1 and each rank backpropagates only its term)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sum_over_group(x: torch.Tensor, group) -> torch.Tensor:
    return _SumOverGroup.apply(x, group)


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
