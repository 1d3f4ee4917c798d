"""Bytes each rank sends per DiT block for every sequence-parallel mode, measured on CPU gloo ranks.

    python benchmarks/sp_comm.py                            # 4 ranks, tiny preset, 8 frames x 16x16 tokens
    python benchmarks/sp_comm.py --world 2 --frames 8 --hw 16 16 --ulysses-degree 1

The figures are what vgen.parallel.comm.COUNTER recorded: the sizes of the tensors the wrappers hand to
torch.distributed, less the chunk an all-to-all keeps, for one forward and one backward at batch 1 in fp32.
Byte counts do not depend on the machine, so a 2-core CPU run answers the question exactly. The seq_out
all-gather runs once per model, not per block, and is reported apart. Writes
benchmarks/results/sp_comm_world<W>.json with the command, git commit, torch version and raw counts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = ("ulysses", "ring", "hybrid", "switch")


def _measure(mode: str, args) -> dict:
    """One forward + backward under `mode`; returns {label: bytes} of this rank."""
    from vgen.models import VideoDiT, resolve_preset
    from vgen.parallel.comm import COUNTER
    from vgen.parallel.sequence import apply_sequence_parallel
    from vgen.parallel.topology import build_topology

    sp_cfg = SimpleNamespace(mode=mode, degree=args.world, ulysses_degree=args.ulysses_degree)
    torch.manual_seed(0)
    model = VideoDiT(resolve_preset(args.preset, depth=args.depth, text_dim=32))
    topo = build_topology(sp_cfg, heads=model.cfg.heads)
    apply_sequence_parallel(model, topo, sp_cfg)
    h, w = args.hw
    pt, ph, pw = model.cfg.patch
    x = torch.randn(1, model.cfg.in_channels, args.frames * pt, h * ph, w * pw)
    text, mask = torch.randn(1, 8, 32), torch.ones(1, 8, dtype=torch.bool)
    COUNTER.reset()
    model(x, torch.rand(1), text, mask).square().mean().backward()
    return COUNTER.snapshot()


def _worker(rank: int, args, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=args.world)
    counts = {mode: _measure(mode, args) for mode in MODES}
    every = [None] * args.world
    dist.all_gather_object(every, counts)
    if rank == 0:
        Path(out).write_text(json.dumps(every))
    dist.destroy_process_group()


def per_block(counts: dict, depth: int) -> dict:
    """Per-block bytes by attention kind and direction, plus totals; seam bytes kept whole."""
    table = {"seam": {k: v for k, v in counts.items() if k.startswith("seq_out")}}
    for label, value in counts.items():
        if not label.startswith("seq_out"):
            table[label] = value // depth
    table["block_fwd"] = sum(v for k, v in table.items() if k.endswith("/fwd") and k != "seam")
    table["block_fwd_bwd"] = table["block_fwd"] + sum(v for k, v in table.items() if k.endswith("/bwd"))
    return table


def _git_commit() -> str:
    try:
        sha = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
        # only the code that decides the figures; other work in progress in the tree does not change them
        paths = ["vgen/parallel", "vgen/models/dit.py", "vgen/models/attention.py", "benchmarks/sp_comm.py"]
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", *paths], cwd=ROOT).returncode != 0
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=4, help="ranks = SP degree")
    p.add_argument("--ulysses-degree", type=int, default=2, help="Ulysses level of hybrid")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--depth", type=int, default=2, help="blocks run (figures are per block)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--hw", type=int, nargs=2, default=(16, 16), help="tokens per frame (h, w)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()

    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        from vgen.parallel.topology import _free_port

        mp.spawn(_worker, args=(args, _free_port(), tmp.name), nprocs=args.world, join=True)
        ranks = json.loads(Path(tmp.name).read_text())
    # every rank sends the same volume in these modes; report rank 0 and check that claim
    same = all(r == ranks[0] for r in ranks)
    table = {mode: per_block(ranks[0][mode], args.depth) for mode in MODES}
    ratio = {k: table["switch"][k] / table["ulysses"][k] for k in ("block_fwd", "block_fwd_bwd")}
    _print(args, table, ratio, same)
    result = {
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "git_commit": _git_commit(),
        "torch": torch.__version__,
        "device": f"cpu ({platform.processor() or platform.machine()}), gloo, {args.world} ranks",
        "shape": {"frames": args.frames, "hw": list(args.hw), "batch": 1, "dtype": "float32", "preset": args.preset},
        "ulysses_degree_hybrid": args.ulysses_degree,
        "all_ranks_equal": same,
        "per_block_bytes": table,
        "switch_over_ulysses": ratio,
        "raw_per_rank": ranks,
    }
    out = Path(args.out) / f"sp_comm_world{args.world}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


def _print(args, table, ratio, same) -> None:
    h, w = args.hw
    print(f"bytes sent per rank per block, {args.world} ranks, {args.frames} frames x {h}x{w} tokens, fp32, batch 1")
    print(f"{'mode':8s} {'spatial fwd/bwd':>21s} {'temporal fwd/bwd':>21s} {'block fwd':>11s} {'fwd+bwd':>11s}")
    for mode, t in table.items():
        cells = [f"{t.get(k + '/fwd', 0):>10,d}/{t.get(k + '/bwd', 0):<10,d}" for k in ("spatial", "temporal")]
        print(f"{mode:8s} {cells[0]} {cells[1]} {t['block_fwd']:>11,d} {t['block_fwd_bwd']:>11,d}")
    print(f"switch / ulysses: forward {ratio['block_fwd']:.3f}, forward+backward {ratio['block_fwd_bwd']:.3f}")
    print(f"all ranks sent the same: {same}; seq_out (once per model): {table['ulysses']['seam']}")


if __name__ == "__main__":
    main()
