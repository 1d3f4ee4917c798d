"""Memory-lean pointwise ops: they keep only their inputs for backward and recompute the rest.

Written as separate PyTorch ops, QK RMSNorm followed by RoPE keeps, per query or key, an fp32 copy of
the input and the rounded normalised values (3x the bytes of the bf16 input), and LayerNorm followed by
adaLN modulation keeps the normalised tokens beside the input. In the simulated 2b block (bf16) these were
62 of the 231 KB per token that a recomputed block holds in backward, the largest part after the
attention and MLP tensors themselves. The lean versions keep only what the caller keeps anyway (q and k are views
of the qkv projection output, which attention keeps alive through v; the block input is the residual)
and rerun the reference ops in backward (`_Recompute`), so values and gradients are bitwise those of the
unfused ops. The recomputation is pointwise work, a few percent of a block's time. A fused GPU kernel
would also drop the transient fp32 copies that the recomputation still makes, one tensor at a time.
"""

from __future__ import annotations

import torch

from vgen.models.rope import apply_rope


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in fp32, rounded back to x's dtype, then scaled by `weight`."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if weight is None else y * weight


def norm_rope_reference(x, weight, cos, sin, eps: float = 1e-6):
    """The unfused ops: RMSNorm (when `weight` is given), then RoPE (when `cos` is given)."""
    y = x if weight is None else rms_norm(x, weight, eps)
    return y if cos is None else apply_rope(y, cos, sin)


class _Recompute(torch.autograd.Function):
    """fn(*args) that saves only its tensor arguments and reruns fn under autograd in backward.

    Like a one-op activation checkpoint, without checkpoint's per-call bookkeeping. fn must be
    deterministic (no dropout or random ops) and take tensors or None positionally, plus constants.
    """

    @staticmethod
    def forward(ctx, fn, *args):
        ctx.fn = fn
        ctx.tensor_index = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        ctx.args = [None if i in ctx.tensor_index else a for i, a in enumerate(args)]
        ctx.save_for_backward(*(args[i] for i in ctx.tensor_index))
        with torch.no_grad():
            return fn(*args)

    @staticmethod
    def backward(ctx, grad_out):
        args = list(ctx.args)
        wanted = []
        for i, saved in zip(ctx.tensor_index, ctx.saved_tensors):
            needs = ctx.needs_input_grad[i + 1] and saved.is_floating_point()
            args[i] = saved.detach().requires_grad_(needs)
            if needs:
                wanted.append(i)
        with torch.enable_grad():
            out = ctx.fn(*args)
        grads = torch.autograd.grad(out, [args[i] for i in wanted], grad_out) if wanted else ()
        result = [None] * len(args)
        for i, g in zip(wanted, grads):
            result[i] = g
        return (None, *result)


def norm_rope(x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor | None = None,
              sin: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm of x (B, N, heads, head_dim) over head_dim scaled by `weight`, then rotated by RoPE tables
    cos, sin (N, head_dim // 2). Either part may be absent (weight None: no norm; cos None: no RoPE)."""
    if weight is None and cos is None:
        return x
    return _Recompute.apply(norm_rope_reference, x, weight, cos, sin, eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of tokens x (B, N, D) by per-sample shift, scale (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


def norm_modulate(norm: torch.nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """modulate(norm(x), shift, scale) keeping only x, shift and scale for backward.

    `norm` must have no parameters (the DiT's norms are affine-free: adaLN supplies scale and shift);
    backward differentiates only the tensors passed here.
    """
    if any(True for _ in norm.parameters()):
        raise ValueError(f"norm_modulate needs a norm without parameters, got {norm}")
    return _Recompute.apply(_norm_then_modulate, x, shift, scale, norm)


def _norm_then_modulate(x, shift, scale, norm):
    return modulate(norm(x), shift, scale)
