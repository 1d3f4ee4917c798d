"""What a GPU holds beyond the step's tensors, and the profile that states it for one GPU type.

The simulator (memory_sim, memory_timeline) counts tensors: the caching allocator's *allocated* bytes.
A process on a GPU also holds (GpuProfile fields, defaults used when no profile was measured):
  context_bytes               CUDA context, cuBLAS/cuDNN handles and workspaces, kernel images
  nccl_bytes_per_communicator NCCL buffers of each process group that ran a collective
  fragmentation               reserved / allocated - 1 at the peak: the caching allocator's cached but
                              unusable blocks (expandable_fragmentation with expandable segments on)
  ema                         the trainer's fp32 EMA shard: 4 bytes per parameter / world (train/ema.py)
  encoders                    frozen text/video encoders when they run in the training loop (0 on latents)
  offload_pool_blocks         the offload copy stream's own allocator pool, in blocks' offloaded bytes
`device_terms` adds them to a simulated report; the budget a step's tensors may use is the device's
memory minus them. benchmarks/calibrate_memory.py measures a profile once per GPU type (JSON).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

GB = 1e9
PROFILE_ENV = "VGEN_GPU_PROFILE"


@dataclass
class GpuProfile:
    """Non-tensor memory and copy bandwidth of one GPU type (bytes, bytes/s)."""

    device: str = "defaults: H100 80GB, not measured"
    total_bytes: float = 85.0e9  # torch.cuda.get_device_properties().total_memory of an H100 80GB (~79.2 GiB)
    context_bytes: float = 0.8e9
    nccl_bytes_per_communicator: float = 0.6e9
    fragmentation: float = 0.10
    expandable_fragmentation: float = 0.02
    offload_pool_blocks: float = 1.0
    h2d_bytes_per_s: float = 20e9  # pinned host -> device (PCIe 4/5 x16, measured ~20-50 GB/s)
    d2h_bytes_per_s: float = 20e9
    matmul_flops: float = 600e12  # bf16 dense, what an H100 sustains on large matmuls
    measured: bool = False
    source: str = "vgen/parallel/gpu_memory.py defaults"

    def to_json(self) -> dict:
        return asdict(self)


def load_profile(path: str | os.PathLike | None = None) -> GpuProfile:
    """The profile at `path`, else at $VGEN_GPU_PROFILE, else the defaults.

    Raises:
        ValueError: the file is not a profile (message names the file and the key).
    """
    path = path or os.environ.get(PROFILE_ENV)
    if not path:
        return GpuProfile()
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"GPU memory profile {path} cannot be read: {e}") from e
    known = {f.name for f in fields(GpuProfile)}
    data = data.get("profile", data)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"GPU memory profile {path} has unknown keys {unknown}; known: {sorted(known)}")
    return GpuProfile(**{**data, "source": str(path)})


def communicators(world: int, sp: int) -> int:
    """Process groups that run NCCL collectives on each rank: the world (ZeRO), the SP group and the
    data-parallel group beside it (when both are proper subgroups)."""
    if world <= 1:
        return 0
    return 1 + (sp > 1) + (1 < sp < world)


@dataclass
class GpuTerms:
    """How the caching allocator and the process use device memory beyond the step's tensors."""

    profile: GpuProfile
    world: int = 1
    sp: int = 1
    n_params: int = 0
    ema: bool = True
    encoder_bytes: float = 0.0
    expandable_segments: bool = False

    @property
    def fragmentation(self) -> float:
        p = self.profile
        return p.expandable_fragmentation if self.expandable_segments else p.fragmentation

    def fixed(self) -> dict:
        """Terms that do not depend on the step's length (bytes)."""
        p = self.profile
        return dict(context=p.context_bytes,
                    nccl=communicators(self.world, self.sp) * p.nccl_bytes_per_communicator,
                    ema=4.0 * self.n_params / max(self.world, 1) if self.ema else 0.0,
                    encoders=float(self.encoder_bytes))

    def device_bytes(self, allocated_peak: float, offloaded_per_block: float = 0.0) -> dict:
        """allocated, reserved and the device total for a step whose tensors peak at `allocated_peak`."""
        reserved = allocated_peak * (1 + self.fragmentation)
        terms = dict(self.fixed(), offload_pool=self.profile.offload_pool_blocks * offloaded_per_block)
        return dict(allocated=allocated_peak, reserved=reserved, **terms, device=reserved + sum(terms.values()))

    def affine(self, pool_at_k0: float, pool_slope: float) -> tuple[float, tuple]:
        """(mult, (add0, add1)): device = mult * allocated + add0 + add1 * k, for memory_timeline's solver."""
        return 1 + self.fragmentation, (sum(self.fixed().values()) + self.profile.offload_pool_blocks * pool_at_k0,
                                         self.profile.offload_pool_blocks * pool_slope)


def defaults_table() -> list[tuple[str, str]]:
    """(term, default) rows for the README."""
    p = GpuProfile()
    return [("total_bytes", f"{p.total_bytes / GB:g} GB"), ("context_bytes", f"{p.context_bytes / GB:g} GB"),
            ("nccl_bytes_per_communicator", f"{p.nccl_bytes_per_communicator / GB:g} GB"),
            ("fragmentation", f"{p.fragmentation:.0%}"), ("expandable_fragmentation", f"{p.expandable_fragmentation:.0%}"),
            ("offload_pool_blocks", f"{p.offload_pool_blocks:g}"), ("h2d/d2h", f"{p.h2d_bytes_per_s / GB:g} GB/s")]
