"""Checkpoint writes that do not stop training: snapshot on the training thread, write on a background one.

`SnapshotEngine` replaces DeepSpeed's checkpoint engine. DeepSpeed hands it every state dict it saves
(model, optimizer partitions, LR scheduler); it clones the tensors (the snapshot: training mutates the
live ones in place at the next step) and queues the write instead of calling torch.save. `Writer` runs
the queued writes of one save as one job, fsyncs and checksums every file, and reports done or the error.

Why not DeepSpeed's own `decoupled` checkpoint engine: it writes through FastCheckpointEngine (the
async_io op, built for NVMe on GPU nodes, absent on CPU), commits `latest` itself, and has no checksums;
vgen needs the files fsynced and checksummed before *its* completeness marker, on CPU and GPU alike.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch
from deepspeed.checkpoint.utils import clone_tensors_for_torch_save
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from vgen.train.durable import fault_point, seal_file


def _snapshot(obj):
    """Tensors cloned to CPU, containers copied, everything else shared (DeepSpeed's helper)."""
    return clone_tensors_for_torch_save(obj, device=torch.device("cpu"))


class SnapshotEngine(CheckpointEngine):
    """DeepSpeed checkpoint engine that collects (snapshot, path) pairs instead of writing them."""

    def __init__(self):
        super().__init__(None)
        self.name = "vgen-snapshot"
        self.pending: list[tuple[object, str]] = []

    def create(self, info) -> None:
        pass

    def save(self, state_dict, path: str) -> None:
        self.pending.append((_snapshot(state_dict), path))

    def load(self, path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=False)

    def commit(self, info) -> bool:
        return True

    def take(self) -> list[tuple[object, str]]:
        out, self.pending = self.pending, []
        return out


def _lower_priority() -> None:
    # Linux threads are tasks with their own nice value: the writer yields the CPU to the training thread
    # (serialising and hashing a large checkpoint would otherwise steal cores the step needs)
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


class Writer:
    """Runs one save's writes at a time, inline (sync) or on a background thread (async).

    Args:
        background: write on a thread while training goes on; else `submit` returns after writing.
    """

    def __init__(self, background: bool):
        self.background = background
        self._pool = ThreadPoolExecutor(1, "vgen-ckpt-writer", initializer=_lower_priority) if background else None
        self.future: Future | None = None

    def submit(self, root: Path, items: list[tuple[object, str]], extra: list[Callable[[], list[Path]]],
               step: int) -> None:
        """Write `items` (state, path) with torch.save, then run `extra` (each returns paths it wrote).

        The result (a {relative path: {sha256, bytes}} dict of every file written) or the exception is
        kept in `self.future`.
        """
        assert self.future is None or self.future.done(), "at most one save in flight"
        if self._pool is None:
            self.future = Future()
            try:
                self.future.set_result(_write(root, items, extra, step))
            except BaseException as e:  # noqa: BLE001 - reported at the step boundary, like the async path
                self.future.set_exception(e)
        else:
            self.future = self._pool.submit(_write, root, items, extra, step)

    def in_flight(self) -> bool:
        return self.future is not None and not self.future.done()

    def wait(self) -> None:
        if self.future is not None:
            self.future.exception()  # blocks until done; the error itself is read by `result`

    def result(self) -> dict:
        """Files written by the last save; raises what the write raised."""
        future, self.future = self.future, None
        return future.result() if future is not None else {}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _write(root: Path, items, extra, step: int) -> dict:
    sums = {}
    for i, (state, path) in enumerate(items):
        fault_point("ckpt_write", step)  # ENOSPC injection before any byte; SIGKILL between files
        torch.save(state, path)
        name, info = seal_file(path, root)
        sums[name] = info
        if i == 0:
            fault_point("ckpt_write_mid", step)
    for job in extra:
        for path in job():
            if Path(path).is_relative_to(root):
                name, info = seal_file(path, root)
                sums[name] = info
    return sums
