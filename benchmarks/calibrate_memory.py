"""Measure the non-tensor memory terms and copy bandwidth of this GPU type once; write a profile JSON.

    python benchmarks/calibrate_memory.py                       # on a GPU: benchmarks/results/gpu_profile_<gpu>.json
    python benchmarks/calibrate_memory.py --dry-run --out /tmp/p.json   # CPU: the defaults, marked unmeasured

The simulator and planner read it (`--profile` of max_seq_len.py, `parallel.memory.gpu_profile`, or
$VGEN_GPU_PROFILE); the fields are vgen/parallel/gpu_memory.GpuProfile's. Measured here: the device total,
the CUDA context (driver-reported used memory after the first kernel and cuBLAS handle, minus what
torch reserved), fragmentation (reserved / allocated at the peak of a ragged allocation pattern like a
block's temporaries), pinned host<->device bandwidth (256 MB copies), and bf16 matmul rate (8192^3).
NCCL buffers need more than one rank: measured by gpu_check.py's 2-process stage when it can, else the
default stays (the JSON says which fields were measured).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

try:
    import vgen  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vgen.parallel.gpu_memory import GpuProfile  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _seconds(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def measure(size_mb: int = 256) -> tuple[GpuProfile, list]:
    """A GpuProfile of this GPU, and the names of the fields measured."""
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    p = GpuProfile(device=props.name, total_bytes=float(props.total_memory), measured=True,
                   source="benchmarks/calibrate_memory.py")
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    p.matmul_flops = 2 * 8192**3 / _seconds(lambda: a @ a)
    free, total = torch.cuda.mem_get_info()
    p.context_bytes = float(total - free - torch.cuda.memory_reserved())
    n = size_mb << 20
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    gpu = torch.empty(n, dtype=torch.uint8, device=dev)
    p.h2d_bytes_per_s = n / _seconds(lambda: gpu.copy_(host, non_blocking=True))
    p.d2h_bytes_per_s = n / _seconds(lambda: host.copy_(gpu, non_blocking=True))
    del a, host, gpu
    p.fragmentation = _fragmentation(dev)
    return p, ["total_bytes", "matmul_flops", "context_bytes", "h2d_bytes_per_s", "d2h_bytes_per_s", "fragmentation"]


def _fragmentation(dev, rounds: int = 6) -> float:
    """reserved / allocated - 1 at the peak of block-like traffic: tensors of growing, uneven sizes freed
    out of order (as a recomputed block's temporaries are), with the caching allocator's default settings."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    keep = []
    for r in range(rounds):
        temps = [torch.empty(int((1 + 0.37 * i + r) * (64 << 20)), dtype=torch.uint8, device=dev) for i in range(8)]
        keep.append(temps[r % 8])
        del temps[::2]
        del temps
    peak_alloc, peak_res = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    del keep
    torch.cuda.empty_cache()
    return max(0.0, peak_res / max(peak_alloc, 1) - 1)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu_profile_<gpu>.json)")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: write the defaults, marked unmeasured")
    args = ap.parse_args(argv)
    if args.dry_run or not torch.cuda.is_available():
        if not args.dry_run:
            raise SystemExit("calibrate_memory.py needs a CUDA GPU (or --dry-run for the defaults)")
        profile, measured = GpuProfile(), []
    else:
        profile, measured = measure()
    name = profile.device.split(":")[0].replace(" ", "_") if profile.measured else "defaults"
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"gpu_profile_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(command="python " + " ".join(sys.argv), torch=torch.__version__, cuda=torch.version.cuda,
                  measured_fields=measured, profile=profile.to_json())
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}: {profile.to_json()}")
    return result


if __name__ == "__main__":
    main()
