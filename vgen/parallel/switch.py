"""Switch sequence parallelism (the dimension switching of VideoSys DSP, arXiv 2403.10266): tokens are
sharded by whole frames, so spatial attention (one frame) and cross-attention (per token) run locally with
no communication. Temporal attention needs every frame of a spatial position, so the block's temporal
seam (`STBlock.temporal_seam`) switches the layout of the block's normalised input `h` from "my frames,
all positions" to "all frames, my positions", runs the whole temporal layer (projections, QK norm, RoPE,
attention, output projection) there, and switches its output back: 2 activations of the local shard per
block, each times (n-1)/n, in the model's dtype, against Ulysses' 8 (q, k, v and output of spatial and of
temporal attention).

Overlap: the exchange of `h` is posted when `h` exists and waited for only when the temporal layer reads
it, so it is in flight while the block's spatial and cross-attention compute (vgen/parallel/comm.py,
`Pending`). In backward, the reverse exchange is posted when the temporal layer's backward finishes and
waited for after spatial and cross-attention's backward.

Uneven sizes: frames and positions are split unevenly (sizes differ by at most one; comm.even_bounds); the
all-to-all carries uneven blocks, so nothing is padded and no padding is sent.

Fewer frames than ranks (an image, a short clip): frame shards would leave ranks empty, so such a grid is
laid out in token shards and every self-attention runs Ulysses over the SP group (the same bytes as
mode=ulysses, never more); a warning names the grid and the mode that runs. That needs model.heads
divisible by the degree; when it is not, the forward raises a ValueError that says so.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from vgen.models.attention import AttentionCore
from vgen.models.rope import rope_tables
from vgen.parallel.comm import even_bounds, post_blocks, shard_plan
from vgen.parallel.ulysses import UlyssesCore

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=64)
def _warn_fallback(grid: tuple, sp: int) -> None:
    log.warning(
        "parallel.sp.mode=switch: grid %s has %d frames < parallel.sp.degree=%d; this grid runs Ulysses "
        "(all-to-all of q, k, v and output around spatial and temporal attention)", grid, grid[0], sp)


class SwitchCore(nn.Module):
    """Wraps an AttentionCore for switch mode. Spatial attention gets this rank's whole frames; temporal
    attention gets, from TemporalSwitch, all frames of this rank's positions; both run the local core.

    Args:
        local: the model's original core.
        group: the SP process group.
        sp_size: ranks in `group`.
        index: this rank's index in `group`.
    """

    def __init__(self, local: AttentionCore, group, sp_size: int, index: int):
        super().__init__()
        self.local, self.group, self.sp_size, self.index = local, group, sp_size, index
        self.kind = local.kind
        self.fallback = UlyssesCore(local, group, sp_size, "switch")

    def forward(self, q, k, v, grid, kv_mask=None):
        # q: (B, N_local, h, d); k, v the same, or (B, L, h, d) text for "cross"
        if self.kind == "cross":
            return self.local(q, k, v, grid, kv_mask=kv_mask)
        plan = shard_plan(tuple(grid), self.sp_size, "switch")  # grid[0] is T in both layouts
        if not plan.by_frames or self.kind == "full":
            self._check_fallback(q.shape[2], grid)
            _warn_fallback(tuple(grid), self.sp_size)
            return self.fallback(q, k, v, grid)
        if self.kind == "spatial":
            return self.local(q, k, v, (plan.frame_count(self.index), *grid[1:]))  # whole frames are local
        return self.local(q, k, v, grid)  # temporal: TemporalSwitch already gave it (T, 1, my positions)

    def _check_fallback(self, heads: int, grid) -> None:
        if heads % self.sp_size:
            raise ValueError(
                f"parallel.sp.mode=switch: {grid[0]} frames are fewer than parallel.sp.degree={self.sp_size}, "
                f"and the Ulysses fallback needs model.heads={heads} divisible by the degree; use more frames, "
                f"a lower degree, or mode=ulysses/ring"
            )

    def extra_repr(self) -> str:
        return f"kind={self.kind}, switch={self.sp_size}"


class _Sent:
    """h on its way to the temporal layout."""

    def __init__(self, pending, plan, pos_bounds, head_dim: int, grid):
        self.pending, self.plan, self.pos_bounds, self.head_dim, self.grid = pending, plan, pos_bounds, head_dim, grid


class TemporalSwitch(nn.Module):
    """Replaces a block's `temporal_seam`: `send` posts the exchange of h, `run` waits for it, runs the
    temporal layer on all frames of this rank's positions and switches the output back.

    Args:
        group: the SP process group.
        sp_size: ranks in `group`.
        index: this rank's index in `group`.
    """

    def __init__(self, group, sp_size: int, index: int):
        super().__init__()
        self.group, self.sp_size, self.index = group, sp_size, index

    def send(self, h, rope, grid):
        # h: (B, N_local, D), this rank's whole frames
        plan = shard_plan(tuple(grid), self.sp_size, "switch")
        if not plan.by_frames:
            return (h, rope, grid)  # token shards: the cores run Ulysses
        B, _, D = h.shape
        n, i, P = self.sp_size, self.index, plan.positions
        pb = even_bounds(P, n)
        x = h.view(B, plan.frame_count(i), P, D)
        blocks = [x[:, :, pb[j] : pb[j + 1]] for j in range(n)]  # positions of rank j, my frames
        shapes = [(B, plan.frame_count(j), pb[i + 1] - pb[i], D) for j in range(n)]  # frames of rank j, my positions
        head_dim = rope[0].shape[-1] * 2
        return _Sent(post_blocks(blocks, shapes, self.group, "temporal"), plan, pb, head_dim, tuple(grid))

    def run(self, layer: nn.Module, sent):
        if isinstance(sent, tuple):
            return layer(*sent)
        plan, pb, n, i = sent.plan, sent.pos_bounds, self.sp_size, self.index
        ht = torch.cat(sent.pending.wait(), dim=1)  # (B, T, P_i, D): the wait, only now
        B, T, Pi, D = ht.shape
        rope = rope_tables(sent.grid, sent.head_dim, device=ht.device, rows=("positions", pb[i], pb[i + 1]))
        out = layer(ht.reshape(B, T * Pi, D), rope, (T, 1, Pi)).view(B, T, Pi, D)
        fb = plan.frame_bounds
        blocks = [out[:, fb[j] : fb[j + 1]] for j in range(n)]  # frames of rank j, my positions
        shapes = [(B, plan.frame_count(i), pb[j + 1] - pb[j], D) for j in range(n)]
        back = post_blocks(blocks, shapes, self.group, "temporal").wait()
        return torch.cat(back, dim=2).reshape(B, plan.size(i), D)  # (B, N_local, D)

    def extra_repr(self) -> str:
        return f"switch={self.sp_size}, index={self.index}"
