"""3D rotary position embedding over the (t, h, w) token grid."""

from __future__ import annotations

import torch


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Frequency pairs given to (t, h, w): h and w get 3/8 each, t the rest."""
    pairs = head_dim // 2
    ph = pw = pairs * 3 // 8
    return pairs - ph - pw, ph, pw


def _axis_angles(positions: torch.Tensor, pairs: int, theta: float) -> torch.Tensor:
    freqs = theta ** (-torch.arange(pairs, dtype=torch.float64) / max(pairs, 1))
    return positions.to(torch.float64)[:, None] * freqs[None, :]  # (n, pairs)


def rope_tables(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0, device=None):
    """cos, sin tables of shape (T*H*W, head_dim // 2) for tokens in (t, h, w) order."""
    T, H, W = grid
    pt, ph, pw = rope_split(head_dim)
    t = torch.arange(T).repeat_interleave(H * W)
    h = torch.arange(H).repeat_interleave(W).repeat(T)
    w = torch.arange(W).repeat(T * H)
    angles = torch.cat([_axis_angles(t, pt, theta), _axis_angles(h, ph, theta), _axis_angles(w, pw, theta)], dim=1)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of x (B, N, heads, head_dim) by the per-token angles (N, head_dim // 2)."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, N, h, d/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)
    return out.flatten(-2).to(x.dtype)
