"""Triton kernels for vgen, each with a PyTorch reference beside it.

    kernels.qk_norm_rope.fused / .reference      QK RMSNorm + RoPE (attention's q and k)
    kernels.norm_modulate.fused / .reference     LayerNorm + adaLN modulation (the block's norms)

The lean ops (vgen/models/lean_ops.py) call the fused kernels on CUDA tensors when Triton is importable
(set VGEN_KERNELS=0 to keep the PyTorch path). On CPU they run under Triton's interpreter
(TRITON_INTERPRET=1), which is how CI checks them against the references.

This package shares its import name with Hugging Face's `kernels` distribution, which transformers
probes for; tests/test_text_encoder.py keeps transformers' encoders importable with vgen installed.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether Triton imports (its CPU interpreter needs TRITON_INTERPRET=1 set before the import)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install without a usable backend
        return False
    return True
