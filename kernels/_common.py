"""Pieces the kernels share (imported only when Triton is)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def round_by_hand(dtype: torch.dtype) -> bool:
    """Triton's CPU interpreter truncates fp32 -> bf16 casts where a GPU rounds to nearest even: there the
    kernels round by hand first, so CPU tests check the values a GPU writes."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def rtne_bf16(y):
    """fp32 values rounded to the nearest bf16 (ties to even), still as fp32: the cast after is exact."""
    bits = y.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
