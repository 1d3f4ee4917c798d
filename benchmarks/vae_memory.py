"""Peak memory and time of the causal VAE's encode and decode: spatially tiled vs untiled.

Both variants stream time in chunks with the causal cache (exact), so the comparison isolates spatial
tiling. Memory on CPU comes from the profiler's record of torch allocations (vgen/models/vae/memory.py),
on CUDA from the caching allocator's peak; "working" = peak minus what the call leaves allocated (its
output). Times are taken in separate runs without the profiler. Weights are random unless --weights is
given: memory and time do not depend on them, the tiled-vs-untiled error does (report it only with real
weights).

    python benchmarks/vae_memory.py                  # CPU, tiny widths: 4 videos, length and width doubled (~2 min)
    python benchmarks/vae_memory.py --preset wan21 --sizes 5x64x64 --tile 32   # CPU, real widths (slow)
    python benchmarks/vae_memory.py --device cuda    # GPU: Wan-2.1 widths, 81 frames 720x1280, bf16, tile 256
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

try:
    import vgen  # noqa: F401
except ImportError:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vgen.models.vae import Tiling, VAEConfig, WanVAE, load_vae_weights  # noqa: E402
from vgen.models.vae.memory import measure_peak  # noqa: E402

PRESETS = {
    "wan21": {},  # the real widths: base_dim 96, dim_mult (1, 2, 4, 4), 2 res blocks, z 16
    "tiny": dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1),
}
MiB = 2**20


def git_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=root, text=True).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "vgen/models/vae"], cwd=root).returncode
        return sha + ("+dirty(vgen/models/vae)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> float:
    """Best wall time of `repeats` runs (the first run also warms caches and kernels)."""
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def run_variant(vae, video, tiling: Tiling, device, repeats: int) -> dict:
    """Encode then decode with one tiling: memory (one profiled run each) and best-of time."""
    out = {}
    try:
        latent, enc = measure_peak(lambda: vae.encode(video, tiling=tiling), device)
        recon, dec = measure_peak(lambda: vae.decode(latent, tiling=tiling), device)
    except torch.OutOfMemoryError as err:
        return {"error": f"out of memory: {str(err).splitlines()[0]}"}
    for name, use in (("encode", enc), ("decode", dec)):
        out[name] = {"peak_MiB": use.peak / MiB, "working_MiB": use.transient / MiB, "output_MiB": use.retained / MiB}
    out["encode"]["seconds"] = timed(lambda: vae.encode(video, tiling=tiling), device, repeats)
    out["decode"]["seconds"] = timed(lambda: vae.decode(latent, tiling=tiling), device, repeats)
    out["_tensors"] = (latent, recon)
    return out


def compare(vae, video, tile: int, overlap: int, chunk: int, device, repeats: int, untiled: bool) -> dict:
    """Tiled and (optionally) untiled figures for one video, plus their ratios and differences."""
    variants = {"tiled": Tiling(tile=tile, overlap=overlap, chunk=chunk)}
    if untiled:
        variants["untiled"] = Tiling(tile=None, chunk=chunk)
    res = {"video": list(video.shape)}
    res.update({name: run_variant(vae, video, t, device, repeats) for name, t in variants.items()})
    tensors = {k: res[k].pop("_tensors") for k in variants if "_tensors" in res[k]}
    if len(tensors) == 2:
        (lt, rt), (lu, ru) = tensors["tiled"], tensors["untiled"]
        res["tiled_vs_untiled"] = {
            "latent_max_abs_err": (lt - lu).abs().max().item(),
            "latent_mean_abs_err": (lt - lu).abs().float().mean().item(),
            "recon_mean_abs_err": (rt - ru).abs().float().mean().item(),
            **{
                f"{op}_{k}_ratio": res["tiled"][op][k] / res["untiled"][op][k]
                for op in ("encode", "decode")
                for k in ("peak_MiB", "working_MiB", "seconds")
            },
        }
    return res


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="default: tiny on CPU, wan21 on CUDA")
    p.add_argument("--weights", default=None, help="diffusers-layout safetensors (default: random weights)")
    p.add_argument("--sizes", default=None, help="videos FRAMESxHEIGHTxWIDTH, comma-separated "
                   "(default CPU: 9x64x64,17x64x64,9x64x128,17x64x128; CUDA: 81x720x1280)")  # fmt: skip
    p.add_argument("--tile", type=int, default=None, help="tile side in pixels (default: 32 CPU, 256 CUDA)")
    p.add_argument("--overlap", type=int, default=None, help="tile overlap in pixels (default: ~tile / 4)")
    p.add_argument("--chunk", type=int, default=1, help="latent frames per temporal chunk")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=1, help="timed runs per measurement (best is kept)")
    p.add_argument("--skip-untiled", action="store_true", help="only the tiled variant (e.g. it would not fit)")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/vae_memory_<device>.json)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    preset = args.preset or ("wan21" if gpu else "tiny")
    sizes = parse_sizes(args.sizes or ("81x720x1280" if gpu else "9x64x64,17x64x64,9x64x128,17x64x128"))
    tile = args.tile or (256 if gpu else 32)
    overlap = args.overlap if args.overlap is not None else tile // 32 * 8  # ~tile / 4, a multiple of 8
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))

    torch.manual_seed(0)
    vae = WanVAE(VAEConfig.from_dict(PRESETS[preset]))
    if args.weights:
        load_vae_weights(vae, args.weights)
    vae = vae.to(device=device, dtype=dtype).eval()
    results = []
    for frames, height, width in sizes:
        video = (torch.rand(1, 3, frames, height, width, device=device) * 2 - 1).to(dtype)
        results.append(compare(vae, video, tile, overlap, args.chunk, device, args.repeats, not args.skip_untiled))
        print(json.dumps(results[-1]), flush=True)

    report = {
        "benchmark": "vae_memory",
        "device": torch.cuda.get_device_name(device) if gpu else f"cpu ({platform.processor() or platform.machine()})",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git_commit": git_commit(),
        "config": {
            "preset": preset, "weights": args.weights or "random", "dtype": str(dtype),
            "tile": tile, "overlap": overlap, "chunk_frames": args.chunk, "repeats": args.repeats,
        },  # fmt: skip
        "memory_method": "cuda max_memory_allocated" if gpu else "torch.profiler profile_memory allocation replay",
        "results": results,
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"vae_memory_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
