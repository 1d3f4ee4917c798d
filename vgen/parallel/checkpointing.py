"""Activation checkpointing and MLP chunking (vgen/parallel/mlp_chunks.py), applied per block in place.

Policies (`parallel.memory.checkpointing`):
  none       keep every activation;
  block      recompute every block in backward (saves only each block's inputs);
  ratio      checkpoint round(ratio * depth) blocks spread evenly (ratio 1/k = every k-th block), the
             LiteGen trade between memory and recomputation;
  selective  checkpoint every block but keep, per op, the outputs of attention kernels, collectives and
             matmuls (optionally not the MLP's); recompute only the cheap pointwise ops (norms, adaLN
             modulation, RoPE, GELU), which hold most of the activation bytes for little compute;
  nested     checkpoint every block, and inside its recomputation checkpoint each attention layer and
             the MLP again, so backward holds one sub-layer's activations at a time instead of a whole
             block's; spatial and temporal attention also run in group slices whose backward
             recomputes them one at a time. It costs a second recomputation of the sub-layers (about
             2/3 of a step extra instead of 1/3) and is for the longest sequences, with offload and
             MLP chunking.

Whole blocks are wrapped, so the recomputation also replays whatever sequence parallelism put inside the
block (its collectives run again in the same order on every rank). Wrapping replaces the instance's
`forward` with a small callable object and adds no submodules, so state_dict keys never change; the
objects deep-copy with their block (copy.deepcopy re-binds the method to the copy).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from vgen.parallel.mlp_chunks import chunk_mlp
from vgen.parallel.mlp_chunks import state as _state  # MLP depth on this thread, read by the selective policy

POLICIES = ("none", "block", "ratio", "selective", "nested")
_WRAPPED = "_vgen_memory_wrapped"
# nested also runs spatial/temporal attention this many group slices at a time, backward recomputing each
# (vgen/models/attention.py, _GroupChunkedAttention): the attention backward's buffers shrink to a slice's
NESTED_ATTENTION_CHUNKS = 8

# Ops whose outputs selective checkpointing keeps. Attention kernels are the expensive part of a block;
# collectives must not run twice: sequence parallelism's all-to-alls are functional collectives
# (vgen/parallel/comm.py), which return fresh tensors, so caching them is safe and recomputation sends
# nothing (tests/test_sp.py counts it); in-place c10d collectives would be recomputed, correct, only slower.
_ATTENTION_OPS = {
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._flash_attention_forward.default,
    torch.ops.aten._efficient_attention_forward.default,
}
_MATMUL_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
               torch.ops.aten.baddbmm.default}
_COLLECTIVE_NAMESPACES = ("_c10d_functional", "c10d_functional", "_c10d_functional_autograd")
# flash-attn registers its kernels as torch custom ops (flash_attn::_flash_attn_forward, _varlen_forward;
# FlashAttention-3: flash_attn_3::fwd); recognised by namespace so every version's forward is kept
_FLASH_NAMESPACES = ("flash_attn", "flash_attn_3")


def is_attention_forward(op) -> bool:
    """A fused attention forward kernel: PyTorch's SDPA backends or flash-attn's custom ops."""
    if op in _ATTENTION_OPS:
        return True
    name = op.name().split("::")[-1]
    return op.namespace in _FLASH_NAMESPACES and "bwd" not in name and "backward" not in name


@dataclass(frozen=True)
class BlockPlan:
    """What one block does to save memory."""

    checkpoint: str = "none"  # "none" | "full" | "selective" | "nested"
    recompute_mlp: bool = False  # selective only: recompute the MLP's matmuls too
    mlp_chunks: int = 1
    offload: bool = False


def checkpointed_blocks(depth: int, mode: str, ratio: float = 1.0) -> list[bool]:
    """Which of `depth` blocks to checkpoint under policy `mode`; "ratio" spreads the chosen blocks evenly."""
    if mode not in POLICIES:
        raise ValueError(f"parallel.memory.checkpointing={mode!r} must be one of {POLICIES} (or 'auto' with the planner)")
    if mode == "none":
        return [False] * depth
    if mode != "ratio":
        return [True] * depth
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"parallel.memory.ratio={ratio} must be in [0, 1]")
    # block i is chosen when the running count floor((i + 1) * ratio) steps up: ratio 1/3 -> blocks 2, 5, 8...
    return [int((i + 1) * ratio + 1e-9) > int(i * ratio + 1e-9) for i in range(depth)]


def block_plans(mem, depth: int) -> list[BlockPlan]:
    """The per-block plan for a `parallel.memory` config section."""
    if mem.checkpointing == "auto":
        raise ValueError("parallel.memory.checkpointing='auto' must be resolved by vgen.parallel.planner.plan_memory first")
    if int(mem.mlp_chunks) < 1:
        raise ValueError(f"parallel.memory.mlp_chunks={mem.mlp_chunks} must be >= 1")
    kind = mem.checkpointing if mem.checkpointing in ("selective", "nested") else "full"
    marks = checkpointed_blocks(depth, mem.checkpointing, float(mem.ratio))
    recompute_mlp = bool(getattr(mem, "recompute_mlp", False))
    # backward needs the last blocks' activations first: sending them to the host would only stall
    keep_last = int(getattr(mem, "offload_keep_last", 1))
    if keep_last < 0:
        raise ValueError(f"parallel.memory.offload_keep_last={keep_last} must be >= 0")
    return [
        BlockPlan(kind if m else "none", recompute_mlp, int(mem.mlp_chunks), bool(mem.offload) and i < depth - keep_last)
        for i, m in enumerate(marks)
    ]


def apply_memory_policy(model: nn.Module, mem) -> nn.Module:
    """Wrap `model.blocks` in place according to `mem` (a MemoryConfig or anything with its fields).

    Call after sequence parallelism, so checkpointed blocks recompute its communication too.
    """
    from vgen.parallel.offload import ActivationOffloader

    plans = block_plans(mem, len(model.blocks))
    offloader = None
    if any(p.offload for p in plans):
        offloader = ActivationOffloader(min_bytes=int(getattr(mem, "offload_min_bytes", 1 << 20)),
                                        host_fraction=float(getattr(mem, "offload_host_fraction", 0.5)))
        offloader.plans = [p.checkpoint != "none" for p in plans if p.offload]
    for block, plan in zip(model.blocks, plans):
        wrap_block(block, plan, offloader)
    if offloader is not None:  # the final block's output gradient starts the first copy back
        last = model.blocks[len(model.blocks) - 1]
        last.forward = _WatchOutput(last.forward, offloader)
    model.memory_offloader = offloader  # plain attribute (not a module): state_dict is unchanged
    return model


def wrap_block(block: nn.Module, plan: BlockPlan, offloader=None) -> None:
    """Apply `plan` to one block in place (its `mlp` is chunked/tagged, its forward checkpointed)."""
    if getattr(block, _WRAPPED, False):
        raise RuntimeError("apply_memory_policy was already applied to this block")
    setattr(block, _WRAPPED, True)
    mlp = getattr(block, "mlp", None)
    if mlp is not None and (plan.mlp_chunks > 1 or plan.checkpoint == "selective"):
        chunk_mlp(mlp, plan.mlp_chunks)  # vgen/parallel/mlp_chunks.py
    if plan.checkpoint == "nested":
        for sublayer in nested_sublayers(block, skip_mlp=plan.mlp_chunks > 1):
            sublayer.forward = _SublayerForward(sublayer.forward)
        for core in block.modules():  # also the local cores inside sequence-parallel wrappers
            if getattr(core, "kind", None) in ("spatial", "temporal") and hasattr(core, "group_chunks"):
                core.group_chunks = NESTED_ATTENTION_CHUNKS
    if plan.checkpoint != "none" or plan.offload:
        block.forward = _BlockForward(block, block.forward, plan, offloader if plan.offload else None)


class _BlockForward:
    """The block's forward under checkpointing and/or activation offload."""

    def __init__(self, block: nn.Module, inner, plan: BlockPlan, offloader):
        self.block, self.inner, self.plan, self.offloader = block, inner, plan, offloader

    def __call__(self, *args, **kwargs):
        if self.offloader is None or not torch.is_grad_enabled():
            return self._run(*args, **kwargs)
        # the checkpoint's saved inputs (and, unchecked, every saved activation) pass through these hooks;
        # the other block arguments (conditioning, text, RoPE tables) are shared by all blocks: keep them
        keep = list(args[1:]) + list(kwargs.values())
        with self.offloader.block_scope(self.block, keep):
            return self._run(*args, **kwargs)

    def _run(self, *args, **kwargs):
        if self.plan.checkpoint == "none":
            return self.inner(*args, **kwargs)
        if self.plan.checkpoint == "selective":
            policy = _SelectivePolicy(self.plan.recompute_mlp, self.plan.mlp_chunks > 1)
            kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, policy)
        return checkpoint(self.inner, *args, use_reentrant=False, **kwargs)


class _WatchOutput:
    """The final block's forward, its output handed to the offloader (vgen/parallel/offload.py)."""

    def __init__(self, inner, offloader):
        self.inner, self.offloader = inner, offloader

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        return self.offloader.watch_output(out) if torch.is_grad_enabled() else out


def nested_sublayers(block: nn.Module, skip_mlp: bool = False) -> list[nn.Module]:
    """The sub-layers `nested` checkpoints inside a block: its attention layers (the children that hold an
    attention core, the seam sequence parallelism also uses) and its `mlp`, unless chunking already keeps
    only the MLP's input."""
    found = [child for child in block.children() if hasattr(child, "core")]
    if getattr(block, "mlp", None) is not None and not skip_mlp:
        found.append(block.mlp)
    if not found:
        raise ValueError(f"parallel.memory.checkpointing='nested' found no attention layer or mlp in {type(block).__name__}")
    return found


class _SublayerForward:
    """A sub-layer's forward, checkpointed whenever autograd records (in the block's recomputation)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.inner(*args, **kwargs)
        return checkpoint(self.inner, *args, use_reentrant=False, **kwargs)


class _SelectivePolicy:
    """Per op: keep attention, collective and matmul outputs; recompute the rest (and, optionally, the MLP)."""

    def __init__(self, recompute_mlp: bool, mlp_chunked: bool):
        self.recompute_mlp, self.mlp_chunked = recompute_mlp, mlp_chunked

    def __call__(self, ctx, op, *args, **kwargs):
        in_mlp = getattr(_state, "mlp_depth", 0) > 0
        if in_mlp and self.mlp_chunked:
            # the chunked MLP already holds only its input; caching its per-chunk outputs would undo that
            return CheckpointPolicy.PREFER_RECOMPUTE
        if is_attention_forward(op):
            return CheckpointPolicy.MUST_SAVE
        if op.namespace in _COLLECTIVE_NAMESPACES and "wait" not in op.name():
            return CheckpointPolicy.MUST_SAVE
        if op in _MATMUL_OPS and not (in_mlp and self.recompute_mlp):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE
