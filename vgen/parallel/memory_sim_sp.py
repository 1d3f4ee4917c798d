"""Sequence parallelism for the memory simulator (vgen/parallel/memory_sim.py).

The real wrappers (vgen/parallel/sequence.py) run on a fake process group of the job's world size (torch's
"fake" backend: collectives return at once and fake tensors carry the shapes), this process acting as
rank 0; ranks are symmetric. Where torch.distributed is already initialised (the planner inside a training
job) shape-faithful Ulysses stand-ins replace the seams and attention cores instead: each collective
becomes an autograd op returning a new buffer of its output shape plus the packing copy an all-to-all
makes. Ring attention picks K/V blocks from data and cannot run on fake tensors.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn

from vgen.models.dit import VideoDiT


class _ShapeOnly(torch.autograd.Function):
    """A collective's memory without its data: a packing copy and an output of `shape`, both ways."""

    @staticmethod
    def forward(ctx, x, shape):
        ctx.in_shape = x.shape
        packed = torch.empty_like(x)  # all-to-all sends a contiguous, rank-major copy
        del packed
        return x.new_empty(shape)

    @staticmethod
    def backward(ctx, grad):
        packed = torch.empty_like(grad)
        del packed
        return grad.new_empty(ctx.in_shape), None


class _UlyssesShapes(nn.Module):
    """Stand-in for a Ulysses-wrapped attention core: (B, N/sp, h) in and out, (B, N, h/sp) inside."""

    def __init__(self, inner: nn.Module, sp: int):
        super().__init__()
        self.inner, self.sp = inner, sp

    def forward(self, q, k, v, grid, kv_mask=None):
        if self.inner.kind == "cross":  # a token's text attention needs only its own query: no collective
            return self.inner(q, k, v, grid, kv_mask=kv_mask)
        B, n, h, d = q.shape
        full = (B, n * self.sp, h // self.sp, d)
        q, k, v = (_ShapeOnly.apply(t, full) for t in (q, k, v))
        out = self.inner(q, k, v, grid)  # (B, N, h/sp, d)
        return _ShapeOnly.apply(out, (B, n, h, d))


class _SeamShapes(nn.Module):
    """Stand-in for seq_in (split: keep N/sp tokens of the patchified input, and N/sp RoPE rows) or
    seq_out (gather all N)."""

    def __init__(self, sp: int, split: bool):
        super().__init__()
        self.sp, self.split = sp, split

    def forward(self, x, grid=None):
        B, n, C = x.shape
        return _ShapeOnly.apply(x, (B, n // self.sp if self.split else n * self.sp, C))

    def rows(self, grid):
        return ("tokens", 0, grid[0] * grid[1] * grid[2] // self.sp)

    def returns_shard(self) -> bool:
        return False


def install_sp_shapes(model: VideoDiT, sp: int) -> None:
    """Give a fake model the per-rank shapes of Ulysses sequence parallelism of degree `sp`."""
    if model.cfg.heads % sp:
        raise ValueError(f"sp degree {sp} must divide the head count {model.cfg.heads}")
    model.seq_in, model.seq_out = _SeamShapes(sp, split=True), _SeamShapes(sp, split=False)
    for block in model.blocks:
        for attn in (block.spatial, block.cross, block.temporal):
            attn.core = _UlyssesShapes(attn.core, sp)


@contextlib.contextmanager
def fake_world(world_size: int):
    """A fake default process group of `world_size` ranks (this process is rank 0), so the real
    sequence-parallel wrappers run; yields False (use stand-ins) where torch.distributed is already up."""
    if world_size == 1 or dist.is_initialized() or not dist.is_available():
        yield False
        return
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield True
    finally:
        dist.destroy_process_group()


def parallelize_fake(model: VideoDiT, sp: int, mode: str, real_sp: bool, tokens: int) -> str:
    """Sequence parallelism on the fake model; returns which implementation ran."""
    if mode in ("ring", "hybrid"):
        raise ValueError(f"sp mode {mode!r} cannot be simulated: ring attention selects K/V blocks from data")
    try:
        from vgen.parallel.sequence import apply_sequence_parallel
        from vgen.parallel.topology import build_topology
    except ImportError:
        real_sp = False
    if real_sp:
        cfg = SimpleNamespace(degree=sp, mode=mode, ulysses_degree=sp)
        apply_sequence_parallel(model, build_topology(cfg), cfg)
        return "fake process group"
    if mode != "ulysses" or tokens % sp:
        raise ValueError(f"the SP stand-ins model Ulysses with {tokens} tokens divisible by sp={sp}; got {mode!r}")
    install_sp_shapes(model, sp)
    return "stand-ins"
