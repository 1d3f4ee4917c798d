"""Ulysses sequence parallelism (DeepSpeed-Ulysses, arXiv 2309.14509): around each attention core, one
all-to-all turns "my tokens, all heads" into "all tokens, my heads", the unchanged core runs on the whole
sequence, and one all-to-all turns the output back.

Per self-attention core each rank sends 4 local activations (q, k, v in one message, then the output),
each times (n-1)/n: the chunk a rank keeps stays put. Cross-attention sends nothing: a video token's attention over the text depends
only on its own query and the full text K/V, which every rank already holds, so the local shard with all
heads gives exactly the single-process rows. (DeepSpeed-style wrappers all-to-all q there too; that moves
bytes without changing a number.)

The all-to-alls are functional collectives (vgen/parallel/comm.py), posted the moment the core has q, k
and v and waited for by the attention, which needs them at once: within one core nothing can overlap them.
(Hiding them would need the block to project the temporal q, k, v before spatial attention runs; switch
does the equivalent with `h`, vgen/parallel/switch.py.) Selective checkpointing keeps their outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from vgen.models.attention import AttentionCore
from vgen.parallel.comm import all_to_all, pad_dim, shard_plan


def seq_to_heads(q, k, v, group, label: str):
    """(B, N_local, h, d) x3 -> (3, B, n * N_local, h / n, d): gather the sequence, scatter the heads.
    q, k and v go in one message, so a core pays one collective's latency, not three."""
    qkv = torch.stack([q, k, v])  # (3, B, N_local, h, d)
    return all_to_all(qkv, scatter_dim=3, gather_dim=2, group=group, label=label)


def heads_to_seq(out, group, label: str):
    """(B, n * N_local, h / n, d) -> (B, N_local, h, d)."""
    return all_to_all(out, scatter_dim=1, gather_dim=2, group=group, label=label)


class UlyssesCore(nn.Module):
    """Wraps an AttentionCore; the whole SP group is the all-to-all group.

    Args:
        local: the model's original core (kept, so its kind and backend are used unchanged).
        group: the SP process group.
        sp_size: ranks in `group`.
        mode: the SP mode, which fixes the shard layout (see comm.shard_plan).
    """

    def __init__(self, local: AttentionCore, group, sp_size: int, mode: str):
        super().__init__()
        self.local, self.group, self.sp_size, self.mode = local, group, sp_size, mode
        self.kind = local.kind

    def forward(self, q, k, v, grid, kv_mask=None):
        # q: (B, N_local, h, d); k, v the same, or (B, L, h, d) text for "cross"
        if self.kind == "cross":
            return self.local(q, k, v, grid, kv_mask=kv_mask)  # exact without communication
        plan = shard_plan(tuple(grid), self.sp_size, self.mode)
        qkv = seq_to_heads(q, k, v, self.group, self.kind)  # (3, B, N_padded, h/n, d)
        q, k, v = qkv[:, :, : plan.tokens].unbind(0)  # padding never reaches the core
        out = self.local(q, k, v, grid)  # (B, N, h/n, d)
        out = pad_dim(out, plan.padded, 1)  # (B, N_padded, h/n, d)
        return heads_to_seq(out, self.group, self.kind)  # (B, N_local, h, d)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, ulysses={self.sp_size}"
