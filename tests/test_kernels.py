"""Triton kernels equal their PyTorch references, forward and gradients: fp32 within 1e-5, bf16 within one
bf16 rounding of the exact (fp32) result. On CPU they run under Triton's interpreter (TRITON_INTERPRET=1,
set by tests/conftest.py before anything imports triton); shapes are small because the interpreter is slow."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("without CUDA the kernels need TRITON_INTERPRET=1 before triton is imported (tests/conftest.py sets it)",
                allow_module_level=True)

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import kernels  # noqa: E402
from kernels import norm_modulate, qk_norm_rope  # noqa: E402
from vgen.models import lean_ops  # noqa: E402
from vgen.models.rope import rope_tables  # noqa: E402


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16_ROUNDING = 2.0**-8  # relative: half a bf16 unit in the last place


def qk_inputs(dtype, grid=(2, 3, 5), heads=3, head_dim=12, seed=0):
    """q as attention sees it: a strided view of the qkv projection output; head_dim 12 has 6 pairs, not
    a power of two, and 30 tokens fill no tile exactly."""
    gen = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1] * grid[2]
    qkv = torch.randn(2, n, 3, heads, head_dim, generator=gen)
    weight = 1 + 0.1 * torch.randn(head_dim, generator=gen)
    cos, sin = rope_tables(grid, head_dim)
    grad = torch.randn(2, n, heads, head_dim, generator=gen)
    return [t.to(DEVICE) for t in (qkv.to(dtype), weight.to(dtype), cos, sin, grad.to(dtype))]


def run_qk(fn, qkv, weight, cos, sin, grad, parts="norm+rope"):
    qkv = qkv.detach().requires_grad_()
    weight = weight.detach().requires_grad_() if "norm" in parts else None
    cos, sin = (cos, sin) if "rope" in parts else (None, None)
    out = fn(qkv[:, :, 0], weight, cos, sin, 1e-6)
    out.backward(grad)
    return [out.detach(), qkv.grad[:, :, 0]] + ([weight.grad] if weight is not None else [])


def mod_inputs(dtype, shape=(2, 37, 24), seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen) * 2 + 0.5
    shift, scale = (0.3 * torch.randn(shape[0], shape[2], generator=gen) for _ in range(2))
    grad = torch.randn(*shape, generator=gen)
    return [t.to(dtype).to(DEVICE) for t in (x, shift, scale, grad)]


def run_mod(fn, x, shift, scale, grad):
    x, shift, scale = (t.detach().requires_grad_() for t in (x, shift, scale))
    out = fn(x, shift, scale, 1e-6)
    out.backward(grad)
    return [out.detach(), x.grad, shift.grad, scale.grad]


def assert_fp32_equal(fused, ref):
    for a, b in zip(fused, ref, strict=True):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def assert_within_bf16_rounding(fused, exact):
    """Each fused bf16 value is the exact value rounded once (plus fp32 summation-order noise)."""
    for a, b in zip(fused, exact, strict=True):
        assert a.dtype == torch.bfloat16
        err = (a.float() - b).abs()
        bound = BF16_ROUNDING * b.abs() * (1 + 1e-3) + 1e-5 * b.abs().max()
        assert bool((err <= bound).all()), f"worst excess {float((err - bound).max()):.3g}"


@pytest.mark.parametrize("parts", ["norm+rope", "norm", "rope"])
def test_qk_norm_rope_fp32(parts):
    inputs = qk_inputs(torch.float32)
    assert_fp32_equal(run_qk(qk_norm_rope.fused, *inputs, parts), run_qk(qk_norm_rope.reference, *inputs, parts))


def test_qk_norm_rope_bf16():
    inputs = qk_inputs(torch.bfloat16)
    fused = run_qk(qk_norm_rope.fused, *inputs)
    exact = run_qk(qk_norm_rope.reference, *[t.float() for t in inputs])
    assert_within_bf16_rounding(fused, exact)
    # the unfused bf16 ops round several times: the kernel is at least as close to the exact result
    unfused = run_qk(qk_norm_rope.reference, *inputs)
    for f, u, e in zip(fused, unfused, exact):
        assert (f.float() - e).abs().mean() <= (u.float() - e).abs().mean()


def test_norm_modulate_fp32():
    inputs = mod_inputs(torch.float32)
    assert_fp32_equal(run_mod(norm_modulate.fused, *inputs), run_mod(norm_modulate.reference, *inputs))


def test_norm_modulate_bf16():
    inputs = mod_inputs(torch.bfloat16)
    fused = run_mod(norm_modulate.fused, *inputs)
    assert_within_bf16_rounding(fused, run_mod(norm_modulate.reference, *[t.float() for t in inputs]))


def test_references_are_the_models_unfused_ops():
    """The kernels' references compute what vgen's unfused ops compute, bitwise."""
    from torch import nn

    qkv, weight, cos, sin, _ = qk_inputs(torch.bfloat16, head_dim=16)
    q = qkv[:, :, 0]
    assert torch.equal(qk_norm_rope.reference(q, weight, cos, sin), lean_ops.norm_rope_reference(q, weight, cos, sin))
    x, shift, scale, _ = mod_inputs(torch.bfloat16)
    norm = nn.LayerNorm(x.shape[-1], elementwise_affine=False, eps=1e-6)
    assert torch.equal(norm_modulate.reference(x, shift, scale), lean_ops.modulate(norm(x), shift, scale))


class _BigTensors(TorchDispatchMode):
    """Counts the tensors at least `numel` large that ops create, and those of them in fp32."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.total, self.fp32 = numel, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel:
                self.total += 1
                self.fp32 += t.dtype == torch.float32
        return out


@pytest.mark.parametrize("kernel", ["qk_norm_rope", "norm_modulate"])
def test_no_fp32_copy_of_the_input(kernel):
    """Forward + backward of a fused kernel on bf16 inputs create no fp32 tensor the size of the input.
    (Under the interpreter Triton copies every argument, so only the dtype count is meaningful on CPU.)"""
    module = qk_norm_rope if kernel == "qk_norm_rope" else norm_modulate

    def fp32_tensors(fn, dtype):
        if kernel == "qk_norm_rope":
            qkv, weight, cos, sin, grad = qk_inputs(dtype)
            x, rest = qkv[:, :, 0].contiguous(), (weight, cos, sin)
        else:
            x, shift, scale, grad = mod_inputs(dtype)
            rest = (shift, scale)
        leaf = x.detach().requires_grad_()
        with _BigTensors(x.numel()) as mode:
            fn(leaf, *rest).backward(grad)
        return mode.fp32

    assert fp32_tensors(module.fused, torch.bfloat16) == 0
    assert fp32_tensors(module.fused, torch.float32) >= 2  # the count can fail: output and gradient count
    if kernel == "qk_norm_rope":  # the unfused ops upcast q and k explicitly
        assert fp32_tensors(module.reference, torch.bfloat16) >= 2


def test_lean_ops_call_the_kernels(monkeypatch):
    """Where use_kernels says so (CUDA in training; forced here on the interpreter), the lean ops route
    through the kernels and give the kernels' values."""
    from torch import nn

    monkeypatch.setattr(lean_ops, "use_kernels", lambda x: True)
    calls = []
    for mod in (qk_norm_rope, norm_modulate):
        original = mod.fused
        monkeypatch.setattr(mod, "fused", lambda *a, _f=original, **k: calls.append(_f) or _f(*a, **k))
    inputs = qk_inputs(torch.float32, head_dim=16)
    assert_fp32_equal(run_qk(lean_ops.norm_rope, *inputs), run_qk(lean_ops.norm_rope_reference, *inputs))
    x, shift, scale, grad = mod_inputs(torch.float32)
    norm = nn.LayerNorm(x.shape[-1], elementwise_affine=False, eps=1e-6)
    assert_fp32_equal(run_mod(lambda *a: lean_ops.norm_modulate(norm, *a[:3]), x, shift, scale, grad),
                      run_mod(lambda *a: lean_ops.modulate(norm(a[0]), a[1], a[2]), x, shift, scale, grad))
    assert len(calls) == 2


def test_lean_ops_stay_in_pytorch_without_cuda():
    x = torch.randn(1, 4, 2, 8)
    assert not lean_ops.use_kernels(x) and kernels.triton_available()
