"""Activation offload: what a block saves for backward waits in pinned host memory instead of the GPU.

During forward, saved-tensor hooks copy each large tensor a block saves (for a checkpointed block: its
input, which is all it saves outside the selective cache) to a pooled pinned host buffer on a side CUDA
stream; the device copy is freed as soon as the copy has run. During backward, the first time a block's
tensors are unpacked they come back on a second stream (if not already prefetched), and the block
before it (the next one backward reaches) starts its own copy back, so that copy overlaps this block's
recomputation. That is LiteGen's offload with communication/computation overlap.

Small tensors (< min_bytes), parameters and the arguments every block shares (conditioning, text,
RoPE tables) stay on the device: moving them frees nothing. Without CUDA the same path runs
synchronously on CPU tensors (a copy to a pooled buffer and back), so it is tested on any machine.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import defaultdict

import torch


def storage_key(t: torch.Tensor) -> int:
    """Identity of t's storage, shared by all its views (works for fake tensors too)."""
    return t.untyped_storage()._cdata


class HostBufferPool:
    """Host byte buffers keyed by size, reused across blocks and steps (shapes repeat every step)."""

    def __init__(self, pin: bool):
        self.pin = pin
        self.allocations = 0  # how many buffers were ever created: stays flat once the pool is warm
        self.allocated_bytes = 0
        self._free: dict[int, list] = defaultdict(list)

    def allocate(self, nbytes: int) -> torch.Tensor:
        """A fresh buffer; replaceable (the memory simulator allocates outside its device accounting)."""
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)

    def acquire(self, nbytes: int) -> torch.Tensor:
        free = self._free.get(nbytes)
        if free:
            buf, ready = free.pop()
            if ready is not None:  # the copy back to the device that last read it must have finished
                ready.synchronize()
            return buf
        self.allocations += 1
        self.allocated_bytes += nbytes
        return self.allocate(nbytes)

    def release(self, buf: torch.Tensor, ready=None) -> None:
        self._free[buf.numel()].append((buf, ready))


class _Packed:
    """One offloaded tensor: a host copy until backward brings it back."""

    __slots__ = ("group", "host", "view", "device", "d2h", "h2d", "device_tensor", "__weakref__")

    def __init__(self, group, host, view, device, d2h_event):
        self.group, self.host, self.view, self.device, self.d2h = group, host, view, device, d2h_event
        self.h2d, self.device_tensor = None, None


class _Group:
    """The tensors one block call offloaded; `prev` is the block that ran before it in forward."""

    def __init__(self, prev):
        self.items: list = []  # weak references: autograd owns the packed tensors
        self.prev = prev
        # several ops often save the same tensor (one input feeds three projections): one copy serves all
        self.seen: dict = {}

    def live_items(self):
        return [item for item in (r() for r in self.items) if item is not None]


class ActivationOffloader:
    """Saved-tensor hooks that move a block's saved activations to host memory and back.

    Args:
        min_bytes: tensors smaller than this stay on the device.
    """

    def __init__(self, min_bytes: int = 1 << 20):
        self.min_bytes = int(min_bytes)
        self.pool = HostBufferPool(pin=torch.cuda.is_available())
        self.offloaded_bytes = 0  # total moved to host, for tests and benchmarks
        self._last = lambda: None
        self._streams: dict = {}

    def __deepcopy__(self, memo):
        return ActivationOffloader(self.min_bytes)  # streams and buffers belong to the original

    @contextlib.contextmanager
    def block_scope(self, block: torch.nn.Module, keep):
        """Offload what autograd saves inside this scope, except storages of `keep` and block parameters."""
        group = _Group(prev=self._last)
        self._last = weakref.ref(group)
        skip = {storage_key(p) for p in block.parameters()}
        skip |= {storage_key(t) for t in _tensors(keep)}
        with torch.autograd.graph.saved_tensors_hooks(lambda t: self._pack(group, skip, t), self._unpack):
            yield

    def _wanted(self, t: torch.Tensor, skip: set) -> bool:
        if t.nbytes < self.min_bytes or t.layout != torch.strided or not t.is_contiguous():
            return False
        if t.requires_grad and t.is_leaf:  # parameters and leaf inputs live on regardless
            return False
        return storage_key(t) not in skip

    def _pack(self, group: _Group, skip: set, t: torch.Tensor):
        if not self._wanted(t, skip):
            return t
        key = (storage_key(t), t.storage_offset(), tuple(t.shape), t.dtype, t._version)
        known = group.seen.get(key)
        if known is not None and known[0]() is t.untyped_storage() and known[1]() is not None:
            return known[1]()
        host = self.pool.acquire(t.nbytes)
        view = host.view(t.dtype).view(t.shape)
        event = None
        if t.is_cuda:
            stream = self._stream("d2h", t.device)
            stream.wait_stream(torch.cuda.current_stream(t.device))  # t must be fully written first
            with torch.cuda.stream(stream):
                view.copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
            t.record_stream(stream)  # the allocator may reuse t's memory only after the copy ran
        else:
            view.copy_(t)
        self.offloaded_bytes += t.nbytes
        item = _Packed(group, host, view, t.device, event)
        group.items.append(weakref.ref(item))
        group.seen[key] = (weakref.ref(t.untyped_storage()), weakref.ref(item))
        return item

    def _unpack(self, item):
        if not isinstance(item, _Packed):
            return item
        self._load(item)
        prev = item.group.prev()
        if prev is not None:  # the block backward reaches next: start its copy while this one recomputes
            for other in prev.live_items():
                self._load(other)
        t = item.device_tensor
        if t.is_cuda:
            current = torch.cuda.current_stream(t.device)
            current.wait_event(item.h2d)
            t.record_stream(current)
        return t

    def _load(self, item: _Packed) -> None:
        if item.device_tensor is not None:
            return
        if item.device.type == "cuda":
            stream = self._stream("h2d", item.device)
            stream.wait_event(item.d2h)
            with torch.cuda.stream(stream):
                t = torch.empty(item.view.shape, dtype=item.view.dtype, device=item.device)
                t.copy_(item.view, non_blocking=True)
            item.h2d = torch.cuda.Event()
            item.h2d.record(stream)
            self.pool.release(item.host, item.h2d)
        else:
            t = torch.empty(item.view.shape, dtype=item.view.dtype, device=item.device)
            t.copy_(item.view)
            self.pool.release(item.host)
        item.device_tensor, item.host, item.view = t, None, None

    def _stream(self, kind: str, device: torch.device):
        key = (kind, device)
        if key not in self._streams:
            self._streams[key] = torch.cuda.Stream(device=device)
        return self._streams[key]


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)
