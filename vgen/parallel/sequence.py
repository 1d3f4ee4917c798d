"""Sequence parallelism for the VideoDiT: the seams that split and gather the token sequence, and
`apply_sequence_parallel`, which swaps every attention core for its mode's distributed version.

Modes (`parallel.sp.mode`; details in the module of each):
  ulysses  all-to-all around each self-attention core (vgen/parallel/ulysses.py); heads % degree == 0.
  ring     K/V chunks around a P2P ring, log-sum-exp merge, overlapped (vgen/parallel/ring.py).
  hybrid   Ulysses inside groups of `ulysses_degree` consecutive ranks, ring across them.
  switch   frame shards; only the block's temporal seam communicates (vgen/parallel/switch.py).
Cross-attention never communicates: each token's text attention needs only its own query.

Local from the start: `seq_in` cuts this rank's tokens out of the patchified input *before* the patch
embedding, and the model builds only this rank's RoPE rows (`seq_in.rows`), so neither the embedded
sequence, its gradient, a padding copy nor the RoPE tables exist at full length on any rank.

The gradient contract (what the trainer must do):
  * Data: every rank of an SP group gets the same sample, timestep, noise and caption dropout. Build the
    loader from (topology.dp_rank, topology.dp_size) and seed per-step randomness from dp_rank, not rank
    (or broadcast it with `sp_broadcast_`).
  * Parameters used before the split (timestep and text embedders) and after it (patch embedding, blocks,
    final layer) get partial sums on each rank. `seq_out` all-gathers after the final layer; its backward
    returns this rank's slice of the gradient, not a sum. Hence every SP rank computes the same full
    output and loss, every parameter gradient on an SP rank is a partial sum, and their sum over the SP
    group is the single-process gradient.
  * Per-shard loss (`parallel.sp.shard_loss=true`): `seq_out` does not gather while training; the model
    returns this rank's (B, N_local, patch_dim) tokens and `shard_mse` takes the loss of those tokens
    against the same tokens of the target, summed over the SP group (`comm.sum_over_group`: all-reduce in
    forward, identity in backward since each rank backpropagates its own term). The loss value is the
    full loss on every rank and the gradients are the same partial sums, so the rest holds unchanged.
  * DeepSpeed / ZeRO treats all world ranks as data parallel (no mpu) and averages gradients over the
    world. Multiply the backward loss by `sp_loss_scale(topology)` (= sp_size): the world mean of
    sp_size * partial sums is then the mean over data-parallel ranks of full gradients. Log the unscaled loss.
  * Without DeepSpeed: call `reduce_sp_gradients(model, topology)` after backward (sums over the SP group),
    then average over `topology.dp_group` as usual.
Activation checkpointing may wrap blocks after this. `selective` keeps the all-to-alls' outputs (they are
functional collectives), so backward sends nothing twice; `block`/`nested` recompute them, the same
collectives in the same order on every rank (counted as "<label>/recompute", benchmarks/sp_comm.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from vgen.models.attention import AttentionCore
from vgen.parallel.comm import gather_sequence, local_tokens, shard_plan, sum_over_group
from vgen.parallel.ring import RingCore, RingSpec
from vgen.parallel.switch import SwitchCore, TemporalSwitch
from vgen.parallel.topology import Topology, check_heads
from vgen.parallel.ulysses import UlyssesCore


class SequenceSplit(nn.Module):
    """`seq_in`: (B, N, C) patchified input -> this rank's (B, N_local, C) tokens (padding made locally);
    `rows(grid)`: which RoPE rows this rank needs."""

    def __init__(self, topology: Topology):
        super().__init__()
        self.sp_size, self.index, self.mode = topology.sp_size, topology.sp_rank, topology.sp_mode

    def forward(self, x, grid=None):
        return local_tokens(x, shard_plan(tuple(grid), self.sp_size, self.mode), self.index)

    def rows(self, grid) -> tuple:
        plan = shard_plan(tuple(grid), self.sp_size, self.mode)
        start = plan.start(self.index)
        return ("tokens", start, start + plan.size(self.index))  # rows past the grid: identity rotation

    def extra_repr(self) -> str:
        return f"sp={self.sp_size}, index={self.index}, mode={self.mode}"


class SequenceGather(nn.Module):
    """`seq_out`: (B, N_local, C) shards -> (B, N, C) on every rank of the SP group, padding removed.
    With `shard_loss`, while gradients are recorded (training), it returns the shard itself; sampling and
    evaluation (no_grad) still gather."""

    def __init__(self, topology: Topology, shard_loss: bool = False):
        super().__init__()
        self.sp_size, self.index, self.mode = topology.sp_size, topology.sp_rank, topology.sp_mode
        self.group, self.shard_loss = topology.sp_group, shard_loss

    def returns_shard(self) -> bool:
        return self.shard_loss and torch.is_grad_enabled()

    def forward(self, x, grid=None):
        if self.returns_shard():
            return x
        plan = shard_plan(tuple(grid), self.sp_size, self.mode)
        return gather_sequence(x, plan, self.index, self.group)

    def extra_repr(self) -> str:
        return f"sp={self.sp_size}, mode={self.mode}, shard_loss={self.shard_loss}"


def shard_mse(model: nn.Module, pred: torch.Tensor, target: torch.Tensor,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the whole sequence from this rank's shard (`parallel.sp.shard_loss`).

    Args:
        model: the SP-applied VideoDiT (its seams know the layout).
        pred: (B, N_local, patch_dim) from the model, or the full (B, C, T, H, W) when it gathered.
        target: (B, C, T, H, W) velocity target.
        weight: optional 0/1 mask broadcastable to target (image-to-video: the generated frames); the mean
            is then over the elements it keeps, as in `flow_matching_loss`.
    """
    weight = None if weight is None else weight.float().expand_as(target)
    if pred.shape == target.shape:
        err = (pred.float() - target.float()).pow(2)
        return err.mean() if weight is None else (err * weight).sum() / weight.sum().clamp(min=1.0)
    seam = model.seq_out
    grid = model.token_grid(target.shape)
    plan = shard_plan(grid, seam.sp_size, seam.mode)
    real = plan.real(seam.index)
    mine = local_tokens(model.patchify(target), plan, seam.index)[:, :real]  # (B, real, patch_dim)
    err = (pred[:, :real].float() - mine.float()).pow(2)
    if weight is None:
        return sum_over_group(err.sum() / target.numel(), seam.group)
    w = local_tokens(model.patchify(weight), plan, seam.index)[:, :real]  # every rank holds the whole mask
    return sum_over_group((err * w).sum() / weight.sum().clamp(min=1.0), seam.group)


def make_core(local: AttentionCore, topology: Topology) -> nn.Module:
    """The distributed replacement of one attention core for the topology's mode."""
    mode, sp = topology.sp_mode, topology.sp_size
    if mode == "switch":
        return SwitchCore(local, topology.sp_group, sp, topology.sp_rank)
    if topology.ring_size == 1:  # ulysses, or hybrid with ulysses_degree == degree
        return UlyssesCore(local, topology.sp_group, sp, mode)
    spec = RingSpec(tuple(topology.ring_ranks), topology.ring_rank, topology.ring_group)
    inner = topology.ulysses_group if topology.ulysses_size > 1 else None
    return RingCore(local, spec, inner)


def apply_sequence_parallel(model: nn.Module, topology: Topology, sp_cfg) -> nn.Module:
    """Replace `model.seq_in` / `model.seq_out` and every AttentionCore in place; returns the model.

    Args:
        model: a VideoDiT (needs `cfg.heads`, `seq_in`, `seq_out`, cores that are AttentionCore modules).
        topology: from build_topology(sp_cfg) on this rank.
        sp_cfg: the `parallel.sp` config; must be the one the topology was built from.
    """
    if str(sp_cfg.mode) != topology.sp_mode or int(sp_cfg.degree) != topology.sp_size:
        raise ValueError(
            f"parallel.sp (mode={sp_cfg.mode}, degree={sp_cfg.degree}) does not match the topology "
            f"(mode={topology.sp_mode}, sp_size={topology.sp_size}); build the topology from the same config"
        )
    if isinstance(model.seq_in, SequenceSplit):
        raise RuntimeError("apply_sequence_parallel was already applied to this model")
    check_heads(model.cfg.heads, topology.sp_mode, topology.ulysses_size)
    if topology.sp_size == 1:
        return model
    if topology.sp_mode == "switch":
        seams = [b for b in model.modules() if hasattr(b, "temporal_seam")]
        if not seams:
            raise ValueError("parallel.sp.mode=switch needs blocks with a `temporal_seam` (vgen/models/dit.py STBlock)")
        for block in seams:  # no parameters: checkpoint keys do not change
            block.temporal_seam = TemporalSwitch(topology.sp_group, topology.sp_size, topology.sp_rank)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, AttentionCore):  # same attribute name: checkpoint keys do not change
                setattr(parent, name, make_core(child, topology))
    shard_loss = bool(getattr(sp_cfg, "shard_loss", False))
    model.seq_in, model.seq_out = SequenceSplit(topology), SequenceGather(topology, shard_loss)
    return model


def sp_loss_scale(topology: Topology) -> float:
    """Factor for the backward loss under DeepSpeed's world-wide gradient averaging (see module docstring)."""
    return float(topology.sp_size)


@torch.no_grad()
def reduce_sp_gradients(model: nn.Module, topology: Topology) -> None:
    """Sum every parameter gradient over the SP group (for trainers that average over dp_group themselves)."""
    if topology.sp_size == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=topology.sp_group)


@torch.no_grad()
def sp_broadcast_(tensors, topology: Topology) -> None:
    """Overwrite `tensors` on every SP rank with the first SP rank's values (same noise/timesteps/text)."""
    if topology.sp_size == 1:
        return
    for t in tensors:
        dist.broadcast(t, src=topology.sp_src, group=topology.sp_group)
