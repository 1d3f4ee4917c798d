"""Decoding in worker processes (`data.workers=N`), with results in task order whatever N is.

The loader decides which samples to decode (the global order, vgen/data/order.py) before any decoding, and
hands us a list of `ItemTask`s; we return their results in the same order. So the batches, and a resumed run,
are the same with 0, 1 or 8 workers: workers change only how fast a batch is ready.

Each worker holds at most one task at a time, so when a worker process dies (a decoder segfault, the OOM
killer) we know which sample killed it: that sample becomes a `SampleError("worker_crash")` -- replaced by the
loader like any bad sample -- and a fresh worker takes the next task. The run goes on.

We start workers from a fork server, not by forking the training process: that process holds threads (gloo,
the prefetch thread) and forking a threaded process can leave a lock held forever in the child. The fork
server is a clean single-threaded process that imports the decoding modules once, so a worker (and the
replacement of a crashed one) starts in milliseconds instead of re-importing torch as "spawn" would.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from multiprocessing.connection import wait

from vgen.data.items import ItemTask, SampleError, load_item


class InlineDecoder:
    """data.workers=0: decode on the calling thread."""

    def map(self, tasks: list[ItemTask]) -> list:
        """Each task's item dict, or the SampleError it raised, in task order."""
        out = []
        for task in tasks:
            try:
                out.append(load_item(task))
            except SampleError as e:
                out.append(e)
        return out

    def close(self) -> None:
        pass


def _worker_main(conn, crash_on: str | None) -> None:
    """Args: crash_on: fault injection for tests: die on the sample of this key (VGEN_FAULT_CRASH_DECODE)."""
    import torch

    torch.set_num_threads(1)  # one decode per worker; N workers use N cores
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        if crash_on and task.key == crash_on:
            os._exit(3)
        try:
            conn.send(("ok", load_item(task)))
        except SampleError as e:
            conn.send(("err", str(e), e.reason))
        except Exception as e:  # anything else one file does is still that file's problem
            conn.send(("err", f"{type(e).__name__}: {e}", "decode_error"))


class _Worker:
    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        crash_on = os.environ.get("VGEN_FAULT_CRASH_DECODE")
        self.process = ctx.Process(target=_worker_main, args=(child, crash_on), daemon=True, name="vgen-decode")
        self.process.start()
        child.close()
        self.task: int | None = None  # position of the task in flight

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


class ProcessDecoder:
    """data.workers=N >= 1: decode in N worker processes (started at the first batch)."""

    def __init__(self, workers: int):
        self.size = workers
        self._ctx = mp.get_context("forkserver")
        self._ctx.set_forkserver_preload(["vgen.data.items"])
        self._workers: list[_Worker] = []
        self.crashes = 0

    def map(self, tasks: list[ItemTask]) -> list:
        if not self._workers:
            self._workers = [_Worker(self._ctx) for _ in range(self.size)]
        results: list = [None] * len(tasks)
        todo, done = list(range(len(tasks))), 0
        while done < len(tasks):
            for i, w in enumerate(self._workers):
                if w.task is None and todo:
                    if not w.process.is_alive():  # died after its last reply
                        w = self._workers[i] = _Worker(self._ctx)
                    w.task = todo.pop(0)
                    w.conn.send(tasks[w.task])
            busy = [w for w in self._workers if w.task is not None]
            ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
            for i, w in enumerate(self._workers):
                if w.task is None or (w.conn not in ready and w.process.sentinel not in ready):
                    continue
                results[w.task] = self._receive(i, w)
                w.task, done = None, done + 1
        return results

    def _receive(self, i: int, w: _Worker):
        try:
            if w.conn.poll():
                reply = w.conn.recv()
                return reply[1] if reply[0] == "ok" else SampleError(reply[1], reply[2])
        except (EOFError, OSError):
            pass
        # the process died holding this task: it costs that sample, and a new worker takes its place
        self.crashes += 1
        code = w.process.exitcode
        w.process.join(timeout=5)
        self._workers[i] = _Worker(self._ctx)
        return SampleError(f"the decoding worker died (exit code {code}) on this sample", "worker_crash")

    def close(self) -> None:
        for w in self._workers:
            w.stop()
        self._workers = []

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def make_decoder(workers: int):
    """The decoder for `data.workers`: inline for 0, N processes otherwise."""
    if workers < 0:
        raise ValueError(f"data.workers={workers} must be >= 0")
    return InlineDecoder() if workers == 0 else ProcessDecoder(workers)
