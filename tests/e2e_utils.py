"""Helpers for end-to-end tests: run the real launchers on tiny settings and read what they logged."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
DEEPSPEED = str(Path(PY).parent / "deepspeed")
TORCHRUN = str(Path(PY).parent / "torchrun")

# a model and data small enough that a 2-rank step takes well under a second on one core
TINY = [
    "model.hidden=32", "model.depth=2", "model.heads=2",
    "data.num_frames=4", "data.height=16", "data.width=16", "data.micro_batch=2",
    "log.wandb=disabled", "log.every_steps=1", "text.max_length=8",
    "train.optim.warmup_steps=2", "train.optim.lr=1e-3",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    e.pop("WANDB_MODE", None)  # log.wandb decides (TINY disables it; never online in tests)
    for var in ("VGEN_FAULT_KILL_IN_CHECKPOINT", "VGEN_FAULT", "VGEN_FAULT_ENOSPC", "VGEN_FAULT_TERM", "VGEN_FAULT_CRASH_DECODE"):
        e.pop(var, None)
    return e


def launcher_cmd(kind: str, script: str, nproc: int = 2) -> list[str]:
    """The command line that starts `script` under `kind`: "python", "torchrun" or "deepspeed"."""
    if kind == "python":
        return [PY, script]
    if kind == "torchrun":
        return [TORCHRUN, f"--nproc_per_node={nproc}", f"--master_port={free_port()}", script]
    return [DEEPSPEED, f"--num_gpus={nproc}", f"--master_port={free_port()}", script]


def launch(kind: str, args: list[str], nproc: int = 2, extra_env: dict | None = None, timeout: int = 300):
    """Run launch/train.py under `kind` ("python", "torchrun", "deepspeed"); returns CompletedProcess."""
    cmd = launcher_cmd(kind, str(ROOT / "launch" / "train.py"), nproc)
    e = env()
    e.update(extra_env or {})
    return run_group(cmd + TINY + args, e, timeout)


def run_group(cmd: list[str], e: dict, timeout: int) -> subprocess.CompletedProcess:
    """Run `cmd` in its own process group; on timeout kill the whole group (the launcher's ranks too)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows}


def check(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def sample_ids(run_dir: Path) -> dict[int, list[int]]:
    """Per step, the sorted sample ids the whole job trained on (data.record_keys=true, all ranks)."""
    out: dict[int, set] = {}
    for path in sorted((Path(run_dir) / "data_keys").glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            out.setdefault(row["step"], set()).update(row["sample_id"])
    return {step: sorted(ids) for step, ids in out.items()}


def demo_shards(out: Path, num_clips: int = 32) -> Path:
    from vgen.data.demo import write_demo_shards

    write_demo_shards(out, num_clips=num_clips, clips_per_shard=8, num_frames=4, height=16, width=16)
    return out


def children(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc): launchers start ranks as children or grandchildren."""
    try:
        kids = [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in children(k)]
