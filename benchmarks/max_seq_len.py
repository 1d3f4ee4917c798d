"""The longest video whose full training step (forward, backward, AdamW step) fits, per memory policy.

Resolution is fixed (--latent-hw, default 90x160: 720p through an 8x VAE) and the latent frame count is
bisected, so the answer reads as "how long a video": tokens = frames x H x W after patching. Policies:
plain, checkpointing (every block), checkpointing + offload, + MLP chunking, and nested checkpointing
(sub-layers checkpointed again inside each block's recomputation) + offload + MLP chunking.

    python benchmarks/max_seq_len.py                                  # this GPU, 2b preset, bf16
    python benchmarks/max_seq_len.py --simulate model.preset=2b --world-size 8   # CPU simulator, SP 1..8
    python benchmarks/max_seq_len.py --device cpu model.preset=tiny --latent-hw 16 16 --budget-gb 0.4  # smoke test

GPU: a fits-or-OOM probe per frame count (one step; the simulator's estimate brackets the search), then
three timed steps at the longest fit. Weights are bf16 with an fp32 master copy and fp32 AdamW state on
the fp32 copy: the bytes of DeepSpeed's bf16 optimizer at ZeRO-0 on one GPU. MFU counts model FLOPs
(model.flops_per_sample: forward + backward, attention included, recomputation not) over this GPU's
bf16 matmul peak measured here (8192^3 matmuls). With --budget-gb a step over the budget counts as a
failure (the only failure a CPU run has). --simulate solves the longest fit in closed form on a few-block
trace pair laid out for the full depth (vgen/parallel/memory_timeline.py), with what a GPU holds beyond
tensors subtracted from --budget-gb (vgen/parallel/gpu_memory.py; --no-gpu-terms: tensors only), for every
SP degree dividing --world-size, ZeRO --zero-stage, cells in --jobs processes,
with attention accounted as a GPU's fused kernel (--attention-kernel flash: output + log-sum-exp forward,
dq/dk/dv + FlashAttention-2's fp32 workspace backward, no (S, S) scores; "native" leaves out the workspace).
Writes benchmarks/results/max_seq_len_<mode>.json (+ .png when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

try:
    import vgen  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vgen.models.dit import VideoDiT  # noqa: E402
from vgen.models.presets import resolve_preset  # noqa: E402
from vgen.parallel.checkpointing import apply_memory_policy  # noqa: E402
from vgen.parallel.memory_sim import sweep, trace_step  # noqa: E402
from vgen.parallel.gpu_memory import GpuProfile, load_profile  # noqa: E402

ATTENTION_ACCOUNTING = {
    "flash": "fused SDPA as on a GPU: forward allocates the output and an fp32 log-sum-exp, backward dq, dk, dv "
             "plus FlashAttention-2's fp32 dq accumulator and softmax_d (rows rounded up to 128); no (S, S) scores",
    "native": "the fused CPU SDPA kernel's outputs (output + log-sum-exp; dq, dk, dv), no GPU workspace",
}

ROOT = Path(__file__).resolve().parents[1]
POLICIES = {
    "plain": dict(checkpointing="none"),
    "checkpointing": dict(checkpointing="block"),
    "ckpt+offload": dict(checkpointing="block", offload=True),
    "ckpt+offload+mlp_chunks": dict(checkpointing="block", offload=True, mlp_chunks=8),
    # checkpoints each attention layer and the MLP again inside the block's recomputation
    "nested+offload+mlp_chunks": dict(checkpointing="nested", offload=True, mlp_chunks=8),
}


def memory_policy(name: str) -> SimpleNamespace:
    base = dict(checkpointing="none", ratio=1.0, offload=False, mlp_chunks=1, recompute_mlp=False, offload_min_bytes=1 << 20)
    return SimpleNamespace(**{**base, **POLICIES[name]})


def bisect_frames(fits, lo: int, hi: int, guess: int | None = None) -> int:
    """Largest frame count in [lo, hi] for which fits(frames) holds (0 if none); fits must be monotone.

    Gallops away from `guess` (the simulator's answer on a device) in steps 1, 2, 4, ... until the answer
    is bracketed, then bisects: a good guess costs a few probes, a bad one a few more.
    """
    if not fits(lo):
        return 0
    good, bad = lo, hi + 1
    start = min(max(guess or lo, lo), hi)
    if start > lo and not fits(start):
        bad, step = start, 1
        while start - step > good and not fits(start - step):
            bad, step = start - step, step * 2
        good = max(good, start - step)
    else:
        good, step = start, 1
        while good + step <= hi and fits(good + step):
            good, step = good + step, step * 2
        bad = min(good + step, hi + 1)
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


# ---------------------------------------------------------------------------- simulation (any machine)


def run_simulated(args, dit) -> list[dict]:
    """Every (SP degree, policy) cell, spread over --jobs processes (each cell traces 3 blocks, or 3 + offload_keep_last with offload, twice)."""
    degrees = [d for d in (1, 2, 4, 8, 16, 32, 64) if args.world_size % d == 0 and dit.heads % d == 0]
    cells = [(sp, name) for sp in degrees for name in args.policies]
    if args.jobs > 1 and len(cells) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            rows = list(pool.map(simulate_cell, [(args, dit, sp, name) for sp, name in cells]))
    else:
        rows = [simulate_cell((args, dit, sp, name)) for sp, name in cells]
    for row in rows:
        print(f"sp={row['sp']:<2} {row['policy']:<26} {row['frames']:>5} frames {row['tokens']:>9} tokens  "
              f"tensors {row['peak_gb']:6.2f} GB  device {row.get('device_gb') or 0:6.2f} GB  ({row['cpu_seconds']:.0f}s cpu)")
    return rows


def simulate_cell(job) -> dict:
    """The longest fit of one policy at one SP degree (closed form on a few-block trace pair), with the GPU
    terms (vgen/parallel/gpu_memory.py) subtracted from the device budget unless --no-gpu-terms."""
    from vgen.parallel.gpu_memory import GpuTerms
    from vgen.parallel.memory_timeline import solve_max_frames

    args, dit, sp, name = job
    cpu, start = time.process_time(), time.perf_counter()
    sim = dict(micro_batch=args.micro_batch, world_size=args.world_size, sp=sp, zero_stage=args.zero_stage,
               attention_kernel=args.attention_kernel)
    terms = None if args.no_gpu_terms else GpuTerms(args.profile, world=args.world_size, sp=sp,
                                                     expandable_segments=args.expandable_segments)
    mem = memory_policy(name)
    got = solve_max_frames(dit, mem, (args.channels, *args.latent_hw), args.text_len, args.budget_gb * 1e9,
                           args.max_frames, terms, frames=tuple(args.trace_frames), **sim)
    frames, report, device = got["frames"], got["report"], got["device"]
    row = dict(policy=name, sp=sp, frames=frames, tokens=report.tokens if frames else 0, peak_gb=report.peak_gb,
               by_category_gb={k: v / 1e9 for k, v in report.by_category.items()}, sp_impl=report.sp_impl,
               attention=report.attention, lean_ops=got["lean"],
               device_gb=device["device"] / 1e9 if device else None,
               gpu_terms_gb={k: v / 1e9 for k, v in device.items()} if device else None)
    if args.check and sp in args.check and frames:  # the full-depth trace at the answer: the reference
        full = trace_step(dit, mem, (args.channels, frames, *args.latent_hw), args.text_len, lean=got["lean"], **sim)
        row["full_depth_peak_gb"] = full.report().peak_gb
        row["full_depth_rel_error"] = report.peak_bytes / full.report().peak_bytes - 1
    row.update(seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu)
    return row


# ---------------------------------------------------------------------------- a real device


class Trainer:
    """One policy on a real device: bf16 (fp32 on CPU) weights, fp32 master copy, fp32 AdamW."""

    def __init__(self, dit, policy: str, device: torch.device, dtype: torch.dtype):
        torch.manual_seed(0)
        self.model = VideoDiT(dit).to(device=device, dtype=dtype)
        mem = memory_policy(policy)
        if mem.checkpointing != "none" or mem.offload or mem.mlp_chunks > 1:
            apply_memory_policy(self.model, mem)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.master = self.params
        if dtype != torch.float32:  # fp32 master weights with persistent fp32 gradient buffers, as DeepSpeed
            self.master = [p.detach().float().clone() for p in self.params]
            for m in self.master:
                m.grad = torch.zeros_like(m)
        self.opt = torch.optim.AdamW(self.master, lr=1e-5)
        for m in self.master:  # allocate AdamW's state now, so every probe starts from the same memory
            self.opt.state[m] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(m),
                                 "exp_avg_sq": torch.zeros_like(m)}
        self.dit, self.device, self.dtype = dit, device, dtype

    def resident_bytes(self) -> int:
        """Weights, master copy and optimizer state: alive before a step starts."""
        tensors = {id(t): t for t in self.params + self.master}
        tensors.update({id(v): v for st in self.opt.state.values() for v in st.values() if torch.is_tensor(v)})
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def step(self, batch) -> None:
        x, t, text, mask, target = batch
        loss = (self.model(x, t, text, mask).float() - target.float()).pow(2).mean()
        loss.backward()
        del loss
        if self.master is self.params:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            return
        with torch.no_grad():
            for m, p in zip(self.master, self.params):
                m.grad.copy_(p.grad)
                p.grad = None
            self.opt.step()
            torch._foreach_copy_(self.params, self.master)

    def batch(self, args, frames: int):
        B, kw = args.micro_batch, dict(device=self.device, dtype=self.dtype)
        x = torch.randn(B, args.channels, frames, *args.latent_hw, **kw)
        text = torch.randn(B, args.text_len, self.dit.text_dim, **kw)
        mask = torch.ones(B, args.text_len, dtype=torch.bool, device=self.device)
        return x, torch.rand(B, device=self.device), text, mask, torch.randn_like(x)

    def try_frames(self, args, frames: int) -> dict | None:
        """Peak bytes of one step at `frames`, or None when it does not fit (OOM or over --budget-gb)."""
        failed, peak = False, 0
        try:
            peak = measure_peak(lambda: self.step(self.batch(args, frames)), self.device)
            peak += self.resident_bytes() if self.device.type == "cpu" else 0  # CUDA's peak counts them already
        except torch.OutOfMemoryError:
            failed = True
        self.model.zero_grad(set_to_none=True)
        if self.master is self.params:
            self.opt.zero_grad(set_to_none=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        over = args.budget_gb is not None and peak > args.budget_gb * 1e9
        used = "OOM" if failed else f"{peak / 1e9:.2f} GB" + (" (over budget)" if over else "")
        print(f"  {frames:>5} frames: {used}", flush=True)
        return None if failed or over else {"peak_bytes": peak}


def measure_peak(fn, device: torch.device) -> int:
    """Peak bytes allocated while fn runs: the CUDA caching allocator's count, or on CPU the running sum of
    the profiler's allocation events (the same measurement tests/test_memory_sim.py checks the simulator with)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak


def matmul_peak_flops(device: torch.device) -> float:
    """Measured bf16 matmul throughput (FLOP/s) of this device: the MFU denominator."""
    n = 8192 if device.type == "cuda" else 512
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    seconds = timed(lambda: a @ b, device, repeats=10)
    return 2 * n**3 / seconds


def timed(fn, device, repeats: int) -> float:
    """Mean seconds of fn over `repeats` runs after the caller's warm-up."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def run_device(args, dit, device: torch.device) -> list[dict]:
    if device.type != "cuda" and args.budget_gb is None:
        raise SystemExit("--device cpu needs --budget-gb: a CPU has no out-of-memory error to bisect on")
    peak_flops = matmul_peak_flops(device)
    args.matmul_peak_tflops = peak_flops / 1e12
    print(f"measured matmul peak: {peak_flops / 1e12:.1f} TFLOP/s", flush=True)
    rows = []
    for name in args.policies:
        rows.append(measure_policy(args, dit, name, device, peak_flops))
        print(f"{name}: {rows[-1]}", flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def measure_policy(args, dit, name: str, device: torch.device, peak_flops: float) -> dict:
    """Bisect one policy on the device (from the simulator's guess), then time the longest fit."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    budget = args.budget_gb * 1e9 if args.budget_gb else torch.cuda.get_device_properties(device).total_memory * 0.95
    sw = sweep(dit, memory_policy(name), (args.channels, *args.latent_hw), args.text_len, frames=(8, 16),
               micro_batch=args.micro_batch, world_size=1, sp=1, zero_stage=0, dtype=dtype)
    guess = bisect_frames(lambda T: sw.evaluate(T).peak_bytes <= budget, 1, args.max_frames) or None
    print(f"{name}: the simulator expects {guess} frames to fit", flush=True)
    trainer, peaks = Trainer(dit, name, device, dtype), {}

    def fits(frames: int) -> bool:
        peaks[frames] = trainer.try_frames(args, frames)
        return peaks[frames] is not None

    frames = bisect_frames(fits, 1, args.max_frames, guess)
    row = dict(policy=name, frames=frames, sim_guess_frames=guess)
    if not frames:
        return row
    gh, gw = args.latent_hw[0] // dit.patch[1], args.latent_hw[1] // dit.patch[2]
    row.update(tokens=frames // dit.patch[0] * gh * gw, peak_gb=peaks[frames]["peak_bytes"] / 1e9)
    if device.type == "cuda":  # the simulator's bf16 + fp32-master accounting is this trainer's
        row["sim_peak_gb"] = sw.evaluate(frames).peak_gb
    try:
        batch = trainer.batch(args, frames)
        trainer.step(batch)  # warm-up
        seconds = timed(lambda: trainer.step(batch), device, repeats=args.repeats)
    except torch.OutOfMemoryError:  # fragmentation can fail a repeat of a step that fitted once
        row["timing"] = "out of memory when repeated"
        return row
    flops = trainer.model.flops_per_sample((frames, *args.latent_hw), args.text_len) * args.micro_batch
    row.update(step_seconds=seconds, mfu=flops / seconds / peak_flops)
    return row


# ---------------------------------------------------------------------------- report


def environment(device: str) -> dict:
    try:
        commit = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "vgen"], cwd=ROOT).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    return dict(device=name, torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                command="python " + " ".join(sys.argv), git_commit=commit + ("+dirty(vgen)" if dirty else ""))


def print_table(rows: list[dict], simulate: bool) -> None:
    if not simulate:
        return
    degrees = sorted({r["sp"] for r in rows})
    print("\nmax tokens per GPU budget (rows: policy, columns: SP degree)")
    print(f"{'policy':<26}" + "".join(f"{'sp=' + str(d):>12}" for d in degrees))
    for name in dict.fromkeys(r["policy"] for r in rows):
        cells = {r["sp"]: r["tokens"] for r in rows if r["policy"] == name}
        print(f"{name:<26}" + "".join(f"{cells.get(d, 0):>12,}" for d in degrees))


def headline(rows: list[dict]) -> dict:
    """Max tokens per policy and SP degree, and how each offload policy compares with plain (the issue's
    targets: >= 4x plain and >= 1,000,000 tokens) at each degree."""
    table = {}
    for r in rows:
        table.setdefault(r["policy"], {})[str(r.get("sp", 1))] = r.get("tokens", 0)
    out = dict(max_tokens=table)
    plain = table.get("plain", {})
    for name in (n for n in table if "offload" in n):
        for sp, tokens in table[name].items():
            if plain.get(sp):
                out[f"{name}_over_plain_sp{sp}"] = round(tokens / plain[sp], 2)
            out[f"{name}_reaches_1M_tokens_sp{sp}"] = tokens >= 1_000_000
    return out


def plot(rows: list[dict], path: Path, title: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG"
    groups = sorted({r.get("sp", 1) for r in rows})
    names = list(dict.fromkeys(r["policy"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [next((r.get("tokens", 0) for r in rows if r["policy"] == name and r.get("sp", 1) == g), 0) for g in groups]
        ax.bar([g + i * width for g in range(len(groups))], values, width, label=name)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], [f"sp={g}" for g in groups])
    ax.set_ylabel("max tokens per sample")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return None


def model_config(overrides: list[str]):
    """The `model` section from `model.*=` overrides on the schema's defaults (preset 2b unless given).
    Not the composed training config: its experiment's model settings (the demo's patch) would leak in."""
    from omegaconf import OmegaConf

    from vgen.config import ModelConfig

    bad = [o for o in overrides if not o.startswith("model.")]
    if bad:
        raise SystemExit(f"only model.* overrides are understood here, got {bad}")
    given = OmegaConf.from_dotlist([o[len("model."):] for o in overrides])
    return OmegaConf.merge(OmegaConf.structured(ModelConfig(preset="2b")), given)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.preset=2b (default preset: 2b)")
    p.add_argument("--simulate", action="store_true", help="use the memory simulator instead of a device")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--world-size", type=int, default=8, help="--simulate: GPUs in the job")
    p.add_argument("--zero-stage", type=int, default=2, help="--simulate: ZeRO stage over all ranks")
    p.add_argument("--budget-gb", type=float, default=None,
                   help="GB of device memory per GPU (--simulate default: the profile's total, 85 for an H100 80GB); "
                        "with --no-gpu-terms, GB for the step's tensors alone")
    p.add_argument("--profile", default=None, help="GPU memory profile JSON (benchmarks/calibrate_memory.py); "
                   "default $VGEN_GPU_PROFILE, else the stated defaults (vgen/parallel/gpu_memory.py)")
    p.add_argument("--no-gpu-terms", action="store_true", help="--simulate: budget tensors only (the old table)")
    p.add_argument("--expandable-segments", action="store_true", help="--simulate: fragmentation as with "
                   "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    p.add_argument("--jobs", type=int, default=2, help="--simulate: processes (cells run in parallel)")
    p.add_argument("--trace-frames", type=int, nargs=2, default=(64, 128), help="--simulate: the two traced lengths")
    p.add_argument("--check", type=int, nargs="*", default=(), help="--simulate: SP degrees whose answers are "
                   "re-traced at full depth (slow: the reference the few-block timeline is checked against)")
    p.add_argument("--latent-hw", type=int, nargs=2, default=(90, 160), help="latent height and width")
    p.add_argument("--text-len", type=int, default=226)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--max-frames", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3, help="timed steps at the longest fit")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--attention-kernel", default="flash", choices=list(ATTENTION_ACCOUNTING),
                   help="--simulate: attention accounting (flash: a GPU's fused kernel and its backward workspace)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/max_seq_len_<mode>.json)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 16))
    m = model_config(args.overrides)
    dit = resolve_preset(m.preset, hidden=m.hidden, depth=m.depth, heads=m.heads, mlp_ratio=m.mlp_ratio,
                         patch=m.patch, attention=m.attention)
    args.channels = dit.in_channels
    if args.simulate:
        args.profile = load_profile(args.profile) if not args.no_gpu_terms else GpuProfile()
        args.budget_gb = args.profile.total_bytes / 1e9 if args.budget_gb is None else args.budget_gb
        mode = f"sim_{m.preset}_world{args.world_size}"
        start, cpu = time.perf_counter(), time.process_time()
        rows = run_simulated(args, dit)
        wall = time.perf_counter() - start
        args.cpu_seconds = time.process_time() - cpu + sum(r["cpu_seconds"] for r in rows if args.jobs > 1)
    else:
        mode = f"{args.device}_{m.preset}"
        start = time.perf_counter()
        rows = run_device(args, dit, torch.device(args.device))
        wall = time.perf_counter() - start
    print_table(rows, args.simulate)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"max_seq_len_{mode}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(environment("cpu" if args.simulate else args.device), preset=m.preset, simulate=args.simulate,
                  latent_hw=list(args.latent_hw), channels=args.channels, text_len=args.text_len,
                  micro_batch=args.micro_batch, budget_gb=args.budget_gb, world_size=args.world_size if args.simulate else 1,
                  zero_stage=args.zero_stage if args.simulate else 0,
                  matmul_peak_tflops=getattr(args, "matmul_peak_tflops", None), wall_seconds=wall)
    if args.simulate:
        result.update(attention_kernel=args.attention_kernel, attention_accounting=ATTENTION_ACCOUNTING[args.attention_kernel],
                      headline=headline(rows), cpu_seconds=args.cpu_seconds, jobs=args.jobs,
                      gpu_terms=None if args.no_gpu_terms else args.profile.to_json(),
                      expandable_segments=args.expandable_segments, trace_frames=list(args.trace_frames),
                      budget_meaning="tensors only" if args.no_gpu_terms else "device memory per GPU, GPU terms included")
    result["rows"] = rows
    title = f"{m.preset}, latent {args.latent_hw[0]}x{args.latent_hw[1]}, {mode}"
    if args.simulate:
        title += f", {args.budget_gb:g} GB/GPU, {args.attention_kernel} attention"
    note = plot(rows, out.with_suffix(".png"), title)
    if note:
        result["png"] = note
        print(note)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} ({wall:.0f}s wall" + (f", {args.cpu_seconds:.0f}s cpu)" if args.simulate else ")"))
    return result


if __name__ == "__main__":
    main()
