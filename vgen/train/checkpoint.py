"""Checkpoints in the run directory: save (sync or async), find the newest verified one, prune, export.

Layout of RUN/checkpoints/:
  step00000300/            DeepSpeed's files (model, optimizer, LR scheduler)
    rank00000.pt ...       per-rank state: data position, RNG states, EMA shards
    universal/             made at resume when the saved layout (world size, ZeRO stage) differs
    meta.json              written last, by rank 0, after every rank's files are fsynced: marks the tag
                           complete; holds the run's layout and a sha256 of every file
  latest                   the newest complete tag, replaced atomically after meta.json

A process killed while writing leaves a tag without meta.json; resume ignores it and takes the previous
complete one, and the next successful save removes it. A complete tag whose files fail their checksum is
skipped at resume, naming the file. See vgen/train/durable.py and vgen/train/async_save.py.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from vgen.config import ConfigError
from vgen.train.async_save import SnapshotEngine, Writer
from vgen.train.durable import SaveError, atomic_write_text, fault_point, find_bad_file, fsync_dir, fsync_file

META = "meta.json"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


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
    """Saves and finds checkpoints. Every method that says "collective" must be called on every rank.

    Args:
        keep: complete checkpoints to keep.
        model_signature: what must match for a checkpoint to load into this model.
        background: write saves on a background thread (checkpoint.async).
    """

    def __init__(self, run_dir: str | Path, keep: int, model_signature: dict, background: bool = False):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.signature = model_signature
        self.writer = Writer(background)
        self.pending: dict | None = None  # the save whose files are being written: {"tag", "step", "meta"}

    # ---- finding a checkpoint ---------------------------------------------------------------------------
    def complete_tags(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.name for p in self.dir.iterdir() if p.is_dir() and (p / META).is_file())

    def candidates(self) -> list[str]:
        """Complete tags, the one named by `latest` first, then the others newest first."""
        tags = self.complete_tags()[::-1]
        latest = self.dir / "latest"
        named = latest.read_text().strip() if latest.is_file() else None
        return ([named] if named in tags else []) + [t for t in tags if t != named]

    def latest_complete(self) -> str | None:
        """The tag named by `latest` if complete, else the newest complete tag, else None (no verification)."""
        tags = self.candidates()
        return tags[0] if tags else None

    def read_meta(self, tag: str) -> dict:
        return json.loads((self.dir / tag / META).read_text())

    def select_resume_tag(self, log: Callable[[str], None]) -> str | None:
        """The newest complete checkpoint whose files all pass their checksum (collective).

        Ranks verify interleaved slices of the file list, so no rank reads the whole checkpoint; a bad
        file makes every rank fall back to the previous complete checkpoint, and the file is named.
        """
        rank, world = dist.get_rank(), dist.get_world_size()
        for tag in self.candidates():
            files = self.read_meta(tag).get("files")
            if files is None:  # written before checksums existed: complete, but unverifiable
                return tag
            mine = sorted(files)[rank::world]
            bad = [b for b in _all_gather(find_bad_file(self.dir / tag, files, mine)) if b]
            if not bad:
                return tag
            log(f"checkpoint {tag} is damaged: {bad[0]}; falling back to the previous complete checkpoint")
        return None

    def check_compatible(self, tag: str) -> None:
        """Refuse to resume a checkpoint written for a different model; names the differing settings."""
        saved = self.read_meta(tag)["model_signature"]
        diffs = [f"{k}: checkpoint {saved.get(k)!r} != config {v!r}" for k, v in self.signature.items() if saved.get(k) != v]
        if diffs:
            raise ConfigError(
                f"run.dir={str(self.dir.parent)!r} holds checkpoint {tag} from an incompatible model config ("
                + "; ".join(diffs) + "). Use another run.dir or the same model settings; nothing was changed."
            )

    def load_rank_state(self, tag: str, rank: int | None = None) -> dict | None:
        rank = dist.get_rank() if rank is None else rank
        path = self.dir / tag / f"rank{rank:05d}.pt"
        return torch.load(path, weights_only=False) if path.is_file() else None

    # ---- saving -----------------------------------------------------------------------------------------
    def use_snapshot_engine(self, engine) -> None:
        """DeepSpeed hands its state dicts to us; the writer writes them (see async_save.py)."""
        engine.checkpoint_engine = SnapshotEngine()

    def save(self, engine, step: int, rank_state: dict, meta: dict, export: Callable[[], list] | None = None) -> str:
        """Start saving at `step` (collective). Sync: returns with the checkpoint complete. Async: the files
        are written in the background; `finish` (at a later step boundary) marks it complete.

        Args:
            meta: the run's layout (world size, global batch, ...) recorded in meta.json.
            export: a job run by the writer after the checkpoint files (the safetensors export).
        """
        if self.pending is not None:  # at most one save in flight
            self.writer.wait()
            self.finish()
        tag = tag_for(step)
        rank = dist.get_rank()
        if rank == 0 and (self.dir / tag).exists():
            shutil.rmtree(self.dir / tag)  # torn by an earlier killed save of the same step
        dist.barrier()
        fault_point("ckpt_begin", step)
        engine.save_checkpoint(str(self.dir), tag=tag, save_latest=False, client_state=_universal_info())
        items = engine.checkpoint_engine.take() + [(_snapshot_rank_state(rank_state), str(self.dir / tag / f"rank{rank:05d}.pt"))]
        fault_point("ckpt_snapshot", step)
        self.pending = {"tag": tag, "step": step, "meta": meta}
        self.writer.submit(self.dir / tag, items, [export] if export else [], step)
        if not self.writer.background:
            self.finish()
        return tag

    def busy(self) -> bool:
        """This rank is still writing the pending save."""
        return self.writer.in_flight()

    def finish(self) -> str | None:
        """Mark the pending save complete once every rank wrote it (collective; call when no rank is busy).

        Raises SaveError on every rank when any rank's write failed; the torn tag is removed and the
        previous complete checkpoint stays as it was.
        """
        if self.pending is None:
            return None
        pending, self.pending = self.pending, None
        tag, step = pending["tag"], pending["step"]
        fault_point("ckpt_rank_files", step)
        try:
            local = {"files": self.writer.result()}
        except OSError as e:
            from vgen.train.durable import describe_os_error

            local = {"error": describe_os_error(e, f"checkpoint {tag} on rank {dist.get_rank()}")}
        except Exception as e:  # noqa: BLE001 - any failure must stop every rank, not only this one
            local = {"error": f"saving checkpoint {tag} on rank {dist.get_rank()} failed: {type(e).__name__}: {e}"}
        results = _all_gather(local)
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            if dist.get_rank() == 0:
                shutil.rmtree(self.dir / tag, ignore_errors=True)
            dist.barrier()
            raise SaveError(errors[0])
        if dist.get_rank() == 0:
            files = {k: v for r in results for k, v in r["files"].items()}
            self._mark_complete(tag, step, {**pending["meta"], "files": files})
        dist.barrier()
        return tag

    def _mark_complete(self, tag: str, step: int, meta: dict) -> None:
        fsync_dir(self.dir / tag)  # every rank's file names are durable before the marker
        fault_point("ckpt_before_meta", step)
        meta = {"step": step, "model_signature": self.signature, **meta}
        atomic_write_text(self.dir / tag / META, json.dumps(meta, indent=1))
        fault_point("ckpt_before_latest", step)
        atomic_write_text(self.dir / "latest", tag)
        self._prune(keep_tag=tag)

    def close(self) -> None:
        """Finish a save still in flight (collective), then stop the writer."""
        if self.pending is not None:
            self.writer.wait()
            self.finish()
        self.writer.close()

    def _prune(self, keep_tag: str) -> None:
        complete = self.complete_tags()
        for tag in complete[: max(len(complete) - self.keep, 0)]:
            shutil.rmtree(self.dir / tag, ignore_errors=True)
        for p in self.dir.iterdir():  # tags left incomplete by a killed save
            if p.is_dir() and not (p / META).is_file() and p.name != keep_tag:
                shutil.rmtree(p, ignore_errors=True)


def _universal_info() -> dict:
    # ds_to_universal requires this key in the model-states file (Megatron-DeepSpeed writes it); with it
    # any checkpoint can be converted when a resume finds another world size or ZeRO stage
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_VERSION_VALUE

    return {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


def _snapshot_rank_state(state: dict) -> dict:
    from deepspeed.checkpoint.utils import clone_tensors_for_torch_save

    return clone_tensors_for_torch_save(state, device=torch.device("cpu"))


def _all_gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def export_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write inference weights atomically (rank 0 only)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    fsync_file(tmp)
    tmp.replace(path)
    fsync_dir(path.parent)
