"""Metrics on rank 0: metrics.jsonl in the run directory, wandb (offline unless asked), a progress line."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

# dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, for MFU
_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def gpu_peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in _PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg, is_main: bool, total_steps: int, start_step: int):
        self.is_main, self.total, self.start_step = is_main, total_steps, start_step
        self.path = Path(run_dir) / "metrics.jsonl"
        self.t0 = time.perf_counter()
        self.wandb = None
        self.tty = sys.stderr.isatty() and cfg.log.progress
        if is_main and cfg.log.wandb != "disabled":
            self.wandb = _start_wandb(cfg, run_dir)

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        if record["step"] > self.start_step:  # a resumed run continues the file; drop rows it will redo
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])
        self._progress(record)

    def _progress(self, r: dict) -> None:
        done = r["step"] - self.start_step
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total - r["step"])
        line = (
            f"step {r['step']}/{self.total} loss {r['loss']:.4f} lr {r['lr']:.2e} "
            f"{done / max(elapsed, 1e-9):.2f} it/s {r['tokens_per_s']:.0f} tok/s ETA {_hms(eta)}"
        )
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty and self.is_main:
            print(file=sys.stderr)
        if self.wandb is not None:
            self.wandb.finish()


def truncate_after(path: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint we resume from (they will be logged again)."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(r + "\n" for r in rows))


def _start_wandb(cfg, run_dir: Path):
    try:
        import wandb
    except ImportError:
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(
        project=cfg.log.wandb_project,
        dir=str(run_dir),
        mode=cfg.log.wandb,
        name=Path(run_dir).name,
        resume="allow",
        id="vgen-" + hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:12],
        config=None,
    )


def _hms(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"
