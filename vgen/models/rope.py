"""3D rotary position embedding over the (t, h, w) token grid.

Tables are built on the device the model runs on, only for the rows a rank needs (its token shard under
sequence parallelism), and cached per (grid, rows, device): a training run sees a few bucket grids, so
after the first step of each the tables cost nothing.
"""

from __future__ import annotations

import functools

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Frequency pairs given to (t, h, w): h and w get 3/8 each, t the rest."""
    pairs = head_dim // 2
    ph = pw = pairs * 3 // 8
    return pairs - ph - pw, ph, pw


def _axis_angles(positions: torch.Tensor, pairs: int, theta: float) -> torch.Tensor:
    freqs = theta ** (-torch.arange(pairs, dtype=torch.float64, device=positions.device) / max(pairs, 1))
    return positions.to(torch.float64)[:, None] * freqs[None, :]  # (n, pairs)


def _build(grid, head_dim: int, theta: float, index: torch.Tensor):
    """cos, sin (len(index), head_dim // 2) for global token indices; indices past the grid (padding)
    get the identity rotation."""
    T, H, W = grid
    pt, ph, pw = rope_split(head_dim)
    real = index < T * H * W
    t, h, w = index // (H * W), index // W % H, index % W
    angles = torch.cat([_axis_angles(t, pt, theta), _axis_angles(h, ph, theta), _axis_angles(w, pw, theta)], dim=1)
    angles = angles * real[:, None]
    return angles.cos().float(), angles.sin().float()


@functools.lru_cache(maxsize=32)
def _cached(grid, head_dim: int, theta: float, rows: tuple, device: torch.device):
    return _build(grid, head_dim, theta, row_index(grid, rows, device))


def row_index(grid, rows: tuple, device) -> torch.Tensor:
    """rows: ("tokens", start, stop): tokens start..stop-1 in (t, h, w) order; ("positions", p0, p1): every
    frame's spatial positions p0..p1-1, in (t, position) order (switch's temporal layout)."""
    kind, a, b = rows
    if kind == "tokens":
        return torch.arange(a, b, device=device)
    T, H, W = grid
    return (torch.arange(T, device=device)[:, None] * (H * W) + torch.arange(a, b, device=device)[None]).reshape(-1)


def rope_tables(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0, device=None, rows: tuple | None = None):
    """cos, sin tables of shape (rows, head_dim // 2) on `device`.

    Args:
        grid: the (T, H, W) token grid.
        rows: which rows (see row_index); default all T*H*W tokens in (t, h, w) order.
    """
    grid = tuple(int(g) for g in grid)
    rows = rows or ("tokens", 0, grid[0] * grid[1] * grid[2])
    device = torch.device(device or "cpu")
    if _get_current_dispatch_mode_stack() or device.type == "meta":  # fake/tracing modes: never cache their tensors
        return _build(grid, head_dim, theta, row_index(grid, rows, device))
    return _cached(grid, head_dim, float(theta), tuple(rows), device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of x (B, N, heads, head_dim) by the per-token angles (N, head_dim // 2)."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, N, h, d/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)
    return out.flatten(-2).to(x.dtype)
