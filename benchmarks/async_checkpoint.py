"""Step time while a checkpoint is being saved: synchronous vs asynchronous (checkpoint.async) saves.

    python benchmarks/async_checkpoint.py                       # CPU, writes benchmarks/results/async_checkpoint_cpu.json
    python benchmarks/async_checkpoint.py --hidden 768 --depth 12 --steps 60 --every 15

For each mode, one run (1 rank, the real Trainer) with a model large enough that a save takes several steps.
The time of every loop iteration is measured as the training loop spends it: the step, then (when due) the
save call, then the check that completes an async save. An iteration "overlaps a save" from the one that
starts it to the one at whose end the save is marked complete. The figure per mode is

    ratio = mean(iterations overlapping a save) / mean(iterations without one)

Sync saves put the whole write (serialise, fsync, sha256) into one iteration; async saves put only the
snapshot (a copy to host memory) there and write on a low-priority thread while training goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent


def overrides(args, run_dir: Path, shards: Path, mode: str) -> list[str]:
    return [f"run.dir={run_dir}", f"data.path={shards}", "run.device=cpu", "log.wandb=disabled", "log.progress=false",
            f"model.hidden={args.hidden}", f"model.depth={args.depth}", f"model.heads={args.heads}",
            "data.num_frames=4", "data.height=16", "data.width=16", "data.micro_batch=2", "text.max_length=8",
            f"train.max_steps={args.steps}", f"checkpoint.every_steps={args.every}", "checkpoint.keep=2",
            f"checkpoint.async={'true' if mode == 'async' else 'false'}", "train.optim.warmup_steps=1"]


def run_mode(args, mode: str, workdir: Path, shards: Path) -> dict:
    """Train `args.steps` steps saving every `args.every`; per-iteration times and which overlapped a save."""
    from vgen.config import load_config
    from vgen.train.trainer import Trainer

    trainer = Trainer(load_config(overrides(args, workdir / mode, shards, mode)))
    times, saving, save_s = [], [], []
    in_save = False
    for _ in range(args.steps):
        start = time.perf_counter()
        trainer.train_step()
        started = trainer._due(args.every)
        if started:
            t = time.perf_counter()
            trainer.save()
            save_s.append(time.perf_counter() - t)
        overlapped = started or in_save
        in_save = in_save or started
        if trainer.ckpt.pending and not trainer.ckpt.busy():
            trainer.ckpt.finish()
        if not trainer.ckpt.pending:
            in_save = False
        times.append(time.perf_counter() - start)
        saving.append(overlapped)
    trainer.ckpt.close()
    trainer.loader.close()
    num_params = sum(p.numel() for p in trainer.engine.module.parameters())
    ckpt_bytes = sum(p.stat().st_size for p in (workdir / mode / "checkpoints").rglob("*") if p.is_file())
    keep = list(range(args.warmup, args.steps))  # the first steps pay one-time costs
    with_save = [times[i] for i in keep if saving[i]]
    without = [times[i] for i in keep if not saving[i]]
    return {"mode": mode, "iteration_s": times, "overlaps_save": saving, "save_call_s": save_s,
            "mean_with_save_s": sum(with_save) / len(with_save), "mean_without_save_s": sum(without) / len(without),
            "ratio": (sum(with_save) / len(with_save)) / (sum(without) / len(without)),
            "iterations_per_save": sum(saving) / max(1, len(save_s)),
            "num_params": num_params, "checkpoint_dir_bytes": ckpt_bytes}


def plot(result: dict, png: Path) -> None:
    """Per-iteration time of both runs, iterations overlapping a save marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    for mode, color in (("sync", "tab:red"), ("async", "tab:blue")):
        r = result["results"][mode]
        steps = range(1, len(r["iteration_s"]) + 1)
        ax.plot(steps, r["iteration_s"], color=color, label=f"{mode}: ratio {r['ratio']:.2f}")
        ax.scatter([s for s, o in zip(steps, r["overlaps_save"]) if o],
                   [t for t, o in zip(r["iteration_s"], r["overlaps_save"]) if o], color=color, s=14)
    ax.set_xlabel("iteration (dots: overlapping a save)")
    ax.set_ylabel("seconds")
    ax.set_title(f"{result['results']['sync']['num_params'] / 1e6:.0f}M-parameter DiT, 1 CPU rank, save every "
                 f"{result['settings']['every']} steps")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plot", help="only draw the PNG of an existing results JSON")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "async_checkpoint_cpu.json"))
    args = p.parse_args()
    if args.plot:
        return plot(json.loads(Path(args.plot).read_text()), Path(args.plot).with_suffix(".png"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from vgen.data.demo import write_demo_shards

    with tempfile.TemporaryDirectory(prefix="vgen-async-bench-") as tmp:
        shards = Path(tmp) / "shards"
        write_demo_shards(shards, num_clips=32, clips_per_shard=8, num_frames=4, height=16, width=16)
        results = [run_mode(args, mode, Path(tmp), shards) for mode in ("sync", "async")]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    out = {"device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared)",
           "torch": torch.__version__, "command": " ".join([sys.executable] + sys.argv), "commit": commit,
           "settings": vars(args), "results": {r["mode"]: r for r in results},
           "summary": {r["mode"]: round(r["ratio"], 3) for r in results}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    plot(out, Path(args.out).with_suffix(".png"))
    print(json.dumps(out["summary"]), "->", args.out)


if __name__ == "__main__":
    main()
