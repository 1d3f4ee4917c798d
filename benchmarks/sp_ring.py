"""Ring and hybrid attention per rank: bytes sent per block, kernel FLOPs, peak attention memory.

    python benchmarks/sp_ring.py                        # 2b preset (16 heads x 128), bf16, default shapes
    python benchmarks/sp_ring.py --shapes 21x60x104x4 --modes ring

A shape is frames x latent height x latent width x SP degree (latent after the VAE; the 2b preset patches
it 1x2x2). Each rank of the job is simulated in this process on torch's fake process group: the real
RingCore runs, only the data is missing (fake tensors), so the transfers, the kernel calls and every
storage they allocate are the real ones. Per rank and attention kind (a block has one spatial and one
temporal self-attention; cross-attention sends nothing):
  bytes_fwd / bytes_bwd  what vgen.parallel.comm.COUNTER saw handed to torch.distributed
  flops                  kernel FLOPs of one forward + backward (torch.utils.flop_counter)
  peak_bytes             peak of the storages one forward + backward allocated (dispatch-level tracker,
                         vgen.parallel.memory_sim.StorageTracker), beyond q, k, v and the output grad
Also the growth of one rank's peak on real CPU tensors at two lengths 4x apart (`memory_growth`).
The grouped attention's FLOPs (the whole sequence in one process) and the size of one dense (C x C) fp32
score matrix of the previous ring implementation are given for comparison. Writes
benchmarks/results/sp_ring_<preset>.json (device, command, commit, raw figures).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vgen.models.attention import AttentionCore  # noqa: E402
from vgen.parallel.comm import COUNTER, shard_plan  # noqa: E402
from vgen.parallel.fused_attention import kernel_name  # noqa: E402
from vgen.parallel.memory_sim import StorageTracker  # noqa: E402
from vgen.parallel.sequence import make_core  # noqa: E402
from vgen.parallel.topology import build_topology  # noqa: E402

DEFAULT_SHAPES = ("21x60x104x4", "21x60x104x8", "21x90x160x8")


@contextlib.contextmanager
def fake_world(world: int, rank: int):
    """A fake default process group: collectives and P2P return at once without moving data."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("measure_rank needs its own (fake) process group; torch.distributed is already up")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _peak(tracker: StorageTracker) -> int:
    """Largest sum of live storage bytes over the tracker's op clock (born at start, dead after end)."""
    events = []
    for rec in tracker.records():
        events += [(rec.start, 0, rec.nbytes), ((tracker.clock if rec.end is None else rec.end), 1, -rec.nbytes)]
    live = peak = 0
    for _, _, delta in sorted(events):  # at one clock tick births count before deaths: an upper bound
        live += delta
        peak = max(peak, live)
    return peak


def measure_rank(mode: str, degree: int, kind: str, grid, heads: int, head_dim: int, rank: int, u: int | None = None,
                 fake: bool = False, batch: int = 1, dtype: torch.dtype = torch.float32) -> dict:
    """One attention forward + backward of SP rank `rank` in a job of `degree` ranks.

    Args:
        mode: "ring" or "hybrid" (hybrid: Ulysses degree `u`, default 2).
        grid: (T, H, W) tokens after patching.
        fake: fake tensors (any size, no data) instead of real CPU tensors (real kernels run).
    Returns:
        bytes_fwd, bytes_bwd, flops, peak_bytes, kernel, local_tokens.
    """
    u = u or (2 if mode == "hybrid" else 1)
    cfg = SimpleNamespace(mode=mode, degree=degree, ulysses_degree=u)
    grid = tuple(grid)
    with fake_world(degree, rank):
        core = make_core(AttentionCore(kind), build_topology(cfg, heads=heads))
        local = shard_plan(grid, degree, mode).local
        with FakeTensorMode() if fake else contextlib.nullcontext():
            q, k, v = (torch.randn(batch, local, heads, head_dim, dtype=dtype, requires_grad=True) for _ in range(3))
            grad = torch.randn(batch, local, heads, head_dim, dtype=dtype)
            COUNTER.reset()
            tracker = StorageTracker()
            gc.collect()
            gc.disable()  # frees follow reference counts, as in memory_sim
            try:
                with FlopCounterMode(display=False) as flops, tracker:
                    out = core(q, k, v, grid)
                    out.backward(grad)
                    del out
            finally:
                gc.enable()
            tracker.closed = True
    sent = COUNTER.snapshot()
    return dict(bytes_fwd=sent.get(f"{kind}/fwd", 0), bytes_bwd=sent.get(f"{kind}/bwd", 0),
                flops=flops.get_total_flops(), peak_bytes=_peak(tracker), kernel=kernel_name(q), local_tokens=local)


def grouped_flops(kind: str, grid, heads: int, head_dim: int, batch: int = 1, dtype=torch.float32) -> int:
    """Kernel FLOPs of the model's grouped attention over the whole sequence, forward + backward."""
    from vgen.parallel import fused_attention  # noqa: F401  (registers the CPU kernel's FLOP formulas)

    N = grid[0] * grid[1] * grid[2]
    with FakeTensorMode():
        q, k, v = (torch.randn(batch, N, heads, head_dim, dtype=dtype, requires_grad=True) for _ in range(3))
        with FlopCounterMode(display=False) as flops:
            AttentionCore(kind)(q, k, v, grid).backward(torch.randn(batch, N, heads, head_dim, dtype=dtype))
    return flops.get_total_flops()


def _shape_rows(shape: str, modes, heads: int, head_dim: int, patch, dtype) -> list[dict]:
    T, lh, lw, degree = (int(x) for x in shape.split("x"))
    grid = (T // patch[0], lh // patch[1], lw // patch[2])
    rows = []
    for mode in modes:
        for kind in ("spatial", "temporal"):
            ranks = [measure_rank(mode, degree, kind, grid, heads, head_dim, r, fake=True, dtype=dtype) for r in range(degree)]
            chunk = ranks[0]["local_tokens"] * (2 if mode == "hybrid" else 1)
            rows.append(dict(
                mode=mode, kind=kind, shape=shape, frames=T, latent_hw=[lh, lw], degree=degree, grid=list(grid),
                tokens=grid[0] * grid[1] * grid[2], kernel=ranks[0]["kernel"], per_rank=ranks,
                max_bytes_fwd=max(r["bytes_fwd"] for r in ranks), max_bytes_bwd=max(r["bytes_bwd"] for r in ranks),
                max_peak_bytes=max(r["peak_bytes"] for r in ranks), flops_sum=sum(r["flops"] for r in ranks),
                grouped_flops=grouped_flops(kind, grid, heads, head_dim, dtype=dtype),
                dense_scores_bytes=heads // (2 if mode == "hybrid" else 1) * chunk * chunk * 4,
            ))
            r = rows[-1]
            print(f"{mode:6s} {kind:8s} {shape:14s} fwd {r['max_bytes_fwd'] / 2**20:9.1f} MiB  bwd "
                  f"{r['max_bytes_bwd'] / 2**20:9.1f} MiB  peak {r['max_peak_bytes'] / 2**30:6.2f} GiB  "
                  f"flops/grouped {r['flops_sum'] / r['grouped_flops']:.4f}", flush=True)
    return rows


def memory_growth(modes, frames=(67, 268), hw=(15, 16), degree=4, rank=1) -> list[dict]:
    """Peak of one attention forward + backward of one rank on real CPU tensors (fp32, 2 heads x 32) at
    two lengths 4x apart: 4,020 and 16,080 tokens per rank (tests/test_sp_ring.py asserts <= 5x)."""
    rows = []
    for mode in modes:
        for kind in ("spatial", "temporal"):
            peaks = [measure_rank(mode, degree, kind, (t, *hw), heads=2, head_dim=32, rank=rank)["peak_bytes"] for t in frames]
            rows.append(dict(mode=mode, kind=kind, degree=degree, rank=rank, grids=[[t, *hw] for t in frames],
                             local_tokens=[t * hw[0] * hw[1] // degree for t in frames], peak_bytes=peaks,
                             growth=peaks[1] / peaks[0]))
            print(f"{mode:6s} {kind:8s} peak {peaks[0] / 2**20:.1f} -> {peaks[1] / 2**20:.1f} MiB: x{peaks[1] / peaks[0]:.2f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="2b")
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="frames x latent h x latent w x degree")
    parser.add_argument("--modes", nargs="+", default=["ring", "hybrid"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from vgen.models import resolve_preset

    cfg = resolve_preset(args.preset)
    dtype = getattr(torch, args.dtype)
    growth = memory_growth(args.modes)
    rows = [row for s in args.shapes for row in _shape_rows(s, args.modes, cfg.heads, cfg.hidden // cfg.heads, cfg.patch, dtype)]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = dict(
        benchmark="sp_ring", device=f"CPU ({platform.processor() or platform.machine()}), fake tensors on a fake process group",
        command=" ".join(["python"] + sys.argv), commit=commit, torch=torch.__version__, preset=args.preset,
        heads=cfg.heads, head_dim=cfg.hidden // cfg.heads, dtype=args.dtype, batch=1,
        note="per rank, one attention forward + backward; a block = one spatial + one temporal attention. "
             "Step time on a GPU: unmeasured (no GPU in this task).",
        memory_growth=growth, rows=rows,
    )
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"sp_ring_{args.preset}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
