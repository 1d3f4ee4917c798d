"""Fused attention with the log-sum-exp, forward and backward as two separate calls, for ring attention.

Ring attention (vgen/parallel/ring.py) computes a query chunk against several key chunks, one at a time,
and merges the partial outputs by their log-sum-exp (LSE). Its backward then runs each chunk pair's
kernel backward with the *merged* output and LSE (as ring-flash-attention does): the kernel recomputes the
probabilities as exp(s - lse_final) and its delta = rowsum(dO * O_final), which are the final ones. So the
ring needs a kernel whose forward returns the LSE and whose backward accepts an (out, lse) pair it did not
produce itself. `F.scaled_dot_product_attention` hides both; the ops below expose them. No kernel here
materialises the (Lq, Lk) score matrix; each works block by block with O(L) memory.

Which op runs (`kernel_name` says it, benchmarks record it):
  flash_attn   flash-attn 2's `flash_attn_func(..., return_attn_probs=True)` returns (out, lse) (no
               probabilities are built without dropout) and its `_flash_attn_backward` takes out and lse.
               CUDA with fp16/bf16 only, when the package is installed. Not run in CI (no GPU here).
  sdpa_efficient  PyTorch's memory-efficient CUDA kernel: `_scaled_dot_product_efficient_attention`
               with compute_log_sumexp=True, and its backward op. Any CUDA dtype. Not run in CI.
  sdpa_flash_cpu  PyTorch's fused CPU flash kernel: `_scaled_dot_product_flash_attention_for_cpu`
               returns (out, lse) and its `_backward` op takes them. This is what CI runs.

All functions use the (G, L, h, d) layout (groups, tokens, heads, head dim) of vgen's attention cores;
the LSE is (G, h, Lq) in fp32 whatever the input dtype.
"""

from __future__ import annotations

import importlib.util
import inspect

import torch
from torch.utils import flop_counter

aten = torch.ops.aten
_HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
_CPU_FWD = aten._scaled_dot_product_flash_attention_for_cpu
_CPU_BWD = aten._scaled_dot_product_flash_attention_for_cpu_backward


def kernel_name(q: torch.Tensor) -> str:
    """The kernel `attention_forward`/`attention_backward` use for tensors like `q`."""
    if q.is_cuda:
        if _HAS_FLASH_ATTN and q.dtype in (torch.float16, torch.bfloat16):
            return "flash_attn"
        return "sdpa_efficient"
    return "sdpa_flash_cpu"


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)  # (G, L, h, d) -> (G, h, L, d), a view: the SDPA ops take strided inputs


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Non-causal attention of every group's queries over its keys.

    Args:
        q: (G, Lq, h, d); k, v: (G, Lk, h, d), same dtype and device.
        scale: the softmax scale (1/sqrt(d) for the model's attention).
    Returns:
        out (G, Lq, h, d) in q's dtype, lse (G, h, Lq) fp32.
    """
    name = kernel_name(q)
    if name == "flash_attn":
        from flash_attn import flash_attn_func

        # return_attn_probs=True is the public way to get the LSE; without dropout no probabilities are built
        out, lse, _ = flash_attn_func(q, k, v, softmax_scale=scale, return_attn_probs=True)
        return out, lse
    if name == "sdpa_efficient":
        out, lse, _, _ = aten._scaled_dot_product_efficient_attention(
            _heads_first(q), _heads_first(k), _heads_first(v), None, True, 0.0, False, scale=scale)
        return out.transpose(1, 2), lse[..., : q.shape[1]].float()  # the kernel pads the LSE rows to 32
    out, lse = _CPU_FWD(_heads_first(q), _heads_first(k), _heads_first(v), 0.0, False, scale=scale)
    return out.transpose(1, 2), lse


def attention_backward(dout, q, k, v, out, lse, scale: float):
    """Gradients of q, k, v for one group batch, given the (possibly merged, final) `out` and `lse`.

    Args:
        dout, out: (G, Lq, h, d) in q's dtype; q: (G, Lq, h, d); k, v: (G, Lk, h, d).
        lse: (G, h, Lq) fp32.
    Returns:
        dq, dk, dv in the layout and dtype of q, k, v.
    """
    name = kernel_name(q)
    if name == "flash_attn":
        return _flash_attn_backward(dout, q, k, v, out, lse, scale)
    if name == "sdpa_efficient":
        rows = -(-lse.shape[-1] // 32) * 32  # the op expects the LSE as its forward padded it
        lse = torch.nn.functional.pad(lse, (0, rows - lse.shape[-1]))
        seed = offset = torch.zeros((), dtype=torch.int64, device=q.device)  # unused without dropout
        grads = aten._scaled_dot_product_efficient_attention_backward(
            *map(_heads_first, (dout, q, k, v)), None, _heads_first(out), lse, seed, offset, 0.0,
            [True, True, True, False], False, scale=scale)
        return tuple(g.transpose(1, 2) for g in grads[:3])
    grads = _CPU_BWD(*map(_heads_first, (dout, q, k, v, out)), lse, 0.0, False, scale=scale)
    return tuple(g.transpose(1, 2) for g in grads)


def _flash_attn_backward(dout, q, k, v, out, lse, scale):
    """flash-attn's internal backward; its keyword names changed across 2.x (window_size split in two,
    softcap added), so pass only the ones this installed version takes."""
    from flash_attn import flash_attn_interface as fai

    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    args = dict(dout=dout.contiguous(), q=q, k=k, v=v, out=out, softmax_lse=lse, dq=dq, dk=dk, dv=dv,
                dropout_p=0.0, softmax_scale=scale, causal=False, window_size=(-1, -1), window_size_left=-1,
                window_size_right=-1, softcap=0.0, alibi_slopes=None, deterministic=False, rng_state=None)
    fai._flash_attn_backward(**{n: args[n] for n in inspect.signature(fai._flash_attn_backward).parameters if n in args})
    return dq, dk, dv


def _register_cpu_flops() -> None:
    """torch's FlopCounterMode knows the CUDA SDPA ops but not the CPU flash kernel (it counts 0 for it, so
    also for F.scaled_dot_product_attention on CPU). Register the same formulas torch uses for the CUDA ops."""
    if _CPU_FWD not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(_CPU_FWD)(
            lambda q, k, v, *args, out_shape=None, **kw: flop_counter.sdpa_flop_count(q, k, v))
    if _CPU_BWD not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(_CPU_BWD)(
            lambda g, q, k, v, *args, out_shape=None, **kw: flop_counter.sdpa_backward_flop_count(g, q, k, v))


_register_cpu_flops()
