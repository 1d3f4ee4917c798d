"""Ring attention (Liu et al., arXiv 2310.01889) for the spatial and temporal cores, and the hybrid of
Ulysses inside groups with a ring across them (USP, arXiv 2405.07719).

Each rank keeps its query chunk; K/V chunks travel around the ring by P2P. The transfer of the next chunk
is posted before the current chunk is computed, so it overlaps. Partial outputs are merged with their
log-sum-exp in fp32. Backward runs a second ring: K/V travel again, and each chunk's dK/dV accumulator
travels with it, one hop behind, arriving home after a full turn.

Exact grouping: a chunk pair attends only where both tokens are real and share a frame (spatial) or a
spatial position (temporal), derived from global token indices; pairs with no such token are skipped
(still forwarded). Cost: the mask is dense per chunk pair, so a computed pair costs chunk^2 scores, not
the chunk * H*W (spatial) or chunk * T (temporal) the grouped attention needs; for ST-DiT prefer switch
(exact FLOPs) or Ulysses, and use ring where heads do not split over the degree. The block math is plain
fp32 PyTorch; a fused kernel returning the log-sum-exp can replace `_block_forward`/`_block_backward`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vgen.models.attention import AttentionCore
from vgen.parallel.comm import exchange, wait_all
from vgen.parallel.ulysses import heads_to_seq, seq_to_heads

KV_TAG, DKV_TAG = 0, 1


@dataclass(frozen=True)
class RingSpec:
    ranks: tuple[int, ...]  # global ranks, in ring order; position i holds token chunk i
    index: int  # this rank's position
    group: Any = field(default=None, compare=False)  # process group of the ring

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def next(self) -> int:
        return self.ranks[(self.index + 1) % self.size]

    @property
    def prev(self) -> int:
        return self.ranks[(self.index - 1) % self.size]


def _group_ids(idx: torch.Tensor, kind: str, positions: int) -> torch.Tensor:
    if kind == "spatial":
        return idx // positions  # frame
    if kind == "temporal":
        return idx % positions  # spatial position
    return torch.zeros_like(idx)  # "full"


def _indices(chunk: int, i: int, device=None) -> torch.Tensor:
    return torch.arange(i * chunk, (i + 1) * chunk, device=device)


@functools.lru_cache(maxsize=4096)
def _pair_needed(kind: str, grid: tuple[int, int, int], chunk: int, qi: int, kj: int) -> bool:
    """Whether query chunk qi has any real key in chunk kj (decided on the host, no device sync)."""
    T, H, W = grid
    q, k = _indices(chunk, qi), _indices(chunk, kj)
    q, k = q[q < T * H * W], k[k < T * H * W]
    return bool(torch.isin(_group_ids(q, kind, H * W), _group_ids(k, kind, H * W)).any())


def block_mask(kind: str, grid, chunk: int, qi: int, kj: int, device) -> torch.Tensor | None:
    """(chunk, chunk) bool: query of chunk qi may attend key of chunk kj; None when nothing may."""
    if not _pair_needed(kind, tuple(grid), chunk, qi, kj):
        return None
    T, H, W = grid
    q, k = _indices(chunk, qi, device), _indices(chunk, kj, device)
    same = _group_ids(q, kind, H * W)[:, None] == _group_ids(k, kind, H * W)[None, :]
    return same & (q < T * H * W)[:, None] & (k < T * H * W)[None, :]


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """log-sum-exp with -inf (rows without keys) replaced by 0, so exp(s - lse) stays 0, not NaN."""
    return lse.masked_fill(torch.isinf(lse), 0.0)


def _scores(q, k, mask, scale):
    return (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))  # (B, h, Cq, Ck)


def _block_forward(q, k, v, mask, scale):
    """fp32 (B, h, C, d) tensors -> block output (B, h, C, d) and its log-sum-exp (B, h, C)."""
    s = _scores(q, k, mask, scale)
    lse = torch.logsumexp(s, dim=-1)
    return torch.exp(s - _finite(lse)[..., None]) @ v, lse


def _merge(out, lse, blk_out, blk_lse):
    """Combine two softmax-normalised partial outputs over disjoint keys by their log-sum-exp."""
    new = torch.logaddexp(lse, blk_lse)
    ref = _finite(new)[..., None]
    return out * torch.exp(lse[..., None] - ref) + blk_out * torch.exp(blk_lse[..., None] - ref), new


def _block_backward(q, k, v, out_grad, delta, lse, mask, scale):
    """Flash-attention backward for one block, given the final (merged) lse and delta = rowsum(dO * O)."""
    p = torch.exp(_scores(q, k, mask, scale) - _finite(lse)[..., None])  # final probabilities, 0 if masked
    dv = p.transpose(-1, -2) @ out_grad
    ds = p * (out_grad @ v.transpose(-1, -2) - delta[..., None])
    return ds @ k * scale, ds.transpose(-1, -2) @ q * scale, dv


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    return x.float().transpose(-3, -2)  # (..., C, h, d) -> (..., h, C, d), fp32 for the math


def _rotate(kv: torch.Tensor, spec: RingSpec, label: str):
    """Yield (chunk index, K/V of that chunk) for every chunk of the ring, starting with this rank's own.
    The next chunk's transfer is posted before yielding, so it runs while the caller computes."""
    n = spec.size
    for s in range(n):
        if s + 1 < n:
            nxt, works = exchange(kv, spec.next, spec.prev, spec.group, label, KV_TAG)
        yield (spec.index - s) % n, kv
        if s + 1 < n:
            wait_all(works)
            kv = nxt


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec: RingSpec, kind: str, grid):
        # q, k, v: (B, C, h, d), the token chunk `spec.index`; K/V travel in the model's dtype
        C, scale = q.shape[1], 1.0 / math.sqrt(q.shape[-1])
        qf = _heads_first(q)  # (B, h, C, d)
        out, lse = torch.zeros_like(qf), torch.full(qf.shape[:-1], float("-inf"), device=q.device)
        for j, kv in _rotate(torch.stack([k, v]), spec, f"{kind}/fwd"):
            mask = block_mask(kind, grid, C, spec.index, j, q.device)
            if mask is not None:
                out, lse = _merge(out, lse, *_block_forward(qf, *_heads_first(kv).unbind(0), mask, scale))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec, ctx.kind, ctx.grid = spec, kind, grid
        return out.transpose(1, 2).to(q.dtype)  # (B, C, h, d)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        spec, kind, grid = ctx.spec, ctx.kind, ctx.grid
        C, scale = q.shape[1], 1.0 / math.sqrt(q.shape[-1])
        qf, dout = _heads_first(q), _heads_first(grad)
        delta = (dout * out).sum(-1)  # (B, h, C)
        dq, dkv_in, dkv_works = torch.zeros_like(qf), None, None
        for s, (j, kv) in enumerate(_rotate(torch.stack([k, v]), spec, f"{kind}/bwd")):
            dkv = torch.zeros((2, *qf.shape), device=q.device)  # this rank's share of chunk j's dK/dV
            mask = block_mask(kind, grid, C, spec.index, j, q.device)
            if mask is not None:
                dq_b, dk_b, dv_b = _block_backward(qf, *_heads_first(kv).unbind(0), dout, delta, lse, mask, scale)
                dq += dq_b
                dkv = torch.stack([dk_b, dv_b])
            if s > 0:  # chunk j's accumulator, from the rank that held chunk j one step ago
                wait_all(dkv_works)
                dkv = dkv + dkv_in
            dkv_in, dkv_works = exchange(dkv, spec.next, spec.prev, spec.group, f"{kind}/bwd", DKV_TAG)
        wait_all(dkv_works)  # after a full turn: the complete dK/dV of this rank's own chunk
        dk, dv = dkv_in.transpose(-3, -2).to(k.dtype).unbind(0)
        return dq.transpose(1, 2).to(q.dtype), dk, dv, None, None, None


class RingCore(nn.Module):
    """Wraps an AttentionCore for ring mode, or for hybrid when `ulysses_group` is given: all-to-all inside
    the Ulysses group first (its ranks hold consecutive token shards, so the gathered sequence is the
    contiguous chunk `ring_rank`), then the ring over chunks with the local heads.

    Args:
        local: the model's original core.
        spec: this rank's ring.
        ulysses_group: process group of the Ulysses level (None for pure ring).
    """

    def __init__(self, local: AttentionCore, spec: RingSpec, ulysses_group=None):
        super().__init__()
        self.local, self.spec, self.ulysses_group = local, spec, ulysses_group
        self.kind = local.kind

    def forward(self, q, k, v, grid, kv_mask=None):
        # q: (B, N_local, h, d); k, v the same, or (B, L, h, d) text for "cross"
        if self.kind == "cross":
            return self.local(q, k, v, grid, kv_mask=kv_mask)  # exact without communication
        if self.ulysses_group is not None:
            q, k, v = seq_to_heads(q, k, v, self.ulysses_group, self.kind).unbind(0)  # (B, u*N_local, h/u, d)
        out = RingAttention.apply(q, k, v, self.spec, self.kind, tuple(grid))
        if self.ulysses_group is not None:
            out = heads_to_seq(out, self.ulysses_group, self.kind)  # (B, N_local, h, d)
        return out

    def extra_repr(self) -> str:
        return f"kind={self.kind}, ring={self.spec.size}, ulysses={self.ulysses_group is not None}"
