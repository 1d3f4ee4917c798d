"""Fixed sinusoidal absolute position embedding over the (t, h, w) token grid.

RoPE (vgen/models/rope.py) tells attention only the *offset* between two tokens. From pure noise, every
token of a RoPE-only DiT sees the same statistics, so its prediction at high noise cannot depend on the
frame index or the place in the frame: it cannot lay down E[x0 | "moving left"], whose frame 0 sits right
of its frame 7 (measured in conf/experiment/demo.yaml). Adding this table to the patch embeddings gives
every token its absolute place. No parameters; it extends to any grid.
"""

from __future__ import annotations

import torch

from vgen.models.rope import rope_split, row_index


def _sincos(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(n,) positions -> (n, dim) [sin, cos] features, frequencies 1 .. 1/10000 (dim even)."""
    half = dim // 2
    freqs = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / max(half, 1))
    angles = positions.to(torch.float64)[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed(grid: tuple[int, int, int], hidden: int, device=None, dtype=torch.float32,
                     rows: tuple | None = None) -> torch.Tensor:
    """(rows, hidden) embedding for tokens in (t, h, w) order; channels split between t, h, w like RoPE's.

    Args:
        rows: which token rows (`rope_tables`' row spec; a sequence-parallel rank's own); default all T*H*W.
    """
    T, H, W = grid
    dt, dh, dw = (2 * p for p in rope_split(hidden))
    idx = row_index(grid, rows or ("tokens", 0, T * H * W), "cpu")  # rows past the grid are padding
    t, h, w = idx // (H * W), (idx // W) % H, idx % W
    table = torch.cat([_sincos(t, dt), _sincos(h, dh), _sincos(w, dw)], dim=1)  # (N, hidden)
    return table.to(device=device, dtype=dtype)
