"""Fused QK RMSNorm + RoPE, forward and backward, with its PyTorch reference beside it.

    y = rope(rms_norm(x) * weight, cos, sin)      x: (B, N, heads, head_dim), any strides but the last

Unfused, PyTorch makes an fp32 copy of q (or k), the normalised values, their rounded copy and the
rotated result, and keeps some of them for backward. The kernels read x once per pass, do everything in
fp32 registers and write one output; backward recomputes the norm from x (saved: only x, which is a view
of the qkv projection attention keeps anyway). The weight's gradient is summed per program into a small
(programs, head_dim) fp32 buffer, never a copy of the input.

Public functions: `fused(x, weight, cos, sin, eps)` (the Triton kernels, differentiable) and
`reference(x, weight, cos, sin, eps)` (PyTorch, the same math as vgen's unfused ops). Either of weight
(no norm) and cos/sin (no RoPE) may be None. RoPE rotates interleaved channel pairs (2i, 2i + 1) by the
per-token angle tables cos, sin (N, head_dim // 2), as vgen/models/rope.py does.
"""

from __future__ import annotations

import torch

from kernels import triton_available

if triton_available():
    import triton
    import triton.language as tl

    from kernels._common import round_by_hand, rtne_bf16
else:  # the reference still works; `fused` raises
    triton = tl = None


def reference(x, weight, cos, sin, eps: float = 1e-6):
    """The unfused ops: RMSNorm in fp32 rounded to x's dtype, times weight; then RoPE in fp32, rounded."""
    y = x
    if weight is not None:
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    if cos is None:
        return y
    yf = y.float().unflatten(-1, (-1, 2))  # (B, N, h, d/2, 2)
    y0, y1 = yf[..., 0], yf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([y0 * c - y1 * s, y0 * s + y1 * c], dim=-1).flatten(-2).to(x.dtype)


def fused(x, weight, cos, sin, eps: float = 1e-6):
    """reference(...) in one Triton kernel per pass (forward, backward). Needs Triton (a GPU, or
    TRITON_INTERPRET=1 on CPU). cos and sin get no gradient."""
    if triton is None:
        raise RuntimeError("kernels.qk_norm_rope.fused needs Triton (pip install triton)")
    if weight is None and cos is None:
        return x
    return _QKNormRope.apply(x, weight, cos, sin, float(eps))


if triton is not None:

    @triton.jit
    def _row_offsets(rows, H, N, sxb, sxn, sxh):
        b = rows // (N * H)
        n = (rows // H) % N
        h = rows % H
        return b * sxb + n * sxn + h * sxh, n

    @triton.jit
    def _forward_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, y_ptr, n_rows, H, N, sxb, sxn, sxh, syb, syn, syh, scn,
                        half, eps, HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_P: tl.constexpr, ROUND: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        pairs = tl.arange(0, BLOCK_P)
        mask = (rows < n_rows)[:, None] & (pairs < half)[None, :]
        xoff, n = _row_offsets(rows, H, N, sxb, sxn, sxh)
        even = xoff[:, None] + 2 * pairs[None, :]
        x0 = tl.load(x_ptr + even, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_R, BLOCK_P) channel 2i
        x1 = tl.load(x_ptr + even + 1, mask=mask, other=0.0).to(tl.float32)  # channel 2i + 1
        if HAS_NORM:
            r = tl.rsqrt((tl.sum(x0 * x0, 1) + tl.sum(x1 * x1, 1)) / (2 * half) + eps)
            w0 = tl.load(w_ptr + 2 * pairs, mask=pairs < half, other=0.0).to(tl.float32)
            w1 = tl.load(w_ptr + 2 * pairs + 1, mask=pairs < half, other=0.0).to(tl.float32)
            x0 = x0 * r[:, None] * w0[None, :]
            x1 = x1 * r[:, None] * w1[None, :]
        if HAS_ROPE:
            toff = n[:, None] * scn + pairs[None, :]
            c = tl.load(cos_ptr + toff, mask=mask, other=1.0).to(tl.float32)
            s = tl.load(sin_ptr + toff, mask=mask, other=0.0).to(tl.float32)
            x0, x1 = x0 * c - x1 * s, x0 * s + x1 * c
        yoff, _ = _row_offsets(rows, H, N, syb, syn, syh)
        yeven = yoff[:, None] + 2 * pairs[None, :]
        if ROUND:
            x0, x1 = rtne_bf16(x0), rtne_bf16(x1)
        tl.store(y_ptr + yeven, x0.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(y_ptr + yeven + 1, x1.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, g_ptr, gx_ptr, gw_ptr, n_rows, H, N, sxb, sxn, sxh,
                         sgb, sgn, sgh, scn, half, eps, n_tiles, HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, ROUND: tl.constexpr):
        pid = tl.program_id(0)
        pairs = tl.arange(0, BLOCK_P)
        pmask = pairs < half
        if HAS_NORM:
            w0 = tl.load(w_ptr + 2 * pairs, mask=pmask, other=0.0).to(tl.float32)
            w1 = tl.load(w_ptr + 2 * pairs + 1, mask=pmask, other=0.0).to(tl.float32)
        gw0 = tl.zeros((BLOCK_P,), dtype=tl.float32)
        gw1 = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for tile in range(pid, n_tiles, tl.num_programs(0)):  # a few programs walk all rows: small gw buffer
            rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
            mask = (rows < n_rows)[:, None] & pmask[None, :]
            goff, n = _row_offsets(rows, H, N, sgb, sgn, sgh)
            geven = goff[:, None] + 2 * pairs[None, :]
            g0 = tl.load(g_ptr + geven, mask=mask, other=0.0).to(tl.float32)
            g1 = tl.load(g_ptr + geven + 1, mask=mask, other=0.0).to(tl.float32)
            if HAS_ROPE:  # the transpose of the rotation: rotate back
                toff = n[:, None] * scn + pairs[None, :]
                c = tl.load(cos_ptr + toff, mask=mask, other=1.0).to(tl.float32)
                s = tl.load(sin_ptr + toff, mask=mask, other=0.0).to(tl.float32)
                g0, g1 = g0 * c + g1 * s, g1 * c - g0 * s
            if HAS_NORM:
                xoff, _ = _row_offsets(rows, H, N, sxb, sxn, sxh)
                xeven = xoff[:, None] + 2 * pairs[None, :]
                x0 = tl.load(x_ptr + xeven, mask=mask, other=0.0).to(tl.float32)
                x1 = tl.load(x_ptr + xeven + 1, mask=mask, other=0.0).to(tl.float32)
                r = tl.rsqrt((tl.sum(x0 * x0, 1) + tl.sum(x1 * x1, 1)) / (2 * half) + eps)
                n0, n1 = x0 * r[:, None], x1 * r[:, None]
                gw0 += tl.sum(g0 * n0, 0)
                gw1 += tl.sum(g1 * n1, 0)
                g0, g1 = g0 * w0[None, :], g1 * w1[None, :]  # gradient of the normalised values
                dot = (tl.sum(g0 * n0, 1) + tl.sum(g1 * n1, 1)) / (2 * half)
                g0 = r[:, None] * (g0 - n0 * dot[:, None])
                g1 = r[:, None] * (g1 - n1 * dot[:, None])
            # gx is written contiguous (B, N, H, head_dim)
            gxeven = rows[:, None] * (2 * half) + 2 * pairs[None, :]
            if ROUND:
                g0, g1 = rtne_bf16(g0), rtne_bf16(g1)
            tl.store(gx_ptr + gxeven, g0.to(gx_ptr.dtype.element_ty), mask=mask)
            tl.store(gx_ptr + gxeven + 1, g1.to(gx_ptr.dtype.element_ty), mask=mask)
        if HAS_NORM:
            tl.store(gw_ptr + pid * 2 * half + 2 * pairs, gw0, mask=pmask)
            tl.store(gw_ptr + pid * 2 * half + 2 * pairs + 1, gw1, mask=pmask)


def _blocks(head_dim: int, n_rows: int) -> tuple[int, int]:
    block_p = triton.next_power_of_2(max(head_dim // 2, 1))
    block_r = max(1, min(triton.next_power_of_2(n_rows), 4096 // block_p))  # ~4K elements per tile
    return block_r, block_p


class _QKNormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, cos, sin, eps):
        B, N, H, D = x.shape
        if D % 2 or x.stride(-1) != 1:
            raise ValueError(f"qk_norm_rope needs an even head_dim with unit stride, got {tuple(x.shape)} {x.stride()}")
        has_norm, has_rope = weight is not None, cos is not None
        if has_rope and (cos.stride(-1) != 1 or sin.stride() != cos.stride()):
            cos, sin = cos.contiguous(), sin.contiguous()  # (N, D/2) tables: small
        y = torch.empty((B, N, H, D), dtype=x.dtype, device=x.device)
        n_rows = B * N * H
        block_r, block_p = _blocks(D, n_rows)
        dummy = x.new_empty(0)
        _forward_kernel[(triton.cdiv(n_rows, block_r),)](
            x, weight if has_norm else dummy, cos if has_rope else dummy, sin if has_rope else dummy, y,
            n_rows, H, N, x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
            cos.stride(0) if has_rope else 0, D // 2, eps, HAS_NORM=has_norm, HAS_ROPE=has_rope,
            BLOCK_R=block_r, BLOCK_P=block_p, ROUND=round_by_hand(x.dtype))
        ctx.save_for_backward(x, weight, cos, sin)
        ctx.eps, ctx.has_norm, ctx.has_rope = eps, has_norm, has_rope
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, cos, sin = ctx.saved_tensors
        B, N, H, D = x.shape
        if grad.stride(-1) != 1:
            grad = grad.contiguous()
        n_rows = B * N * H
        block_r, block_p = _blocks(D, n_rows)
        n_tiles = triton.cdiv(n_rows, block_r)
        programs = min(n_tiles, _max_programs(x.device))
        gx = torch.empty((B, N, H, D), dtype=x.dtype, device=x.device)
        gw = torch.empty((programs, D) if ctx.has_norm else (0,), dtype=torch.float32, device=x.device)
        dummy = x.new_empty(0)
        _backward_kernel[(programs,)](
            x, weight if ctx.has_norm else dummy, cos if ctx.has_rope else dummy, sin if ctx.has_rope else dummy,
            grad, gx, gw, n_rows, H, N, x.stride(0), x.stride(1), x.stride(2), grad.stride(0), grad.stride(1),
            grad.stride(2), cos.stride(0) if ctx.has_rope else 0, D // 2, ctx.eps, n_tiles,
            HAS_NORM=ctx.has_norm, HAS_ROPE=ctx.has_rope, BLOCK_R=block_r, BLOCK_P=block_p,
            ROUND=round_by_hand(x.dtype))
        grad_w = gw.sum(0).to(weight.dtype) if ctx.has_norm and ctx.needs_input_grad[1] else None
        return gx if ctx.needs_input_grad[0] else None, grad_w, None, None, None


def _max_programs(device: torch.device) -> int:
    """Programs that walk the rows in backward: a few per SM on a GPU (few partial weight gradients)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the CPU interpreter
