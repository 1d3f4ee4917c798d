"""Switch sequence parallelism (the dimension switching of VideoSys DSP, arXiv 2403.10266): tokens are
sharded by frames, so the spatial core (one frame) and the cross core (per token) run locally with no
communication. The temporal core does one all-to-all that turns "my frames, all positions" into "all
frames, my positions", attends, and one all-to-all back: 4 local activations times (n-1)/n per block,
against Ulysses' 8 (spatial and temporal each need theirs).

Uneven sizes: frames are padded at the end to a multiple of the degree (comm.shard_plan) and masked as
temporal keys; padding frames attend only among themselves spatially, so real tokens never see them.
Positions are padded to a multiple of the degree for the all-to-all; a padded position is its own
temporal group and is dropped on the way back.

Fewer frames than the degree (an image, a short clip): frame shards would leave ranks holding nothing but
padding, so the layout falls back to token shards and the self-attention cores to Ulysses over the SP group.
That needs model.heads divisible by the degree; when it is not, the forward raises a ValueError that says so.
"""

from __future__ import annotations

import torch
from torch import nn

from vgen.models.attention import AttentionCore, sdpa
from vgen.parallel.comm import all_to_all, pad_dim, shard_plan
from vgen.parallel.ulysses import UlyssesCore


class SwitchCore(nn.Module):
    """Wraps an AttentionCore for switch mode.

    Args:
        local: the model's original core.
        group: the SP process group.
        sp_size: ranks in `group`.
    """

    def __init__(self, local: AttentionCore, group, sp_size: int):
        super().__init__()
        self.local, self.group, self.sp_size = local, group, sp_size
        self.kind = local.kind
        self.fallback = UlyssesCore(local, group, sp_size, "switch")

    def forward(self, q, k, v, grid, kv_mask=None):
        # q: (B, N_local, h, d); k, v the same, or (B, L, h, d) text for "cross"
        if self.kind == "cross":
            return self.local(q, k, v, grid, kv_mask=kv_mask)
        plan = shard_plan(tuple(grid), self.sp_size, "switch")
        if not plan.by_frames or self.kind == "full":
            self._check_fallback(q.shape[2], grid)
            return self.fallback(q, k, v, grid)
        T, H, W = grid
        if self.kind == "spatial":
            return self.local(q, k, v, (plan.frames_local, H, W))  # whole frames are local
        return self._temporal(q, k, v, plan)

    def _check_fallback(self, heads: int, grid) -> None:
        if heads % self.sp_size:
            raise ValueError(
                f"parallel.sp.mode=switch: {grid[0]} frames are fewer than parallel.sp.degree={self.sp_size}, "
                f"and the Ulysses fallback needs model.heads={heads} divisible by the degree; use more frames, "
                f"a lower degree, or mode=ulysses/ring"
            )

    def _temporal(self, q, k, v, plan):
        B, _, h, d = q.shape
        Tl, P, n = plan.frames_local, plan.positions, self.sp_size
        P_pad = -(-P // n) * n
        x = torch.stack([q, k, v]).view(3, B, Tl, P, h, d)
        x = pad_dim(x, P_pad, dim=3)  # (3, B, Tl, P_pad, h, d)
        x = all_to_all(x, scatter_dim=3, gather_dim=2, group=self.group, label="temporal")  # (3, B, T_pad, P_pad/n, h, d)
        T_pad, Pl = x.shape[2], x.shape[3]
        q, k, v = (t.transpose(1, 2).reshape(B * Pl, T_pad, h, d) for t in x.unbind(0))  # one group per position
        mask = None
        if T_pad > plan.frames:  # padding frames must not be keys
            mask = (torch.arange(T_pad, device=q.device) < plan.frames).expand(B * Pl, T_pad)
        out = sdpa(q, k, v, mask, self.local.backend)  # (B*Pl, T_pad, h, d)
        out = out.view(B, Pl, T_pad, h, d).transpose(1, 2)  # (B, T_pad, Pl, h, d)
        out = all_to_all(out, scatter_dim=1, gather_dim=2, group=self.group, label="temporal")  # (B, Tl, P_pad, h, d)
        return out[:, :, :P].reshape(B, Tl * P, h, d)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, switch={self.sp_size}"
