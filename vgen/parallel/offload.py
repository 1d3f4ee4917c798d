"""Activation offload: what a block saves for backward waits in pinned host memory instead of the GPU.

Forward: saved-tensor hooks copy each large tensor a block saves (for a checkpointed block: its input,
which is all it saves outside the selective cache) into one pinned host arena on a side CUDA stream. The
source stays referenced, not `record_stream`-ed, until the compute stream has waited for its copy (at the
next block), so the caching allocator frees it deterministically on the compute stream.

Backward: a block's tensors come back into one of two device buffers that the compute stream allocated
and owns (ping-pong): while block k recomputes from buffer k % 2, block k-1's tensors are copied into the
other on a second stream, overlapping the recomputation (LiteGen's offload with communication/computation
overlap). The last block(s) are not offloaded (`parallel.memory.offload_keep_last`): backward needs them
first, so sending them would only make the first backward step wait for their way back; the copy of the
last offloaded block starts when the gradient of the final block's output arrives, overlapping the last
blocks' backward.

Host memory: one arena, sized up front from the plan (`reserve`, from the longest sequence the run will
see), filled as a stack in forward and emptied by backward, so it is reused at every length and never
grows. Without a plan it sizes itself to the largest step seen (growing only at a step boundary); a
step that does not fit uses one-off buffers meanwhile. Either way it is bounded by
`parallel.memory.offload_host_fraction` of host RAM, shared by the ranks of a host.

Each time the compute stream waits for a copy, CUDA events time the wait: `step_metrics()` returns the
stall per step (logged in metrics.jsonl on GPU). Small tensors (< min_bytes), parameters and the
arguments every block shares (conditioning, text, RoPE tables) stay on the device: moving them frees
nothing. Without CUDA the same path runs synchronously on CPU tensors, so it is tested on any machine.
"""

from __future__ import annotations

import contextlib
import os
import weakref

import torch

from vgen.config import ConfigError

ALIGN = 512  # bytes: every region starts aligned for any dtype view and for fast DMA


def storage_key(t: torch.Tensor) -> int:
    """Identity of t's storage, shared by all its views (works for fake tensors too)."""
    return t.untyped_storage()._cdata


def _aligned(nbytes: int) -> int:
    return -(-int(nbytes) // ALIGN) * ALIGN


class OffloadHostMemoryError(ConfigError):
    """The plan needs more pinned host memory than `parallel.memory.offload_host_fraction` allows."""


def host_limit_bytes(fraction: float) -> int:
    """This rank's share of `fraction` of the host's RAM (ranks on one host split it evenly)."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return int(float(fraction) * ram / local_ranks)


class HostArena:
    """One host byte buffer (pinned on CUDA machines) handed out as a stack of regions.

    Forward takes regions, backward's tensors die and give them back; when none is live the stack
    starts again from the bottom, so the same bytes serve every step and every length.
    """

    def __init__(self, pin: bool, limit_bytes: int):
        self.pin, self.limit_bytes = pin, int(limit_bytes)
        self.buffer = None
        self.capacity = 0
        self.allocations = 0  # buffers ever created (arena and one-off): flat once the plan is known
        self.allocated_bytes = 0
        self.overflow_bytes = 0  # bytes that did not fit and took one-off buffers (grown at the next reset)
        self.top = 0
        self.live = 0
        self.demand = 0  # bytes the current step asked for
        self.wanted = 0  # the most any finished step asked for: the arena grows to it before the next
        self.new_step = True  # no region live: the next take starts a step

    def allocate(self, nbytes: int) -> torch.Tensor:
        """A fresh host buffer; replaceable (the memory simulator allocates outside its device accounting)."""
        self.allocations += 1
        self.allocated_bytes += nbytes
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)

    def reserve(self, nbytes: int) -> None:
        """Make the arena hold `nbytes` (only while no region is live). Raises OffloadHostMemoryError."""
        nbytes = _aligned(nbytes)
        if nbytes <= self.capacity:
            return
        self._check(nbytes)
        assert self.live == 0, "the arena grows only between steps"
        self.buffer = None  # free the old buffer before pinning the new one
        self.buffer = self.allocate(nbytes)
        self.capacity = nbytes

    def _check(self, nbytes: int) -> None:
        if nbytes > self.limit_bytes:
            raise OffloadHostMemoryError(
                f"parallel.memory.offload=true needs {nbytes / 1e9:.3g} GB of pinned host memory per rank, more than "
                f"parallel.memory.offload_host_fraction allows ({self.limit_bytes / 1e9:.3g} GB per rank on this host); "
                "raise the fraction, keep more blocks on the device (parallel.memory.offload_keep_last), shorten the "
                "video or set parallel.memory.offload=false")

    def take(self, nbytes: int) -> torch.Tensor:
        """A region of `nbytes` (uint8), from the arena if it fits, else a one-off buffer."""
        if self.new_step and self.wanted > self.capacity:  # grow to what the last step needed, once
            self.reserve(self.wanted)
        size = _aligned(nbytes)
        self.new_step = False
        self.demand += size
        self._check(self.demand)
        self.live += 1
        if self.buffer is not None and self.top + size <= self.capacity:
            region = self.buffer[self.top:self.top + nbytes]
            self.top += size
            return region
        self.overflow_bytes += size
        return self.allocate(nbytes)

    def give_back(self) -> None:
        """One region is no longer needed; when none is, the next step starts from the bottom."""
        self.live -= 1
        if self.live == 0:
            self.wanted = max(self.wanted, self.demand)
            self.top, self.demand, self.new_step = 0, 0, True


class _ReloadBuffers:
    """Two device byte buffers allocated by (and owned by) the compute stream; group loads alternate."""

    def __init__(self):
        self.buffers = [None, None]
        self.next = 0

    def get(self, nbytes: int, device: torch.device) -> torch.Tensor:
        i, self.next = self.next, 1 - self.next
        buf = self.buffers[i]
        if buf is None or buf.numel() < nbytes or buf.device != device:
            self.buffers[i] = None
            self.buffers[i] = buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return buf

    def reserve(self, nbytes: int, device: torch.device) -> None:
        for _ in range(2):
            self.get(nbytes, device)


class _Packed:
    """One offloaded tensor: a host copy until backward brings it back into the group's reload buffer."""

    __slots__ = ("group", "host", "offset", "shape", "dtype", "source", "device_tensor", "arena", "__weakref__")

    def __init__(self, group, host, offset, t, arena):
        self.group, self.host, self.offset, self.arena = group, host, offset, arena
        self.shape, self.dtype = t.shape, t.dtype
        self.source = t if t.is_cuda else None  # kept alive until the compute stream waited for its copy
        self.device_tensor = None

    def __del__(self):
        self.arena.give_back()


class _Group:
    """The tensors one block call offloaded; `prev` is the block that ran before it in forward."""

    def __init__(self, prev, device=None):
        self.items: list = []  # weak references: autograd owns the packed tensors
        self.prev = prev
        self.nbytes = 0  # the group's size in its reload buffer
        self.device = device
        self.d2h = None  # event after the group's last copy to the host
        self.h2d = None  # event after its copy back
        self.loaded = False
        self.retired = False
        self.waited = False  # the compute stream has waited for the copy back
        # several ops often save the same tensor (one input feeds three projections): one copy serves all
        self.seen: dict = {}

    def live_items(self):
        return [item for item in (r() for r in self.items) if item is not None]


class ActivationOffloader:
    """Saved-tensor hooks that move a block's saved activations to host memory and back.

    Args:
        min_bytes: tensors smaller than this stay on the device.
        host_fraction: share of host RAM all ranks' pinned arenas may take (parallel.memory.offload_host_fraction).
    """

    def __init__(self, min_bytes: int = 1 << 20, host_fraction: float = 0.5):
        self.min_bytes, self.host_fraction = int(min_bytes), float(host_fraction)
        self.pool = HostArena(pin=torch.cuda.is_available(), limit_bytes=host_limit_bytes(host_fraction))
        self.reload = _ReloadBuffers()
        self.offloaded_bytes = 0  # total moved to host, for tests and benchmarks
        self.plans: list = []  # per offloaded block: is it checkpointed (set by apply_memory_policy)
        self._last = lambda: None
        self._streams: dict = {}
        self._stalls: list = []  # (start, end) CUDA event pairs around each wait of the compute stream
        self._stall_ms, self._waits = 0.0, 0  # folded stalls not yet reported
        self._step = {"offload_d2h_bytes": 0, "offload_h2d_bytes": 0}

    def __deepcopy__(self, memo):
        # streams and buffers belong to the original
        return ActivationOffloader(self.min_bytes, self.host_fraction)

    def reserve(self, host_bytes: int, group_bytes: int = 0, device=None) -> None:
        """Size the host arena (and the two device reload buffers) up front, from the plan."""
        self.pool.reserve(host_bytes)
        if group_bytes and device is not None and torch.device(device).type == "cuda":
            self.reload.reserve(_aligned(group_bytes), torch.device(device))

    # ---- forward ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def block_scope(self, block: torch.nn.Module, keep):
        """Offload what autograd saves inside this scope, except storages of `keep` and block parameters."""
        self._retire(self._last())  # the previous block's copies have had its whole forward to finish
        group = _Group(prev=self._last)
        self._last = weakref.ref(group)
        skip = {storage_key(p) for p in block.parameters()}
        skip |= {storage_key(t) for t in _tensors(keep)}
        try:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: self._pack(group, skip, t), self._unpack):
                yield
        finally:
            if group.device is not None and group.device.type == "cuda":
                group.d2h = torch.cuda.Event()
                group.d2h.record(self._stream("d2h", group.device))

    def watch_output(self, out):
        """On the final block's output: when its gradient arrives (backward starts), fetch the last
        offloaded block, so its copy overlaps the backward of the blocks kept on the device."""
        if isinstance(out, torch.Tensor) and out.requires_grad:
            last = self._last

            def start_reload(grad):
                group = _nonempty(last())
                if group is not None:
                    self._load(group)
            out.register_hook(start_reload)
        return out

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
        if self.pool.new_step and t.is_cuda:  # last step's copies back read the arena: finish them first
            self._stream("d2h", t.device).wait_stream(self._stream("h2d", t.device))
        host = self.pool.take(t.nbytes)
        view = host.view(t.dtype).view(t.shape)
        if t.is_cuda:
            stream = self._stream("d2h", t.device)
            stream.wait_stream(torch.cuda.current_stream(t.device))  # t must be fully written first
            with torch.cuda.stream(stream):
                view.copy_(t, non_blocking=True)
        else:
            view.copy_(t)
        self.offloaded_bytes += t.nbytes
        self._step["offload_d2h_bytes"] += t.nbytes
        item = _Packed(group, host, group.nbytes, t, self.pool)
        group.nbytes += _aligned(t.nbytes)
        group.device = t.device
        group.items.append(weakref.ref(item))
        group.seen[key] = (weakref.ref(t.untyped_storage()), weakref.ref(item))
        return item

    def _retire(self, group) -> None:
        """The compute stream waits for the group's copies to the host; then their sources may be freed."""
        if group is None or group.retired:
            return
        group.retired = True
        if group.d2h is not None:
            self._wait(group.d2h, group.device)
        for item in group.live_items():
            item.source = None

    # ---- backward -----------------------------------------------------------------------------------
    def _unpack(self, item):
        if not isinstance(item, _Packed):
            return item
        group = item.group
        self._retire(group)
        if not group.loaded:
            self._load(group)
        prev = _nonempty(group.prev())
        if prev is not None:  # the block backward reaches next: start its copy while this one recomputes
            self._load(prev)
        if group.h2d is not None and not group.waited:
            group.waited = True
            self._wait(group.h2d, group.device)
        return item.device_tensor

    def _load(self, group: _Group) -> None:
        """Copy the group's tensors back into the next reload buffer (the one its block's successor
        backward-wise is done with)."""
        if group.loaded:
            return
        self._retire(group)
        group.loaded = True
        items = group.live_items()
        buf = self.reload.get(group.nbytes, group.device)
        cuda = group.device.type == "cuda"
        if cuda:
            stream = self._stream("h2d", group.device)
            # the buffer's previous tensors (two blocks later in forward) are done once the compute
            # stream's work so far is: that is the only wait, and it is for earlier backward work
            stream.wait_stream(torch.cuda.current_stream(group.device))
        for item in items:
            nbytes = _numel(item.shape) * item.dtype.itemsize
            t = buf[item.offset:item.offset + nbytes].view(item.dtype).view(item.shape)
            with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                t.copy_(item.host.view(item.dtype).view(item.shape), non_blocking=cuda)
            item.device_tensor, item.host = t, None
            self._step["offload_h2d_bytes"] += nbytes
        if cuda:
            group.h2d = torch.cuda.Event()
            group.h2d.record(stream)

    # ---- stalls -------------------------------------------------------------------------------------
    def _wait(self, event, device) -> None:
        """The compute stream waits for `event`; events on either side time how long it stood still."""
        current = torch.cuda.current_stream(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(current)
        current.wait_event(event)
        end.record(current)
        self._stalls.append((start, end))
        if len(self._stalls) >= 4096:  # nobody reads step_metrics (a benchmark loop): fold, stay bounded
            self._fold_stalls()

    def _fold_stalls(self) -> None:
        if self._stalls:
            self._stalls[-1][1].synchronize()
            self._stall_ms += sum(a.elapsed_time(b) for a, b in self._stalls)
            self._waits += len(self._stalls)
            self._stalls = []

    def step_metrics(self) -> dict:
        """Figures since the last call (call once per step, after it): bytes each way, and on CUDA the
        time the compute stream waited for copies (`offload_stall_ms`, summed) and how many waits."""
        out = dict(self._step)
        self._fold_stalls()
        if self._waits:
            out["offload_stall_ms"], out["offload_waits"] = self._stall_ms, self._waits
        self._stall_ms, self._waits = 0.0, 0
        self._step = {k: 0 for k in self._step}
        return out

    def _stream(self, kind: str, device: torch.device):
        key = (kind, device)
        if key not in self._streams:
            self._streams[key] = torch.cuda.Stream(device=device)
        return self._streams[key]


def _nonempty(group):
    """The nearest group at or before `group` that offloaded something."""
    while group is not None and not group.live_items():
        group = group.prev()
    return group


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


def planned_host_bytes(offloader: ActivationOffloader, model, latent_shape, micro_batch: int, sp_size: int,
                       dtype: torch.dtype) -> tuple[int, int] | None:
    """(host arena bytes, one block's reload bytes) a step needs at `latent_shape`, or None when unknown.

    A checkpointed block saves only its input (B, N / sp, D) through the hooks (selective checkpointing
    keeps its cache out of them), so the plan is that per offloaded block. Offload without checkpointing
    saves whatever each op keeps: there the arena sizes itself on the first step instead.
    """
    if not offloader.plans or any(not ckpt for ckpt in offloader.plans):
        return None
    tokens = 1
    for n in model.token_grid((1,) + tuple(latent_shape)):
        tokens *= n
    block = int(micro_batch) * -(-tokens // int(sp_size)) * model.cfg.hidden * dtype.itemsize
    if block < offloader.min_bytes:
        return 0, 0
    return len(offloader.plans) * _aligned(block), block


def reserve_offload_arena(model, latent_shape, micro_batch: int, sp_size: int, device: torch.device) -> None:
    """Size the offload arena (and reload buffers) for the longest latent a run trains on, before step 1.

    Raises OffloadHostMemoryError (naming parallel.memory.offload) when that exceeds the host share.
    """
    offloader = getattr(model, "memory_offloader", None)
    if offloader is None:
        return
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    sizes = planned_host_bytes(offloader, model, latent_shape, micro_batch, sp_size, dtype)
    if sizes is not None:
        offloader.reserve(sizes[0], sizes[1], device)
