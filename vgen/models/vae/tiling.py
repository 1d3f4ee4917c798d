"""Spatial tiling and temporal chunking: bound a VAE pass's memory by the tile, not the video.

A pass runs tile by tile (outer loop) and, inside a tile, chunk by chunk in time with one causal cache,
so the live activations are those of one tile x one chunk plus that tile's cached past frames. Each
chunk's output is blended straight into the preallocated result, so nothing else grows with the video.

Tiles lie on a grid of latent cells (a cell is `ratio` x `ratio` pixels), are evenly spread so the last
one ends at the border, and overlap by at least `overlap` pixels. Over each overlap the two tiles'
weights ramp linearly and sum to one; weights are separable (height x width), so four-way corners sum
to one too. Encoding blends in latent space, decoding in pixel space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch


@dataclass(frozen=True)
class Tiling:
    """How to split a pass. tile: pixels, int or (h, w), None = whole frame; overlap: pixels;
    chunk: latent frames per temporal chunk, None = whole clip at once."""

    tile: object = None
    overlap: int = 64
    chunk: Optional[int] = 1

    def checked(self, ratio: int) -> "Tiling":
        """This tiling with `tile` as an (h, w) tuple, after checking it against the spatial ratio."""
        if self.chunk is not None and int(self.chunk) < 1:
            raise ValueError(f"chunk_frames={self.chunk} must be >= 1 latent frame, or None for no chunking")
        if self.tile is None:
            return self
        tile = (self.tile, self.tile) if isinstance(self.tile, int) else tuple(self.tile)
        for t in tile:
            if t <= 0 or t % ratio:
                raise ValueError(f"tile_size={self.tile} must be positive multiples of the spatial ratio {ratio}")
        if self.overlap < 0 or self.overlap % ratio or self.overlap >= min(tile):
            raise ValueError(
                f"tile_overlap={self.overlap} must be a multiple of {ratio} in [0, smallest tile side {min(tile)})"
            )
        return Tiling(tile=tile, overlap=self.overlap, chunk=self.chunk)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start of each tile along an axis of `size` cells: the fewest tiles of `tile` cells overlapping by
    at least `overlap` cells, evenly spread from 0 to size - tile."""
    if size <= tile:
        return [0]
    n = 1 + math.ceil((size - tile) / (tile - overlap))
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def axis_weights(starts: list[int], tile: int, size: int, scale: int) -> list[torch.Tensor]:
    """Blend weights of each tile along one axis, in output units (cells x `scale`).

    A tile ramps up linearly across its overlap with the previous tile and down across its overlap with
    the next; the ramps are then divided by their sum, so the weights add up to exactly 1 everywhere.
    """
    ramps, total = [], torch.zeros(size * scale, dtype=torch.float64)
    for i, s in enumerate(starts):
        w = torch.ones(tile * scale, dtype=torch.float64)
        if i > 0 and (ov := (starts[i - 1] + tile - s) * scale) > 0:
            w[:ov] = torch.minimum(w[:ov], torch.arange(1, ov + 1) / (ov + 1))
        if i + 1 < len(starts) and (ov := (s + tile - starts[i + 1]) * scale) > 0:
            w[-ov:] = torch.minimum(w[-ov:], torch.arange(ov, 0, -1) / (ov + 1))
        total[s * scale : (s + tile) * scale] += w
        ramps.append(w)
    return [w / total[s * scale : (s + tile) * scale] for w, s in zip(ramps, starts)]


def temporal_chunks(latent_frames: int, chunk: Optional[int], ratio: int):
    """Yield ((l0, l1), (p0, p1)): a range of latent frames and the pixel frames it covers.

    Latent frame 0 covers pixel frame 0 alone; latent frame l >= 1 covers pixel frames
    1 + ratio * (l - 1) ... ratio * l. `chunk` latent frames per chunk; None = one chunk.
    """
    step = chunk or latent_frames
    for l0 in range(0, latent_frames, step):
        l1 = min(l0 + step, latent_frames)
        p0 = 0 if l0 == 0 else 1 + ratio * (l0 - 1)
        yield (l0, l1), (p0, 1 + ratio * (l1 - 1))


Stream = Callable[[torch.Tensor], Iterator[tuple[int, torch.Tensor]]]


def tiled_apply(
    stream: Stream,
    x: torch.Tensor,
    out_shape: tuple,
    cells: tuple[int, int],
    scale_in: int,
    scale_out: int,
    tiling: Tiling,
    ratio: int,
) -> torch.Tensor:
    """Run `stream` over overlapping spatial tiles of `x` and blend its outputs into one tensor.

    Args:
        stream: maps an input tile (B, C, T, h, w) to an iterator of (t0, y): output frames t0 ...
            t0 + y.shape[2] of that tile, y of shape (B, C_out, t, h', w'), in order.
        x: (B, C, T, H, W) input; the grid has `cells` = (H, W) / scale_in cells.
        out_shape: (B, C_out, T_out, H_out, W_out) of the result, H_out = cells[0] * scale_out.
        scale_in / scale_out: input / output pixels per cell along each spatial axis.
        tiling: tile and overlap in pixels of the *video* (`ratio` video pixels per cell).
        ratio: the VAE's spatial compression (video pixels per latent cell).
    """
    hc, wc = cells
    if tiling.tile is None:
        th, tw, ov = hc, wc, 0
    else:
        th, tw = min(tiling.tile[0] // ratio, hc), min(tiling.tile[1] // ratio, wc)
        ov = tiling.overlap // ratio
    ys, xs = tile_starts(hc, th, ov), tile_starts(wc, tw, ov)
    wy, wx = axis_weights(ys, th, hc, scale_out), axis_weights(xs, tw, wc, scale_out)
    out = None
    for i, y0 in enumerate(ys):
        for j, x0 in enumerate(xs):
            tile_in = x[..., y0 * scale_in : (y0 + th) * scale_in, x0 * scale_in : (x0 + tw) * scale_in]
            w = None
            for t0, y in stream(tile_in):
                if out is None:  # dtype/device from the model's output
                    out = torch.zeros(out_shape, dtype=y.dtype, device=y.device)
                if w is None:
                    w = (wy[i][:, None] * wx[j][None, :]).to(dtype=y.dtype, device=y.device)
                dst = out[:, :, t0 : t0 + y.shape[2]]
                dst = dst[..., y0 * scale_out : (y0 + th) * scale_out, x0 * scale_out : (x0 + tw) * scale_out]
                dst.addcmul_(y, w)  # in place: no video-sized temporary
    return out
