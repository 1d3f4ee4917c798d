"""Attention for the ST-DiT block: the attention core (the seam sequence parallelism wraps) and the
spatial/temporal/cross attention layers around it.

Every attention layer calls its own named `core` submodule with q, k, v laid out as (B, N, heads, head_dim)
over the *whole* token sequence in (t, h, w) order, plus the token grid. The core decides how tokens are
grouped (per frame, per spatial position, or against text). A sequence-parallel wrapper replaces the core
and sees exactly the same call, so the block never changes for a parallel technique.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from vgen.models.lean_ops import even_slices, norm_rope

KINDS = ("spatial", "temporal", "cross", "full")
_HAS_FLASH = importlib.util.find_spec("flash_attn") is not None


def group_tokens(x: torch.Tensor, kind: str, grid: tuple[int, int, int]) -> torch.Tensor:
    """(B, N, h, d) tokens in (t, h, w) order -> (groups, seq, h, d) attention batches for `kind`."""
    B, N, h, d = x.shape
    T, H, W = grid
    if kind == "spatial":  # one frame per group
        return x.reshape(B * T, H * W, h, d)
    if kind == "temporal":  # one spatial position per group, its frames in order
        return x.reshape(B, T, H * W, h, d).transpose(1, 2).reshape(B * H * W, T, h, d)
    return x


def ungroup_tokens(x: torch.Tensor, kind: str, grid: tuple[int, int, int], batch: int) -> torch.Tensor:
    """Inverse of group_tokens: (groups, seq, h, d) -> (B, N, h, d)."""
    T, H, W = grid
    h, d = x.shape[-2:]
    if kind == "spatial":
        return x.reshape(batch, T * H * W, h, d)
    if kind == "temporal":
        return x.reshape(batch, H * W, T, h, d).transpose(1, 2).reshape(batch, T * H * W, h, d)
    return x


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_mask: torch.Tensor | None = None, backend: str = "auto"):
    """Non-causal attention on (B, S, h, d) tensors; kv_mask (B, L) bool marks valid keys."""
    use_flash = backend == "flash" or (backend == "auto" and _HAS_FLASH and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16))
    if use_flash and kv_mask is None:
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v)
    mask = None if kv_mask is None else kv_mask[:, None, None, :]  # (B, 1, 1, L)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


class AttentionCore(nn.Module):
    """q, k, v -> attention output for one attention of a block, with no parameters.

    Args:
        kind: "spatial" (tokens of one frame), "temporal" (one spatial position across frames),
            "cross" (video tokens query text tokens) or "full".
    """

    def __init__(self, kind: str, backend: str = "auto"):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"attention kind {kind!r} not in {KINDS}")
        self.kind, self.backend = kind, backend
        # > 1: spatial/temporal groups run in this many slices with backward recomputing each slice
        # (set by the memory policy, vgen/parallel/checkpointing.py; not a parameter or buffer)
        self.group_chunks = 1

    def forward(self, q, k, v, grid: tuple[int, int, int], kv_mask: torch.Tensor | None = None):
        # q: (B, N, h, d); k, v: (B, N, h, d), or (B, L, h, d) text tokens for "cross"
        B = q.shape[0]
        if self.kind == "cross":
            return sdpa(q, k, v, kv_mask, self.backend)  # (B, N, h, d)
        groups = [group_tokens(x, self.kind, grid) for x in (q, k, v)]  # each (G, S, h, d)
        if self.group_chunks > 1 and torch.is_grad_enabled():
            out = _GroupChunkedAttention.apply(*groups, self.group_chunks, self.backend)
        else:
            out = sdpa(*groups, backend=self.backend)
        return ungroup_tokens(out, self.kind, grid, B)  # (B, N, h, d)

    def extra_repr(self) -> str:
        return f"kind={self.kind}"


class _GroupChunkedAttention(torch.autograd.Function):
    """Attention over independent groups (frames, or spatial positions), a slice of groups at a time.

    Keeps only q, k, v for backward, which recomputes each slice's attention and differentiates it
    alone: the attention backward's buffers (dq/dk/dv of the slice, FlashAttention-2's fp32 dq
    accumulator, 2x the bf16 dq, with rows rounded up to 128 per group) exist for one slice at a time
    instead of the whole sequence, and the attention output is not kept. Costs one more attention
    forward in backward. Groups are independent, so every value is that of the unsliced call.
    """

    @staticmethod
    def forward(ctx, q, k, v, chunks, backend):
        ctx.chunks, ctx.backend = chunks, backend
        ctx.save_for_backward(q, k, v)
        out = None
        with torch.no_grad():
            for sl in even_slices(q.shape[0], chunks):
                part = sdpa(q[sl], k[sl], v[sl], backend=backend)  # (G_slice, S, h, d)
                if out is None:
                    out = part.new_empty(q.shape[:-1] + part.shape[-1:])
                out[sl] = part
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        grads = [torch.empty_like(t) for t in (q, k, v)]
        for sl in even_slices(q.shape[0], ctx.chunks):
            part = [t[sl].detach().requires_grad_() for t in (q, k, v)]
            with torch.enable_grad():
                out = sdpa(*part, backend=ctx.backend)
            for g, d in zip(grads, torch.autograd.grad(out, part, grad_out[sl])):
                g[sl] = d
        return (*grads, None, None)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim; given RoPE tables, also rotates (QK norm + RoPE as one lean op that
    keeps only its input for backward: vgen/models/lean_ops.py). Called as a module so that hooks on it
    (ZeRO-3 gathers its weight) run."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, rope=None):
        cos, sin = rope if rope is not None else (None, None)
        return norm_rope(x, self.weight, cos, sin, self.eps)


def qk_norm_rope(x: torch.Tensor, norm: nn.Module, rope=None) -> torch.Tensor:
    """QK norm (an RMSNorm, or nn.Identity when off) then RoPE (when `rope` is given), keeping only x."""
    if isinstance(norm, RMSNorm):
        return norm(x, rope)
    return x if rope is None else norm_rope(x, None, *rope)


class SelfAttention(nn.Module):
    """Spatial or temporal self-attention with QK RMSNorm and 3D RoPE; returns pre-projection heads
    (B, N, hidden) when `project=False`, so the block can fuse it with the cross-attention output."""

    def __init__(self, hidden: int, heads: int, kind: str, qk_norm: bool = True, project: bool = True, backend="auto"):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        head_dim = hidden // heads
        self.q_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.core = AttentionCore(kind, backend)
        self.proj = nn.Linear(hidden, hidden) if project else nn.Identity()

    def forward(self, x, rope, grid):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).unbind(2)  # each (B, N, h, d)
        # keeps only q and k, views of the qkv output, which v keeps alive anyway
        q, k = qk_norm_rope(q, self.q_norm, rope), qk_norm_rope(k, self.k_norm, rope)
        out = self.core(q, k, v, grid)  # (B, N, h, d)
        return self.proj(out.reshape(B, N, D))


class CrossAttention(nn.Module):
    """Video tokens query text tokens; returns pre-projection heads (B, N, hidden)."""

    def __init__(self, hidden: int, heads: int, qk_norm: bool = True, backend="auto"):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        head_dim = hidden // heads
        self.q_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.core = AttentionCore("cross", backend)

    def forward(self, x, ctx, ctx_mask, grid):
        B, N, D = x.shape
        L = ctx.shape[1]
        q = self.q(x).view(B, N, self.heads, D // self.heads)  # (B, N, h, d)
        q = qk_norm_rope(q, self.q_norm)  # keeps only the bf16 q, not the fp32 norm intermediates
        k, v = self.kv(ctx).view(B, L, 2, self.heads, D // self.heads).unbind(2)  # (B, L, h, d)
        out = self.core(q, self.k_norm(k), v, grid, kv_mask=ctx_mask)  # (B, N, h, d)
        return out.reshape(B, N, D)
