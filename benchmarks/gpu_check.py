"""Everything issue 10 asks a GPU to measure, in one command; results under benchmarks/results/gpu_check/.

    python benchmarks/gpu_check.py              # one H100/H200: 2b preset, bf16 (budget: under 8 minutes)
    python benchmarks/gpu_check.py --dry-run    # CPU, tiny sizes: every stage runs (the CI test)

Stages (each one's failure is recorded in the summary and the next one still runs):
  calibrate   the GPU profile (benchmarks/calibrate_memory.py), then used by the simulator
  max_tokens  bisection with real OOMs for plain, block, block+offload, nested+offload+chunks, each with
              the simulator's prediction beside the measured peak (benchmarks/max_seq_len.py's device path)
  throughput  block+offload / block at equal length (steps timed alternately), and block's step time and
              MFU at 3 lengths
  kernels     the Triton kernels in kernels/ against their PyTorch references (fp32 and bf16): output and
              gradient error against the fp32 reference, time of forward + backward, speed-up
  vae         tiled VAE decode of 81 frames at 720x1280 (benchmarks/vae_memory.py; time, peak)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path

if "--dry-run" in sys.argv[1:]:  # Triton's CPU interpreter must be chosen before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stage_calibrate(args, out: Path) -> dict:
    path = out / "gpu_profile.json"
    result = _script("calibrate_memory").main(["--out", str(path)] + (["--dry-run"] if args.dry_run else []))
    args.profile_path = str(path)
    return dict(path=str(path), measured_fields=result["measured_fields"])


def _model_args(args) -> list:
    if args.dry_run:
        return ["model.preset=tiny", "model.depth=2", "--device", "cpu", "--budget-gb", "0.05", "--latent-hw", "16", "16",
                "--text-len", "8", "--max-frames", "64", "--repeats", "1"]
    return ["model.preset=2b", "--device", "cuda", "--repeats", "2", "--max-frames", "1024"]


def stage_max_tokens(args, out: Path) -> dict:
    policies = ["plain", "checkpointing", "ckpt+offload", "nested+offload+mlp_chunks"]
    result = _script("max_seq_len").main(_model_args(args) + ["--policies", *policies, "--out", str(out / "max_tokens.json")])
    return dict(rows=[{k: r.get(k) for k in ("policy", "frames", "tokens", "peak_gb", "sim_peak_gb", "sim_guess_frames",
                                             "step_seconds", "mfu")} for r in result["rows"]])


def stage_throughput(args, out: Path) -> dict:
    bench = _script("max_seq_len")
    margs = bench.parse_args(_model_args(args))
    m = bench.model_config(margs.overrides)
    dit = bench.resolve_preset(m.preset, depth=m.depth)
    margs.channels = dit.in_channels
    device = torch.device(margs.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = bench.matmul_peak_flops(device)
    frames = [max(1, f) for f in ((2, 4, 8) if args.dry_run else (16, 48, 96))]
    trainers = {name: bench.Trainer(dit, name, device, dtype) for name in ("checkpointing", "ckpt+offload")}
    rows, ratio = [], None
    for i, T in enumerate(frames):
        batch = trainers["checkpointing"].batch(margs, T)
        times = {name: [] for name in trainers}
        for name, tr in trainers.items():
            tr.step(batch)  # warm-up
        for _ in range(margs.repeats + 1):  # alternate, so both see the same machine
            for name, tr in trainers.items():
                times[name].append(bench.timed(lambda tr=tr: tr.step(batch), device, repeats=1))
        step = {name: min(v) for name, v in times.items()}
        flops = trainers["checkpointing"].model.flops_per_sample((T, *margs.latent_hw), margs.text_len)
        rows.append(dict(frames=T, block_step_s=step["checkpointing"], offload_step_s=step["ckpt+offload"],
                         block_mfu=flops / step["checkpointing"] / peak,
                         offload_over_block_throughput=step["checkpointing"] / step["ckpt+offload"]))
        ratio = rows[-1]["offload_over_block_throughput"] if i == len(frames) - 1 else ratio
    return dict(matmul_peak_tflops=peak / 1e12, rows=rows, offload_over_block_at_longest=ratio)


def _kernel_cases(device: str, dtype: torch.dtype, tiny: bool) -> dict:
    """name -> (fused, reference, args): the 2b preset's shapes (one rank, 64K tokens) or tiny ones."""
    from kernels import norm_modulate, qk_norm_rope

    B, N, heads, head_dim = (1, 64, 2, 16) if tiny else (1, 65536, 16, 128)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    angles = torch.rand(N, head_dim // 2, generator=gen).to(device) * 6.28
    qk = (rand(B, N, heads, head_dim), rand(head_dim), angles.cos(), angles.sin())
    D = heads * head_dim
    nm = (rand(B, N, D), rand(B, D), rand(B, D))
    return {"qk_norm_rope": (qk_norm_rope.fused, qk_norm_rope.reference, qk),
            "norm_modulate": (norm_modulate.fused, norm_modulate.reference, nm)}


def _time_fwd_bwd(fn, args, device: str, repeats: int) -> float:
    """Median seconds of one forward + backward (CUDA events on a GPU, the wall clock on CPU)."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        out = fn(*args)
        out.float().sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]  # the first call compiles


def kernel_vs_reference(name: str, device: str, dtype: torch.dtype, tiny: bool) -> dict:
    """Max abs error of the fused kernel's output and gradients against its PyTorch reference run in
    fp32, beside the reference's own error in `dtype`, and the time of each (forward + backward)."""
    fused, reference, args = _kernel_cases(device, dtype, tiny)[name]
    exact_args = [a.detach().float().requires_grad_(a.requires_grad) for a in args]
    exact = reference(*exact_args)
    grad = torch.randn_like(exact)
    exact_grads = torch.autograd.grad(exact, [a for a in exact_args if a.requires_grad], grad)
    row = {}
    for label, fn in (("fused", fused), ("reference", reference)):
        out = fn(*args)
        grads = torch.autograd.grad(out, [a for a in args if a.requires_grad], grad.to(out.dtype))
        row[f"{label}_out_max_abs_err"] = float((out.detach().float() - exact.detach()).abs().max())
        row[f"{label}_grad_max_abs_err"] = max(float((g.float() - e).abs().max()) for g, e in zip(grads, exact_grads))
        row[f"{label}_fwd_bwd_s"] = _time_fwd_bwd(fn, args, device, 3 if tiny else 20)
    row["speedup"] = row["reference_fwd_bwd_s"] / row["fused_fwd_bwd_s"]
    return row


def stage_kernels(args, out: Path) -> dict:
    from kernels import triton_available

    if not triton_available():
        return dict(skipped="Triton is not importable (pip install triton; TRITON_INTERPRET=1 on CPU)")
    device = "cpu" if args.dry_run else "cuda"
    return {name: {str(dt): kernel_vs_reference(name, device, dt, args.dry_run) for dt in (torch.float32, torch.bfloat16)}
            for name in ("qk_norm_rope", "norm_modulate")}


def stage_vae(args, out: Path) -> dict:
    argv = ["--out", str(out / "vae_decode.json"), "--skip-untiled"]
    argv += ["--sizes", "5x32x32", "--tile", "16"] if args.dry_run else ["--device", "cuda", "--sizes", "81x720x1280"]
    result = _script("vae_memory").main(argv)
    return dict(path=str(out / "vae_decode.json"), keys=sorted(result))


STAGES = dict(calibrate=stage_calibrate, max_tokens=stage_max_tokens, throughput=stage_throughput,
              kernels=stage_kernels, vae=stage_vae)


def plot(summary: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = summary.get("max_tokens", {}).get("rows", [])
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [r["policy"] for r in rows]
    ax.bar(range(len(rows)), [r.get("peak_gb") or 0 for r in rows], 0.4, label="measured peak")
    ax.bar([i + 0.4 for i in range(len(rows))], [r.get("sim_peak_gb") or 0 for r in rows], 0.4, label="simulated")
    ax.set_xticks(range(len(rows)), names, fontsize=7)
    ax.set_ylabel("GB at the longest fit")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: every stage once")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check"))
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA GPU (or --dry-run)")
    out = Path(args.out) / ("dry_run" if args.dry_run else "")
    out.mkdir(parents=True, exist_ok=True)
    summary = dict(command="python " + " ".join(sys.argv), torch=torch.__version__, cuda=torch.version.cuda,
                   device=torch.cuda.get_device_name() if torch.cuda.is_available() and not args.dry_run else "cpu")
    start = time.perf_counter()
    for name in args.stages:
        t0 = time.perf_counter()
        try:
            summary[name] = STAGES[name](args, out)
        except Exception as e:  # noqa: BLE001 - a stage's failure is a result; the others still run
            summary[name] = dict(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:])
        summary[name]["seconds"] = time.perf_counter() - t0
        print(f"{name}: {time.perf_counter() - t0:.0f}s {'ERROR ' + summary[name]['error'] if 'error' in summary[name] else 'ok'}",
              flush=True)
    summary["seconds"] = time.perf_counter() - start
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    plot(summary, out / "summary.png")
    return summary


if __name__ == "__main__":
    main()
