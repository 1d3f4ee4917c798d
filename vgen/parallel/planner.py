"""Pick the cheapest memory policy whose simulated peak fits a per-GPU budget (`parallel.memory.policy=auto`).

Candidates are ordered by what they cost in time, estimated as the fraction of a training step's FLOPs
spent again (forward recomputation is about 1/3 of forward + backward per recomputed block), plus a small
charge for host traffic (offload overlaps compute, but shares PCIe and pins host memory) and for slicing the
MLP (smaller matmuls). The first candidate whose simulated per-rank peak fits the budget wins; each one
tried is reported with its peak, so the choice can be checked by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from vgen.parallel.memory_sim import MemoryReport, trace_step

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
    ("block + offload", dict(checkpointing="block", offload=True), 1 / 3 + 0.02),
    ("block + offload + MLP chunks", dict(checkpointing="block", offload=True, mlp_chunks=8), 1 / 3 + 0.03),
    # nested recomputes each sub-layer a second time inside the block's recomputation, and attention
    # slices once more in their backward: about one more forward
    ("nested + offload + MLP chunks", dict(checkpointing="nested", offload=True, mlp_chunks=8), 2 / 3 + 0.03),
]


@dataclass
class MemoryPlan:
    """A resolved `parallel.memory` section (usable by apply_memory_policy) plus the evidence for it."""

    checkpointing: str = "none"
    ratio: float = 1.0
    offload: bool = False
    mlp_chunks: int = 1
    recompute_mlp: bool = False
    offload_min_bytes: int = 1 << 20
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
    dit = _dit_config(cfg, latent_shape, text_dim)
    # budgets are per GPU: bf16 with the fused attention a GPU runs (no (S, S) scores, its backward workspace)
    sim = dict(micro_batch=int(cfg.data.micro_batch), world_size=world_size, sp=int(cfg.parallel.sp.degree),
               zero_stage=int(cfg.parallel.zero_stage), sp_mode=str(cfg.parallel.sp.mode), attention_kernel="flash")
    why, smallest = [], None
    for name, settings, cost in CANDIDATES:
        min_bytes = int(getattr(mem, "offload_min_bytes", 1 << 20))
        plan = MemoryPlan(budget_gb=budget, name=name, offload_min_bytes=min_bytes, **settings)
        report = trace_step(dit, plan, latent_shape, text_len, **sim).report()
        fits = report.peak_gb <= budget
        line = (f"memory plan: {name:<30} peak {report.peak_gb:7.2f} GB {'<=' if fits else '> '} budget {budget:.2f} GB"
                f" (extra compute ~{cost:.0%})")
        why.append(line)
        log(line)
        smallest = report if smallest is None or report.peak_bytes < smallest.peak_bytes else smallest
        if fits:
            plan.report, plan.why = report, why
            log(f"memory plan: chosen '{name}', the cheapest that fits: {report.summary()}")
            return plan
    raise MemoryBudgetError(
        f"no memory policy fits parallel.memory.budget_gb={budget:g} GB per GPU for latent {tuple(latent_shape)} "
        f"(micro_batch={sim['micro_batch']}, sp={sim['sp']}, world={world_size}, zero_stage={sim['zero_stage']}); "
        f"the smallest simulated peak is {smallest.peak_gb:.2f} GB ({smallest.summary()}). Raise the budget, the SP "
        f"degree or the ZeRO stage, or shorten the video."
    )


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
