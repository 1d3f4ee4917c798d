"""Pick the cheapest memory policy whose simulated peak fits a per-GPU budget (`parallel.memory.policy=auto`).

Candidates are ordered by what they cost in time, estimated as the fraction of a training step's FLOPs
spent again (forward recomputation is about 1/3 of forward + backward per recomputed block), plus, for
offload, the copy time that compute cannot hide: a block's offloaded bytes each way over the profiled
host-device bandwidth (vgen/parallel/gpu_memory.py), against that block's forward (for the copy out) and
backward (for the copy back) compute time at the profiled matmul rate; only the excess over compute stalls.
Offload without checkpointing is refused: it would move every saved activation of every block (several
times a block's input) over PCIe, which no block's compute hides, to save what checkpointing saves with
recomputation on the GPU. The budget is device memory per GPU, minus the GPU terms (context, NCCL, EMA,
fragmentation, offload pool). The first candidate whose simulated device total fits wins; each one tried is
reported, so the choice can be checked by hand. Simulation: short traces (memory_timeline), once, on
rank 0 (`plan_on_rank0` broadcasts the plan).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from vgen.parallel.gpu_memory import GpuTerms, load_profile
from vgen.parallel.memory_sim import MemoryReport
from vgen.parallel.memory_sim import trace_step
from vgen.parallel.memory_timeline import DepthSweep, trace_blocks

# (name, settings, estimated extra cost as a fraction of a step). Selective recomputes only pointwise
# ops (~3% of a block's time); adding the MLP's two matmuls recomputes ~8/26 of its linear FLOPs.
CANDIDATES = [
    ("none", dict(checkpointing="none"), 0.0),
    ("selective", dict(checkpointing="selective"), 0.03),
    ("ratio 0.25", dict(checkpointing="ratio", ratio=0.25), 0.25 / 3),
    ("selective + recompute MLP", dict(checkpointing="selective", recompute_mlp=True), 0.03 + 0.1),
    ("ratio 0.5", dict(checkpointing="ratio", ratio=0.5), 0.5 / 3),
    ("ratio 0.75", dict(checkpointing="ratio", ratio=0.75), 0.75 / 3),
    ("block", dict(checkpointing="block"), 1 / 3),
    ("block + offload", dict(checkpointing="block", offload=True), 1 / 3),
    ("block + offload + MLP chunks", dict(checkpointing="block", offload=True, mlp_chunks=8), 1 / 3 + 0.01),
    # nested recomputes each sub-layer a second time inside the block's recomputation, and attention
    # slices once more in their backward: about one more forward
    ("nested + offload + MLP chunks", dict(checkpointing="nested", offload=True, mlp_chunks=8), 2 / 3 + 0.01),
]


def offload_stall(offloaded_bytes_per_block: float, block_fwd_flops: float, profile) -> float:
    """Extra time of a step from offload, as a fraction of the step: the part of each block's copies
    (out during forward, back during backward) that its compute does not cover.

    Args:
        offloaded_bytes_per_block: bytes one block sends to the host (simulated).
        block_fwd_flops: one block's forward FLOPs (backward ~2x).
        profile: a GpuProfile (bandwidths, matmul rate).
    """
    fwd = block_fwd_flops / profile.matmul_flops
    step = 3 * fwd  # forward + backward of the block; recomputation is charged by the candidate's cost
    out = offloaded_bytes_per_block / profile.d2h_bytes_per_s
    back = offloaded_bytes_per_block / profile.h2d_bytes_per_s
    return (max(0.0, out - fwd) + max(0.0, back - 2 * fwd)) / step


@dataclass
class MemoryPlan:
    """A resolved `parallel.memory` section (usable by apply_memory_policy) plus the evidence for it."""

    checkpointing: str = "none"
    ratio: float = 1.0
    offload: bool = False
    mlp_chunks: int = 1
    recompute_mlp: bool = False
    offload_min_bytes: int = 1 << 20
    offload_keep_last: int = 1  # copied from the config (not chosen): the simulation offloads the same blocks
    policy: str = "auto"
    budget_gb: Optional[float] = None
    name: str = "none"
    report: Optional[MemoryReport] = None
    why: list = field(default_factory=list)

    def settings(self) -> dict:
        """The MemoryConfig fields, e.g. to merge into cfg.parallel.memory before parallelize()."""
        keys = ("checkpointing", "ratio", "offload", "mlp_chunks", "recompute_mlp", "offload_min_bytes", "policy", "budget_gb")
        return {k: getattr(self, k) for k in keys}


class MemoryBudgetError(RuntimeError):
    """No policy fits the budget; the message names the budget and the smallest peak found."""


def plan_memory(cfg, latent_shape, text_len: int, world_size: int, text_dim: Optional[int] = None,
                log: Callable[[str], None] = print) -> MemoryPlan:
    """The cheapest policy whose simulated peak fits `cfg.parallel.memory.budget_gb` per GPU.

    Args:
        cfg: the full vgen config (model, data.micro_batch, parallel.sp / zero_stage / memory).
        latent_shape: (C, T, H, W) of one latent video as the trainer will feed it.
        text_len: text tokens per sample.
        world_size: ranks in the job.
        text_dim: the text encoder's width (default: the preset's).
        log: where the reasoning goes, one line per candidate tried.
    Raises:
        MemoryBudgetError: even the most frugal policy exceeds the budget.
    """
    mem = cfg.parallel.memory
    if mem.budget_gb is None:
        raise ValueError("parallel.memory.budget_gb must be set (GB per GPU) for parallel.memory.policy=auto")
    budget = float(mem.budget_gb)
    profile = load_profile(getattr(mem, "gpu_profile", None))
    dit = _dit_config(cfg, latent_shape, text_dim)
    # budgets are per GPU: bf16 with the fused attention a GPU runs (no (S, S) scores, its backward workspace)
    sim = dict(micro_batch=int(cfg.data.micro_batch), world_size=world_size, sp=int(cfg.parallel.sp.degree),
               zero_stage=int(cfg.parallel.zero_stage), sp_mode=str(cfg.parallel.sp.mode), attention_kernel="flash")
    C, T, H, W = latent_shape
    flops = _block_fwd_flops(dit, latent_shape, text_len) * sim["micro_batch"] / sim["sp"]
    why, smallest = [], None
    for name, settings, cost in CANDIDATES:
        min_bytes = int(getattr(mem, "offload_min_bytes", 1 << 20))
        keep_last = int(getattr(mem, "offload_keep_last", 1))
        plan = MemoryPlan(budget_gb=budget, name=name, offload_min_bytes=min_bytes, offload_keep_last=keep_last,
                          **settings)
        # one trace of a few blocks (first, middle, the offloader's tail; every block for a non-uniform
        # policy) at the training length, laid out for the full depth
        trace = trace_step(dit, plan, latent_shape, text_len, depth=trace_blocks(plan, dit.depth), **sim)
        sw = DepthSweep(trace, trace, dit.depth)
        report = sw.evaluate(T)
        terms = GpuTerms(profile, world=world_size, sp=sim["sp"], n_params=sw.n_params,
                         expandable_segments=bool(getattr(mem, "expandable_segments", False)))
        per_block = sw.offloaded_bytes_per_block(T) if plan.offload else 0.0
        device = terms.device_bytes(report.peak_bytes, per_block)
        if plan.offload:
            cost += offload_stall(per_block, flops, profile)
        fits = device["device"] <= budget * 1e9
        line = (f"memory plan: {name:<30} tensors {report.peak_gb:7.2f} GB, device {device['device'] / 1e9:7.2f} GB "
                f"{'<=' if fits else '> '} budget {budget:.2f} GB (extra compute ~{cost:.0%})")
        why.append(line)
        log(line)
        report.device = device
        smallest = report if smallest is None or report.peak_bytes < smallest.peak_bytes else smallest
        if fits:
            plan.report, plan.why = report, why
            log(f"memory plan: chosen '{name}', the cheapest that fits: {report.summary()}")
            return plan
    raise MemoryBudgetError(
        f"no memory policy fits parallel.memory.budget_gb={budget:g} GB per GPU for latent {tuple(latent_shape)} "
        f"(micro_batch={sim['micro_batch']}, sp={sim['sp']}, world={world_size}, zero_stage={sim['zero_stage']}); "
        f"the smallest simulated peak is {smallest.peak_gb:.2f} GB of tensors, {smallest.device['device'] / 1e9:.2f} GB "
        f"on the device ({smallest.summary()}). Raise the budget, the SP degree or the ZeRO stage, or shorten the video."
    )


def _block_fwd_flops(dit, latent_shape, text_len: int) -> float:
    """One block's forward FLOPs for one sample: its matmuls (2 per weight per token) and attention."""
    C, T, H, W = latent_shape
    pt, ph, pw = dit.patch
    t, hw = T // pt, (H // ph) * (W // pw)
    D, N = dit.hidden, t * hw
    linear = 2 * N * (26 * D * D * dit.mlp_ratio / 4.0)  # ~26 D^2 weights per block (presets.py)
    attention = 4 * D * (N * hw + N * t + N * text_len)  # QK^T and PV: spatial, temporal, cross
    return linear + attention


def plan_on_rank0(cfg, latent_shape, text_len: int, world_size: int, **kw):
    """resolve_memory on rank 0 only, its settings broadcast to every rank (start-up costs one rank's
    simulation, and all ranks apply the same plan). Without torch.distributed up: resolve_memory."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return resolve_memory(cfg, latent_shape, text_len, world_size, **kw)
    box = [None]
    if dist.get_rank() == 0:
        try:
            plan = resolve_memory(cfg, latent_shape, text_len, world_size, **kw)
            box[0] = plan.settings() if isinstance(plan, MemoryPlan) else None
        except (MemoryBudgetError, ValueError) as e:
            box[0] = e
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise box[0]
    if box[0] is None:
        return cfg.parallel.memory
    return MemoryPlan(**{k: v for k, v in box[0].items()})


def resolve_memory(cfg, latent_shape, text_len: int, world_size: int, **kw):
    """`cfg.parallel.memory` itself when manual, else the planned policy (for the trainer to pass on)."""
    mem = cfg.parallel.memory
    if mem.policy == "manual" and mem.checkpointing != "auto":
        return mem
    if mem.policy not in ("manual", "auto"):
        raise ValueError(f"parallel.memory.policy={mem.policy!r} must be 'manual' or 'auto'")
    return plan_memory(cfg, latent_shape, text_len, world_size, **kw)


def _dit_config(cfg, latent_shape, text_dim):
    from vgen.models.presets import resolve_preset

    m = cfg.model
    overrides = dict(hidden=m.hidden, depth=m.depth, heads=m.heads, mlp_ratio=m.mlp_ratio, patch=m.patch)
    if len(latent_shape) == 4:
        overrides["in_channels"] = int(latent_shape[0])
    if text_dim is not None:
        overrides["text_dim"] = int(text_dim)
    return resolve_preset(m.preset, **overrides)
