"""Memory-lean pointwise ops: they keep only their inputs for backward and recompute the rest.

Written as separate PyTorch ops, QK RMSNorm followed by RoPE keeps, per query or key, an fp32 copy of
the input and the rounded normalised values (3x the bytes of the bf16 input), and LayerNorm followed by
adaLN modulation keeps the normalised tokens beside the input. In the simulated 2b block (bf16) these were
62 of the 231 KB per token that a recomputed block holds in backward, the largest part after the
attention and MLP tensors themselves. The lean versions keep only what the caller keeps anyway (q and k
are views of the qkv projection output, which attention keeps alive through v; the block input is the
residual) and rerun the reference ops in backward (`_Recompute`), so values and gradients are bitwise
those of the unfused ops. The recomputation is pointwise work, a few percent of a block's time.

On CUDA, when Triton imports, both ops run as fused Triton kernels instead (kernels/qk_norm_rope.py,
kernels/norm_modulate.py): the same saved inputs, and no transient fp32 copies at all (values within bf16
rounding of the unfused ops rather than bitwise). VGEN_KERNELS=0 keeps the PyTorch path.
"""

from __future__ import annotations

import os

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


# Inputs above CHUNK_THRESHOLD elements run in CHUNKS token slices, so the recomputation's fp32
# temporaries (4-5 tensors of the input's size) are an eighth of what they were. A fixed slice count
# (rather than a fixed slice size) keeps the op sequence the same at every long length, which the memory
# simulator's two-trace frame sweep relies on (vgen/parallel/memory_sim.py, FrameSweep; the sweep is
# traced again where the threshold falls between its traces and the answer).
CHUNK_THRESHOLD = 1 << 24
CHUNKS = 8


def even_slices(n: int, chunks: int) -> list[slice]:
    """`chunks` slices of range(n) whose sizes differ by at most one (fewer when n < chunks)."""
    chunks = max(1, min(chunks, n))
    return [slice(i * n // chunks, (i + 1) * n // chunks) for i in range(chunks)]


def token_slices(n: int, numel: int) -> list[slice]:
    """The token slices for an input of `numel` elements over `n` tokens (one slice when it is small)."""
    return even_slices(n, CHUNKS if numel > CHUNK_THRESHOLD else 1)


class _Recompute(torch.autograd.Function):
    """fn(*args) that saves only its tensor arguments and reruns fn under autograd in backward.

    Like a one-op activation checkpoint, without checkpoint's per-call bookkeeping. fn must be
    deterministic, per token along the chunked dims, and take tensors or None positionally, plus
    constants. `token_dims` gives, per argument, its token dim (None: shared by all tokens); the output's
    token dim is dim 1. Long inputs run in CHUNKS token slices, forward and backward, so the transient
    fp32 copies stay bounded; the gradients of shared arguments are then summed chunk by chunk (within
    float rounding of the unchunked sum; one chunk is bitwise the unfused ops).
    """

    @staticmethod
    def forward(ctx, fn, token_dims, *args):
        ctx.fn, ctx.token_dims = fn, token_dims
        ctx.tensor_index = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        ctx.args = [None if i in ctx.tensor_index else a for i, a in enumerate(args)]
        ctx.save_for_backward(*(args[i] for i in ctx.tensor_index))
        with torch.no_grad():
            slices = _slices_for(args, token_dims)
            if len(slices) == 1:
                return fn(*args)
            out = None
            for sl in slices:
                y = fn(*_sliced(args, token_dims, sl))
                if out is None:
                    out = y.new_empty(y.shape[:1] + (_tokens(args, token_dims),) + y.shape[2:])
                out[:, sl] = y
            return out

    @staticmethod
    def backward(ctx, grad_out):
        args = list(ctx.args)
        wanted = []
        for i, saved in zip(ctx.tensor_index, ctx.saved_tensors):
            needs = ctx.needs_input_grad[i + 2] and saved.is_floating_point()
            args[i] = saved.detach()
            if needs:
                wanted.append(i)
        result = [None] * len(args)
        for sl in _slices_for(args, ctx.token_dims):
            part = _sliced(args, ctx.token_dims, sl)
            part = [a.detach().requires_grad_(i in wanted) if isinstance(a, torch.Tensor) else a for i, a in enumerate(part)]
            with torch.enable_grad():
                out = ctx.fn(*part)
            grads = torch.autograd.grad(out, [part[i] for i in wanted], grad_out[:, sl]) if wanted else ()
            for i, g in zip(wanted, grads):
                result[i] = _accumulate(result[i], g, args[i], ctx.token_dims[i], sl)
        return (None, None, *result)


def _tokens(args, token_dims) -> int:
    return next(a.shape[d] for a, d in zip(args, token_dims) if d is not None and isinstance(a, torch.Tensor))


def _slices_for(args, token_dims) -> list[slice]:
    first = next(a for a, d in zip(args, token_dims) if d is not None and isinstance(a, torch.Tensor))
    return token_slices(_tokens(args, token_dims), first.numel())


def _sliced(args, token_dims, sl: slice) -> list:
    return [a.narrow(d, sl.start, sl.stop - sl.start) if d is not None and isinstance(a, torch.Tensor) else a
            for a, d in zip(args, token_dims)]


def _accumulate(acc, grad, arg, dim, sl):
    """Gradient of one chunk into the whole: written into its token slice, or summed when shared."""
    if dim is None:
        return grad if acc is None else acc.add_(grad)
    if acc is None:
        if grad.shape[dim] == arg.shape[dim]:  # a single chunk: the gradient as autograd made it
            return grad
        acc = grad.new_zeros(arg.shape)
    acc.narrow(dim, sl.start, sl.stop - sl.start).copy_(grad)
    return acc


def use_kernels(x: torch.Tensor) -> bool:
    """Whether the fused Triton kernels serve x: real CUDA tensors (not the memory simulator's fake ones),
    Triton importable, VGEN_KERNELS not 0."""
    if not x.is_cuda or os.environ.get("VGEN_KERNELS", "1") == "0":
        return False
    from torch._subclasses.fake_tensor import is_fake

    from kernels import triton_available

    return not is_fake(x) and triton_available()


def norm_rope(x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor | None = None,
              sin: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm of x (B, N, heads, head_dim) over head_dim scaled by `weight`, then rotated by RoPE tables
    cos, sin (N, head_dim // 2). Either part may be absent (weight None: no norm; cos None: no RoPE)."""
    if weight is None and cos is None:
        return x
    if use_kernels(x) and x.dim() == 4 and x.shape[-1] % 2 == 0 and x.stride(-1) == 1 and (cos is None or not cos.requires_grad):
        from kernels import qk_norm_rope

        return qk_norm_rope.fused(x, weight, cos, sin, eps)
    # tokens are dim 1 of x and dim 0 of the RoPE tables; the weight is shared
    return _Recompute.apply(norm_rope_reference, (1, None, 0, 0, None), x, weight, cos, sin, eps)


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
    if (use_kernels(x) and isinstance(norm, torch.nn.LayerNorm) and tuple(norm.normalized_shape) == x.shape[-1:]
            and x.dim() == 3 and x.stride(-1) == 1):
        from kernels import norm_modulate as fused_norm_modulate

        return fused_norm_modulate.fused(x, shift, scale, norm.eps)
    return _Recompute.apply(_norm_then_modulate, (1, None, None, None), x, shift, scale, norm)


def _norm_then_modulate(x, shift, scale, norm):
    return modulate(norm(x), shift, scale)
