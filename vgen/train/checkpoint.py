"""Checkpoints in the run directory: save, find the newest complete one, prune, export safetensors.

Layout of RUN/checkpoints/:
  step00000300/            DeepSpeed's files (model, optimizer, LR scheduler)
    rank00000.pt ...       per-rank state: data position, RNG states, EMA shards
    meta.json              written last, by rank 0, after every rank finished: marks the tag complete
  latest                   the newest complete tag, replaced atomically after meta.json

A process killed while writing leaves a tag without meta.json; resume ignores it and takes the previous
complete one, and the next successful save removes it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from vgen.config import ConfigError

META = "meta.json"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep: int, model_signature: dict):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.signature = model_signature  # what must match for a checkpoint to load into this model

    def complete_tags(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.name for p in self.dir.iterdir() if p.is_dir() and (p / META).is_file())

    def latest_complete(self) -> str | None:
        """The tag named by `latest` if complete, else the newest complete tag, else None."""
        latest = self.dir / "latest"
        if latest.is_file():
            tag = latest.read_text().strip()
            if (self.dir / tag / META).is_file():
                return tag
        tags = self.complete_tags()
        return tags[-1] if tags else None

    def check_compatible(self, tag: str) -> None:
        """Refuse to resume a checkpoint written for a different model; names the differing settings."""
        saved = json.loads((self.dir / tag / META).read_text())["model_signature"]
        diffs = [f"{k}: checkpoint {saved.get(k)!r} != config {v!r}" for k, v in self.signature.items() if saved.get(k) != v]
        if diffs:
            raise ConfigError(
                f"run.dir={str(self.dir.parent)!r} holds checkpoint {tag} from an incompatible model config ("
                + "; ".join(diffs) + "). Use another run.dir or the same model settings; nothing was changed."
            )

    def save(self, engine, step: int, rank_state: dict) -> str:
        """Save on every rank (a collective); returns the tag."""
        tag = tag_for(step)
        rank = dist.get_rank()
        engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False)
        torch.save(rank_state, self.dir / tag / f"rank{rank:05d}.pt")
        _maybe_fault("VGEN_FAULT_KILL_IN_CHECKPOINT", step)
        dist.barrier()
        if rank == 0:
            meta = {"step": step, "world_size": dist.get_world_size(), "model_signature": self.signature}
            _atomic_write(self.dir / tag / META, json.dumps(meta, indent=1))
            _atomic_write(self.dir / "latest", tag)
            self._prune(keep_tag=tag)
        dist.barrier()
        return tag

    def load_rank_state(self, tag: str) -> dict | None:
        path = self.dir / tag / f"rank{dist.get_rank():05d}.pt"
        return torch.load(path, weights_only=False) if path.is_file() else None

    def _prune(self, keep_tag: str) -> None:
        complete = self.complete_tags()
        for tag in complete[: max(len(complete) - self.keep, 0)]:
            shutil.rmtree(self.dir / tag, ignore_errors=True)
        for p in self.dir.iterdir():  # tags left incomplete by a killed save
            if p.is_dir() and not (p / META).is_file() and p.name != keep_tag:
                shutil.rmtree(p, ignore_errors=True)


def _maybe_fault(var: str, step: int) -> None:
    """Fault injection for the kill-during-checkpoint test: SIGKILL this process mid-save at `step`."""
    if os.environ.get(var) == str(step) and dist.get_rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)


def export_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write inference weights atomically (rank 0 only)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
