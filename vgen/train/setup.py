"""Start-up pieces of a training run: device, process group, seeds."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from vgen.parallel.topology import build_topology, init_process_group


def pick_device(run_cfg) -> torch.device:
    if run_cfg.device == "cuda" or (run_cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("run.device=cuda but no CUDA device is available")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(cfg):
    """Process group for any launcher, then the dp x sp topology."""
    device = pick_device(cfg.run)
    if device.type == "cpu":
        # DeepSpeed picks its accelerator from this; without it a CUDA-less machine may guess wrong
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _init_with_timeout(device.type, float(cfg.train.collective_timeout_s))
    init_process_group(device.type)  # no-op when started above; keeps its defaults for plain python
    return device, build_topology(cfg.parallel.sp)


def _init_with_timeout(device_type: str, timeout_s: float) -> None:
    """Start the process group with train.collective_timeout_s on every collective.

    Without it a rank whose peer died (a node lost, a process killed) waits on the next collective for
    the backend's default (30 min for gloo; NCCL without async error handling: forever). gloo and NCCL both
    then raise on the surviving ranks, which exit non-zero with the message.
    """
    # groups made later (the topology's SP/DP groups, DeepSpeed's) take the module default, not the world
    # group's timeout: set the default itself so that every collective is bounded
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timedelta(seconds=timeout_s)
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), timedelta):
        c10d.default_pg_nccl_timeout = timedelta(seconds=timeout_s)
    if dist.is_initialized() or "WORLD_SIZE" not in os.environ:
        return  # plain python: topology's init gives a 1-rank group, where nothing can hang
    if device_type == "cuda":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a timed-out NCCL op aborts the rank
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))


def is_collective_failure(err: BaseException) -> bool:
    """A collective that failed because a peer died or timed out (gloo raises plain RuntimeErrors)."""
    text = str(err)
    return isinstance(err, dist.DistError) or any(
        s in text for s in ("gloo", "NCCL", "Connection reset", "Connection closed", "Timed out", "timed out"))


def disable_deepspeed_shm_allreduce() -> None:
    """Keep DeepSpeed from building and starting its CPU shared-memory allreduce op.

    It serves inference all-reduce only, costs a C++ compile on first use, and leaves a 69 MB
    /dev/shm buffer per rank behind after every run (never unlinked), which fills a machine's memory after
    a few dozen CPU jobs. gloo does the training collectives either way.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def set_determinism(cfg) -> None:
    torch.manual_seed(cfg.run.seed)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        if torch.cuda.is_available():
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
