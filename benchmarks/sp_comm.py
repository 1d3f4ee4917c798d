"""Which sequence-parallel mode for which shape: per rank and per DiT block, the bytes each mode sends
(forward, backward, and re-sent by each checkpointing policy's recomputation), the kernel FLOPs, and the
peak memory of one block's forward + backward, measured on CPU gloo ranks.

    python benchmarks/sp_comm.py                      # the default shapes (about 5 min on 2 busy cores)
    python benchmarks/sp_comm.py --shapes 16x16x16x4  # frames x h x w (tokens) x degree, several allowed

What is exact on a CPU: bytes are what vgen.parallel.comm.COUNTER (and, for ring, its P2P exchanges)
recorded at the torch.distributed call, less the chunk an all-to-all keeps; "re-sent" is a policy's total
minus the no-checkpointing total, so it holds for any mode's collectives. FLOPs are
torch.utils.flop_counter's over the block (CPU's fused attention op is given the same formula as the CUDA
ones). Peak memory counts the storages the block's forward + backward allocate on this rank (a dispatch-
mode tracker on real CPU tensors; fp32, batch 1; the block's inputs and weights excluded). All figures are
for rank 0 of the SP group; the JSON keeps every rank's bytes. No GPU was used: step times are not here.
Modes are built by vgen.parallel.sequence, so a re-run picks up whatever ring/hybrid implementation the
tree holds. Writes benchmarks/results/sp_modes.json and sp_modes.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = ("ulysses", "ring", "hybrid", "switch")
POLICIES = ("none", "block", "selective", "nested")
DEFAULT_SHAPES = ("16x16x16x4", "21x16x16x4", "2x32x32x4", "8x16x16x2")
aten = torch.ops.aten


def _register_cpu_attention_flops() -> None:
    """torch's flop counter knows the CUDA fused attention ops but not the CPU flash kernel; same math."""
    try:
        @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
        def _fwd(query, key, value, *args, out_val=None, **kwargs):
            return sdpa_flop_count(query, key, value)  # shapes: the formula gets shapes

        @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
        def _bwd(grad_out, query, key, value, *args, out_val=None, **kwargs):
            return sdpa_backward_flop_count(grad_out, query, key, value)
    except (RuntimeError, ValueError):  # a newer torch registers them itself
        pass


class PeakTracker(TorchDispatchMode):
    """Bytes of the storages created under this mode that are alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.seen = 0, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t._is_view():
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in self.seen or storage.nbytes() == 0:
                    continue
                self.seen.add(key)
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, key, storage.nbytes())
        return out

    def _free(self, key, n):
        self.seen.discard(key)
        self.live -= n


def _model(args, mode: str, degree: int, policy: str):
    from vgen.models import VideoDiT, resolve_preset
    from vgen.parallel.checkpointing import apply_memory_policy
    from vgen.parallel.sequence import apply_sequence_parallel
    from vgen.parallel.topology import build_topology

    torch.manual_seed(0)
    cfg = resolve_preset(args.preset, depth=1, hidden=args.hidden, heads=args.heads, text_dim=32)
    model = VideoDiT(cfg)
    with torch.no_grad():  # non-zero adaLN gates, so every branch carries gradient
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    sp_cfg = SimpleNamespace(mode=mode, degree=degree, ulysses_degree=min(args.ulysses_degree, degree))
    apply_sequence_parallel(model, build_topology(sp_cfg, heads=cfg.heads), sp_cfg)
    if policy != "none":
        apply_memory_policy(model, SimpleNamespace(checkpointing=policy, ratio=1.0, offload=False, mlp_chunks=1))
    return model


def _inputs(model, frames: int, h: int, w: int):
    g = torch.Generator().manual_seed(1)
    pt, ph, pw = model.cfg.patch
    x = torch.randn(1, model.cfg.in_channels, frames * pt, h * ph, w * pw, generator=g)
    return x, torch.rand(1, generator=g), torch.randn(1, 8, 32, generator=g), torch.ones(1, 8, dtype=torch.bool)


def _measure(args, mode: str, shape, policy: str) -> dict:
    """One forward + backward of a one-block model; bytes by label, and (policy none) FLOPs and peak."""
    from vgen.parallel.comm import COUNTER

    frames, h, w, degree = shape
    model = _model(args, mode, degree, policy)
    inputs = _inputs(model, frames, h, w)
    row = {}
    if policy == "none":
        row.update(_block_step(model, inputs))
    COUNTER.reset()
    model.zero_grad(set_to_none=True)
    model(*inputs).square().mean().backward()
    row["bytes"] = COUNTER.snapshot()
    return row


class FlopTracker(TorchDispatchMode):
    """torch.utils.flop_counter's formulas without its module tracker (whose backward hooks clash with
    the lean ops' autograd.grad inside backward)."""

    def __init__(self):
        super().__init__()
        self.total, self.attention = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            flops = int(formula(*args, **(kwargs or {}), out_val=out))
            self.total += flops
            self.attention += flops if "attention" in func.name() else 0
        return out


def _block_step(model, inputs) -> dict:
    """FLOPs and peak bytes of the block's forward and backward (its inputs and weights excluded)."""
    block = model.blocks[0]
    x, t, text, mask = inputs
    captured = {}
    hook = block.register_forward_pre_hook(lambda m, a: captured.setdefault("args", a))
    with torch.no_grad():
        model(x, t, text, mask)
    hook.remove()
    args = [a.detach().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a for a in captured["args"]]
    args[0] = args[0].detach().requires_grad_()
    with FlopTracker() as flops, PeakTracker() as tracker:
        out = block(*args)
        out.backward(torch.ones_like(out))
    return {"block_flops": flops.total, "attention_flops": flops.attention, "peak_bytes": tracker.peak}


def _worker(rank: int, world: int, args, shape, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    _register_cpu_attention_flops()
    rows = {}
    for mode in MODES:
        if mode == "hybrid" and shape[3] < 4:
            continue  # hybrid needs two levels
        rows[mode] = {policy: _measure(args, mode, shape, policy) for policy in POLICIES}
    every = [None] * world
    dist.all_gather_object(every, rows)
    if rank == 0:
        Path(out).write_text(json.dumps(every))
    dist.destroy_process_group()


def _sum(counts: dict, suffixes) -> int:
    return sum(v for k, v in counts.items() if not k.startswith("seq_out") and k.endswith(suffixes))


def summarise(rows: dict, shape, hidden: int) -> dict:
    """Per-block figures of rank 0 for one shape: one entry per mode."""
    frames, h, w, degree = shape
    local_act = -(-frames * h * w // degree) * hidden * 4  # one (N/sp, hidden) fp32 activation
    table = {}
    for mode, by_policy in rows.items():
        base = by_policy["none"]
        total = _sum(base["bytes"], ("/fwd", "/bwd", "/recompute"))
        entry = {
            "fwd_bytes": _sum(base["bytes"], ("/fwd",)),
            "bwd_bytes": _sum(base["bytes"], ("/bwd",)),
            "block_flops": base["block_flops"],
            "attention_flops": base["attention_flops"],
            "peak_bytes": base["peak_bytes"],
        }
        for policy in POLICIES[1:]:
            entry[f"resent_{policy}"] = _sum(by_policy[policy]["bytes"], ("/fwd", "/bwd", "/recompute")) - total
        entry["fwd_activations"] = entry["fwd_bytes"] / local_act
        table[mode] = entry
    for entry in table.values():
        entry["fwd_over_ulysses"] = entry["fwd_bytes"] / table["ulysses"]["fwd_bytes"]
    return table


def _git_commit() -> str:
    try:
        sha = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
        paths = ["vgen/parallel", "vgen/models", "benchmarks/sp_comm.py"]
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", *paths], cwd=ROOT).returncode != 0
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _parse_shape(text: str):
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) != 4:
        raise SystemExit(f"--shapes {text!r}: expected frames x h x w x degree, e.g. 16x16x16x4")
    return tuple(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="frames x h x w (tokens) x SP degree")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=8, help="divisible by the degree, for Ulysses")
    p.add_argument("--ulysses-degree", type=int, default=2, help="Ulysses level of hybrid")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()

    from vgen.parallel.topology import _free_port

    results = []
    for shape in map(_parse_shape, args.shapes):
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            mp.spawn(_worker, args=(shape[3], args, shape, _free_port(), tmp.name), nprocs=shape[3], join=True)
            ranks = json.loads(Path(tmp.name).read_text())
        table = summarise(ranks[0], shape, args.hidden)
        results.append({"frames": shape[0], "hw": list(shape[1:3]), "degree": shape[3], "modes": table,
                        "raw_bytes_per_rank": [{m: {pol: r[m][pol]["bytes"] for pol in r[m]} for m in r} for r in ranks]})
        _print(shape, table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git_commit": _git_commit(),
        "torch": torch.__version__,
        "device": f"cpu ({platform.processor() or platform.machine()}), gloo; no GPU",
        "model": {"preset": args.preset, "hidden": args.hidden, "heads": args.heads, "depth": 1, "dtype": "float32", "batch": 1},
        "ulysses_degree_hybrid": args.ulysses_degree,
        "shapes": results,
    }
    (out / "sp_modes.json").write_text(json.dumps(result, indent=2))
    _plot(results, out / "sp_modes.png")
    print(markdown(result))
    print(f"wrote {out / 'sp_modes.json'} and {out / 'sp_modes.png'}")


def markdown(result: dict) -> str:
    """The README's table from a result (python -c "...markdown(json.load(...))" re-renders a saved one)."""
    lines = ["| frames × tokens, degree | mode | fwd KB | bwd KB | activations | × Ulysses | re-sent KB block / selective / nested | block GFLOP | attention GFLOP | peak MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["shapes"]:
        shape = f"{r['frames']} × {r['hw'][0]}×{r['hw'][1]}, sp={r['degree']}"
        for mode, e in r["modes"].items():
            resent = " / ".join(f"{e[f'resent_{p}'] / 1024:,.0f}" for p in POLICIES[1:])
            lines.append(f"| {shape} | {mode} | {e['fwd_bytes'] / 1024:,.0f} | {e['bwd_bytes'] / 1024:,.0f} | "
                         f"{e['fwd_activations']:.2f} | {e['fwd_over_ulysses']:.2f} | {resent} | {e['block_flops'] / 1e9:.3f} | "
                         f"{e['attention_flops'] / 1e9:.3f} | {e['peak_bytes'] / 2**20:.1f} |")
            shape = ""
    return "\n".join(lines)


def _print(shape, table) -> None:
    frames, h, w, degree = shape
    print(f"\n{frames} frames x {h}x{w} tokens, degree {degree}: per rank per block (rank 0, fp32, batch 1)")
    print(f"{'mode':8s} {'fwd KB':>8s} {'bwd KB':>8s} {'acts':>5s} {'/uly':>5s} {'re-sent KB block/sel/nested':>28s} "
          f"{'GFLOP':>7s} {'attn GFLOP':>10s} {'peak MB':>8s}")
    for mode, e in table.items():
        resent = "/".join(f"{e[f'resent_{p}'] / 1024:.0f}" for p in POLICIES[1:])
        print(f"{mode:8s} {e['fwd_bytes'] / 1024:8.0f} {e['bwd_bytes'] / 1024:8.0f} {e['fwd_activations']:5.2f} "
              f"{e['fwd_over_ulysses']:5.2f} {resent:>28s} {e['block_flops'] / 1e9:7.3f} {e['attention_flops'] / 1e9:10.3f} "
              f"{e['peak_bytes'] / 2**20:8.1f}")


def _plot(results, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install -e '.[bench]'): no PNG")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    labels = [f"{r['frames']}x{r['hw'][0]}x{r['hw'][1]}\nsp={r['degree']}" for r in results]
    metrics = [("fwd_bytes", "forward KB per block per rank", 1024), ("block_flops", "GFLOP per block (fwd+bwd), rank 0", 1e9),
               ("peak_bytes", "peak MB, block fwd+bwd per rank", 2**20)]
    width = 0.2
    for ax, (key, title, unit) in zip(axes, metrics):
        for k, mode in enumerate(MODES):
            xs = [i + (k - 1.5) * width for i, r in enumerate(results) if mode in r["modes"]]
            ys = [r["modes"][mode][key] / unit for r in results if mode in r["modes"]]
            ax.bar(xs, ys, width, label=mode)
        ax.set_xticks(range(len(results)), labels)
        ax.set_title(title)
    axes[0].legend()
    fig.suptitle("sequence-parallel modes, measured on CPU gloo ranks (tiny DiT block, fp32)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
