"""The one step that applies parallel and memory techniques to a model, in a fixed order:

1. sequence parallelism: wraps each block's attention cores and the model's seq_in/seq_out seams
   (first, because checkpointing must recompute the communication too);
2. activation checkpointing: per block, by policy (recomputes what 1 built);
3. activation offload: moves what the checkpointed blocks save to host memory (needs 2's boundaries);
4. compile: per block, last, so it sees the final modules.
The model file never changes for any of these.
"""

from __future__ import annotations

from torch import nn

from vgen.parallel.topology import Topology


def parallelize(model: nn.Module, cfg, topology: Topology) -> nn.Module:
    """Apply `cfg.parallel` to `model` in place and return it.

    Args:
        model: a VideoDiT (blocks in `model.blocks`, attention cores named `core`).
        cfg: the full vgen config.
        topology: this rank's process topology.
    """
    par = cfg.parallel
    if topology.sp_size > 1:
        from vgen.parallel.sequence import apply_sequence_parallel

        apply_sequence_parallel(model, topology, par.sp)
    if par.memory.checkpointing != "none" or par.memory.offload or par.memory.mlp_chunks > 1:
        from vgen.parallel.checkpointing import apply_memory_policy

        apply_memory_policy(model, par.memory)
    if par.compile:
        for block in model.blocks:
            block.compile()
    return model
