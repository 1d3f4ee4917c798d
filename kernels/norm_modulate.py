"""Fused LayerNorm + adaLN modulation, forward and backward, with its PyTorch reference beside it.

    y = layer_norm(x) * (1 + scale[:, None]) + shift[:, None]     x: (B, N, D), shift/scale: (B, D)

The LayerNorm has no weight or bias (adaLN supplies them per sample). Unfused, PyTorch writes the
normalised tokens, then the scaled ones, then the result, each a tensor the size of x (and keeps the
normalised tokens for backward). The kernels read x once per pass and compute in fp32 registers;
backward recomputes mean and 1/std from x (saved: only x, shift, scale). The per-sample gradients of
shift and scale are summed per program into a small (programs, B, D) fp32 buffer, never a copy of x.

Public functions: `fused(x, shift, scale, eps)` (the Triton kernels, differentiable) and
`reference(x, shift, scale, eps)` (PyTorch, the same math as vgen's unfused ops).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import triton_available

if triton_available():
    import triton
    import triton.language as tl

    from kernels._common import round_by_hand, rtne_bf16
else:  # the reference still works; `fused` raises
    triton = tl = None


def reference(x, shift, scale, eps: float = 1e-6):
    """The unfused ops: affine-free LayerNorm over the last dim, then adaLN modulation."""
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale[:, None]) + shift[:, None]


def fused(x, shift, scale, eps: float = 1e-6):
    """reference(...) in one Triton kernel per pass (forward, backward). Needs Triton (a GPU, or
    TRITON_INTERPRET=1 on CPU)."""
    if triton is None:
        raise RuntimeError("kernels.norm_modulate.fused needs Triton (pip install triton)")
    return _NormModulate.apply(x, shift, scale, float(eps))


if triton is not None:

    @triton.jit
    def _forward_kernel(x_ptr, shift_ptr, scale_ptr, y_ptr, N, D, sxb, sxn, syb, syn, ssb, eps,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ROUND: tl.constexpr):
        b = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        mask = (rows < N)[:, None] & cmask[None, :]
        x = tl.load(x_ptr + b * sxb + rows[:, None] * sxn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, 1) / D
        xc = tl.where(cmask[None, :], x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, 1) / D + eps)
        sh = tl.load(shift_ptr + b * ssb + cols, mask=cmask, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + b * ssb + cols, mask=cmask, other=0.0).to(tl.float32)
        y = xc * rstd[:, None] * (1 + sc[None, :]) + sh[None, :]
        if ROUND:
            y = rtne_bf16(y)
        tl.store(y_ptr + b * syb + rows[:, None] * syn + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward_kernel(x_ptr, scale_ptr, g_ptr, gx_ptr, gsh_ptr, gsc_ptr, B, N, D, sxb, sxn, sgb, sgn, ssb,
                         eps, n_tiles, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ROUND: tl.constexpr):
        pid, b = tl.program_id(0), tl.program_id(1)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        sc = tl.load(scale_ptr + b * ssb + cols, mask=cmask, other=0.0).to(tl.float32)
        gsh = tl.zeros((BLOCK_D,), dtype=tl.float32)
        gsc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for tile in range(pid, n_tiles, tl.num_programs(0)):  # a few programs per sample walk its tokens
            rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
            mask = (rows < N)[:, None] & cmask[None, :]
            x = tl.load(x_ptr + b * sxb + rows[:, None] * sxn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + b * sgb + rows[:, None] * sgn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            mean = tl.sum(x, 1) / D
            xc = tl.where(cmask[None, :], x - mean[:, None], 0.0)
            rstd = tl.rsqrt(tl.sum(xc * xc, 1) / D + eps)
            n = xc * rstd[:, None]
            gsh += tl.sum(g, 0)
            gsc += tl.sum(g * n, 0)
            gn = g * (1 + sc[None, :])
            mean_gn = tl.sum(gn, 1) / D
            mean_gnn = tl.sum(gn * n, 1) / D
            gx = rstd[:, None] * (gn - mean_gn[:, None] - n * mean_gnn[:, None])
            if ROUND:
                gx = rtne_bf16(gx)
            # gx is written contiguous (B, N, D)
            tl.store(gx_ptr + (b * N + rows[:, None]) * D + cols[None, :], gx.to(gx_ptr.dtype.element_ty), mask=mask)
        out = (pid * B + b) * D + cols
        tl.store(gsh_ptr + out, gsh, mask=cmask)
        tl.store(gsc_ptr + out, gsc, mask=cmask)


def _blocks(D: int, N: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(D)
    block_r = max(1, min(triton.next_power_of_2(N), 4096 // block_d))  # ~4K elements per tile
    return block_r, block_d


class _NormModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        B, N, D = x.shape
        if x.stride(-1) != 1:
            raise ValueError(f"norm_modulate needs x with a unit last stride, got strides {x.stride()}")
        shift, scale = shift.contiguous(), scale.contiguous()  # (B, D): small
        y = torch.empty((B, N, D), dtype=x.dtype, device=x.device)
        block_r, block_d = _blocks(D, N)
        _forward_kernel[(triton.cdiv(N, block_r), B)](
            x, shift, scale, y, N, D, x.stride(0), x.stride(1), y.stride(0), y.stride(1), shift.stride(0), eps,
            BLOCK_R=block_r, BLOCK_D=block_d, ROUND=round_by_hand(x.dtype))
        ctx.save_for_backward(x, scale)
        ctx.eps, ctx.shift_dtype = eps, shift.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        x, scale = ctx.saved_tensors
        B, N, D = x.shape
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        block_r, block_d = _blocks(D, N)
        n_tiles = triton.cdiv(N, block_r)
        programs = min(n_tiles, max(1, _max_programs(x.device) // B))
        gx = torch.empty((B, N, D), dtype=x.dtype, device=x.device)
        gsh = torch.empty((programs, B, D), dtype=torch.float32, device=x.device)
        gsc = torch.empty_like(gsh)
        _backward_kernel[(programs, B)](
            x, scale, grad, gx, gsh, gsc, B, N, D, x.stride(0), x.stride(1), grad.stride(0), grad.stride(1),
            scale.stride(0), ctx.eps, n_tiles, BLOCK_R=block_r, BLOCK_D=block_d, ROUND=round_by_hand(x.dtype))
        return gx, gsh.sum(0).to(ctx.shift_dtype), gsc.sum(0).to(scale.dtype), None


def _max_programs(device: torch.device) -> int:
    """Programs that walk the tokens in backward: a few per SM on a GPU (few partial gradients)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the CPU interpreter
