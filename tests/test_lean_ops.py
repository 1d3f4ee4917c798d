"""The lean pointwise ops give bitwise the values and gradients of the unfused ops, and keep less."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vgen.models.lean_ops import modulate, norm_modulate, norm_rope, norm_rope_reference
from vgen.models.rope import rope_tables

GRID = (2, 3, 4)  # 24 tokens
HEADS, HEAD_DIM = 3, 16


def inputs(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # a view with a stride, as q is a slice of the qkv projection output
    qkv = torch.randn(2, 24, 3, HEADS, HEAD_DIM, generator=gen).to(dtype)
    x = qkv.requires_grad_()
    weight = (1 + 0.1 * torch.randn(HEAD_DIM, generator=gen)).to(dtype).requires_grad_()
    cos, sin = rope_tables(GRID, HEAD_DIM)
    grad = torch.randn(2, 24, HEADS, HEAD_DIM, generator=gen).to(dtype)
    return x, weight, cos, sin, grad


def run(fn, x, weight, cos, sin, grad):
    x.grad = None
    if weight is not None:
        weight.grad = None
    out = fn(x[:, :, 0], weight, cos, sin, 1e-6)
    out.backward(grad)
    return out.detach(), x.grad.clone(), None if weight is None else weight.grad.clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("parts", ["norm+rope", "norm", "rope"])
def test_norm_rope_is_bitwise_the_reference(dtype, parts):
    x, weight, cos, sin, grad = inputs(dtype)
    if parts == "rope":
        weight = None
    if parts == "norm":
        cos = sin = None
    lean = run(norm_rope, x, weight, cos, sin, grad)
    ref = run(norm_rope_reference, x, weight, cos, sin, grad)
    assert ref[1].abs().sum() > 0
    for a, b in zip(lean, ref):
        assert (a is None and b is None) or torch.equal(a, b)


def new_saved_bytes(fn, *args) -> int:
    """Bytes of the storages autograd keeps for backward that are not storages of the arguments."""
    own = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(kept.values())


def test_norm_rope_keeps_only_its_inputs():
    x, weight, cos, sin, _ = inputs(torch.bfloat16)
    q = x[:, :, 0]  # a view of the qkv storage, which attention keeps anyway
    assert new_saved_bytes(norm_rope, q, weight, cos, sin, 1e-6) == 0
    # the unfused ops keep an fp32 copy of q and the bf16 normalised q: 3x q's own bytes
    assert new_saved_bytes(norm_rope_reference, q, weight, cos, sin, 1e-6) >= 3 * q.nbytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_modulate_is_bitwise_the_reference(dtype):
    gen = torch.Generator().manual_seed(3)
    norm = nn.LayerNorm(8, elementwise_affine=False, eps=1e-6)
    x, shift, scale = (torch.randn(*s, generator=gen).to(dtype).requires_grad_() for s in ((2, 5, 8), (2, 8), (2, 8)))
    grad = torch.randn(2, 5, 8, generator=gen).to(dtype)
    results = []
    for fn in (lambda: norm_modulate(norm, x, shift, scale), lambda: modulate(norm(x), shift, scale)):
        for t in (x, shift, scale):
            t.grad = None
        out = fn()
        out.backward(grad)
        results.append([out.detach(), x.grad.clone(), shift.grad.clone(), scale.grad.clone()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_norm_modulate_refuses_a_norm_with_weights():
    with pytest.raises(ValueError, match="without parameters"):
        norm_modulate(nn.LayerNorm(8), torch.randn(1, 2, 8), torch.zeros(1, 8), torch.zeros(1, 8))


def test_long_inputs_run_in_chunks_with_the_same_results(monkeypatch):
    """Above CHUNK_THRESHOLD elements the ops run CHUNKS token slices one at a time; per-token results stay bitwise, the
    gradients of shared weights are summed slice by slice (float rounding only)."""
    import vgen.models.lean_ops as lean_ops

    x, weight, cos, sin, grad = inputs(torch.float32)
    ref = run(norm_rope_reference, x, weight, cos, sin, grad)
    monkeypatch.setattr(lean_ops, "CHUNK_THRESHOLD", 100)  # every input here is chunked
    monkeypatch.setattr(lean_ops, "CHUNKS", 5)  # 24 tokens in uneven slices
    chunked = run(norm_rope, x, weight, cos, sin, grad)
    assert torch.equal(chunked[0], ref[0]) and torch.equal(chunked[1], ref[1])
    assert torch.allclose(chunked[2], ref[2], rtol=1e-5, atol=0) and not torch.equal(chunked[2], torch.zeros_like(ref[2]))

    gen = torch.Generator().manual_seed(4)
    norm = nn.LayerNorm(8, elementwise_affine=False)
    xs, shift, scale = (torch.randn(*s, generator=gen).requires_grad_() for s in ((2, 24, 8), (2, 8), (2, 8)))
    g = torch.randn(2, 24, 8, generator=gen)
    (norm_modulate(norm, xs, shift, scale) * g).sum().backward()
    lean_grads = [t.grad.clone() for t in (xs, shift, scale)]
    for t in (xs, shift, scale):
        t.grad = None
    (modulate(norm(xs), shift, scale) * g).sum().backward()
    for a, t in zip(lean_grads, (xs, shift, scale)):
        assert torch.allclose(a, t.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["spatial", "temporal"])
def test_group_sliced_attention_matches_one_call(kind):
    """An attention core in group slices (as the nested policy sets it) gives the one-call values and
    gradients; its backward keeps only q, k, v."""
    from vgen.models.attention import AttentionCore

    gen = torch.Generator().manual_seed(5)
    grid = (5, 3, 4)  # 5 frames of 12 positions: uneven slices either way
    q, k, v = (torch.randn(2, 60, HEADS, HEAD_DIM, generator=gen).requires_grad_() for _ in range(3))
    grad = torch.randn(2, 60, HEADS, HEAD_DIM, generator=gen)
    results = []
    for chunks in (1, 3):
        core = AttentionCore(kind, backend="sdpa")
        core.group_chunks = chunks
        for t in (q, k, v):
            t.grad = None
        out = core(q, k, v, grid)
        out.backward(grad)
        results.append([out.detach(), *(t.grad.clone() for t in (q, k, v))])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    core = AttentionCore(kind, backend="sdpa")
    core.group_chunks = 3
    assert new_saved_bytes(lambda *a: core(*a, grid), q, k, v) <= 3 * q.nbytes  # grouped copies at most
