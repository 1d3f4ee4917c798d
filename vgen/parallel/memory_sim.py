"""Per-rank training memory of any model size, world size and SP degree, simulated on a CPU.

The real VideoDiT is built under FakeTensorMode (tensors with shapes, dtypes and storages but no data),
the memory policy is applied with the real apply_memory_policy, and one real training step's forward and
backward runs. A TorchDispatchMode sees every op's outputs; each new storage is recorded with the op
count at which it appeared, and a weakref finalizer on the storage records when it died. Replaying those
records gives live bytes over time, split into:
  parameters   the model's weights (bf16; 1/world under ZeRO-3)
  gradients    storages that end up as a parameter's .grad (bf16, 1/world under ZeRO-2/3, since DeepSpeed
               reduces them bucket by bucket into the rank's partition) plus the fp32 gradient partition
  optimizer    fp32 master weights + AdamW moments: 12 bytes/parameter, 1/world for ZeRO >= 1
  activations  storages made in forward that are still alive when backward starts
  temporaries  everything else (transient forward buffers, backward intermediates, recomputation)
Static parts (optimizer, fp32 partitions) are analytic; everything the step allocates is measured.

Attention (`attention_kernel`): the model's SDPA call runs as the fused kernel a GPU uses ("flash", the
default for bf16): forward allocates the output and an fp32 log-sum-exp, backward dq, dk, dv, never the
(S, S) scores. On fake CPU tensors torch's fused CPU kernel has exactly those outputs; FlashAttention-2's
backward also allocates an fp32 dq accumulator inside the kernel, invisible to the dispatcher, which is
added here. "native" keeps whatever kernel torch picks for the traced device (on a CPU the same fused
kernel, without the GPU workspace: what a real CPU run allocates, the accounting float32 traces use);
"math" forces the unfused path that materialises the scores, quadratic in sequence length.

Sequence parallelism: vgen/parallel/memory_sim_sp.py (real wrappers on a fake process group, or Ulysses
stand-ins where torch.distributed is already up). Other kernel-internal workspaces (cuBLAS) are not counted.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vgen.models.attention import sdpa
from vgen.models.dit import VideoDiT
from vgen.models.presets import DiTConfig
from vgen.parallel import memory_sim_sp
from vgen.parallel.checkpointing import apply_memory_policy
from vgen.parallel.offload import storage_key

CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "temporaries")
GB = 1e9  # decimal, like the trainer's mem_peak_gb and parallel.memory.budget_gb
ATTENTION_KERNELS = ("auto", "flash", "native", "math")
# Fused attention backward ops; their query argument is (B, h, S, d).
_ATTENTION_BACKWARD = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
    torch.ops.aten._scaled_dot_product_flash_attention_backward.default,
    torch.ops.aten._scaled_dot_product_efficient_attention_backward.default,
}


@dataclass
class MemoryReport:
    """One rank's simulated peak and its split by category at the moment of the peak (bytes)."""

    peak_bytes: int
    by_category: dict
    step_peak_bytes: int  # peak of what the step itself allocated (excludes weights and the batch)
    tokens: int  # whole sequence per sample (T * H * W after patching)
    local_tokens: int
    world_size: int = 1
    sp: int = 1
    zero_stage: int = 2
    sp_impl: str = "none"  # "fake process group" (the real SP wrappers) or "stand-ins"
    attention: str = "native"  # the attention accounting: "flash", "native" or "math"
    device: dict | None = None  # allocated, reserved and the GPU terms (gpu_memory.GpuTerms.device_bytes)

    @property
    def peak_gb(self) -> float:
        return self.peak_bytes / GB

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v / GB:.2f}" for k, v in self.by_category.items())
        return (f"peak {self.peak_gb:.2f} GB ({parts}) for {self.tokens} tokens, sp={self.sp}, world={self.world_size}, "
                f"{self.attention} attention")


class _Record:
    __slots__ = ("nbytes", "start", "end", "phase", "category", "rows", "owner")

    def __init__(self, nbytes, start, phase, category=None, owner=None):
        self.nbytes, self.start, self.end, self.phase, self.category = nbytes, start, None, phase, category
        self.rows = None  # (bytes per row, rows, multiple): a buffer of rows rounded up to a multiple
        self.owner = owner  # a parameter's block index (it is allocated before the step, at clock 0)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def flash_workspace_rows(query: torch.Tensor) -> tuple[int, int, int]:
    """FlashAttention-2 backward's own fp32 buffers for a (B, h, S, d) query, as (bytes per row, rows, multiple).

    flash-attn's mha_bwd (also PyTorch's SDPA flash backend) allocates softmax_d (B, h, S_r) and
    dq_accum (B, S_r, h, d_r) in fp32, S_r = S rounded up to 128, d_r = d rounded up to 32, for the
    duration of the call. The memory-efficient kernel (masked attention) keeps a like-sized fp32 dq buffer.
    """
    B, h, S, d = query.shape
    return B * h * (_round_up(d, 32) + 1) * 4, S, 128


class StorageTracker(TorchDispatchMode):
    """Records when every storage an op creates is born and dies, counted in ops."""

    def __init__(self, flash_workspace: bool = False):
        super().__init__()
        self.clock, self.phase, self.ignore, self.closed = 0, "forward", False, False
        self.flash_workspace = flash_workspace  # charge attention backward FlashAttention-2's workspace
        self.live: dict[int, _Record] = {}
        self.dead: list[_Record] = []
        # clocks where each block's forward starts (and the last one ends), and where the gradient of
        # each block's output (then of the first block's input) is ready: the block boundaries that
        # vgen/parallel/memory_timeline.py cuts the timeline at
        self.fwd_marks: dict[int, int] = {}
        self.bwd_marks: dict[int, int] = {}
        self.bwd_hooked: set[int] = set()
        self.ops: list[str] = []  # the op at each clock tick, to align blocks whose op sequences differ

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.ignore:
            return out
        self.clock += 1
        self.ops.append(func.__name__)
        inputs = {storage_key(a) for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and storage_key(t) not in inputs:  # views alias an input
                self.register(t)
        if self.flash_workspace and func in _ATTENTION_BACKWARD:  # alive with dq, dk, dv, gone with the call
            rec = _Record(0, self.clock, self.phase)
            rec.rows, rec.end = flash_workspace_rows(args[1]), self.clock
            row_bytes, rows, multiple = rec.rows
            rec.nbytes = row_bytes * _round_up(rows, multiple)
            self.dead.append(rec)
        return out

    def register(self, t: torch.Tensor, category: str | None = None, owner: int | None = None) -> None:
        key = storage_key(t)
        if key in self.live:
            return
        storage = t.untyped_storage()
        self.live[key] = _Record(int(storage.nbytes()), self.clock, self.phase, category, owner)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        if self.closed:  # the step is over: what dies after it (the model) is not part of it
            return
        rec = self.live.pop(key, None)
        if rec is not None:
            rec.end = self.clock
            self.dead.append(rec)

    def records(self) -> list[_Record]:
        return self.dead + list(self.live.values())


def zero_static_bytes(n_params: int, zero_stage: int, world: int) -> tuple[dict, float, float]:
    """DeepSpeed bf16 + AdamW under ZeRO: (static bytes by category, scale of bf16 weights, of bf16 grads).

    fp32 master weights and both moments (12 B/param) and the fp32 gradient partition (4 B/param) are
    sharded from stage 1; bf16 gradients from stage 2 (each rank keeps 1/world plus one reduce bucket,
    DeepSpeed's default 5e8 elements); bf16 weights from stage 3. ZeRO shards over every rank.
    """
    shard = world if zero_stage >= 1 else 1
    static = {"optimizer": 12 * n_params // shard, "gradients": 4 * n_params // shard}
    grad_scale = 1.0
    if zero_stage >= 2 and world > 1:
        grad_scale = 1.0 / world
        static["gradients"] += 2 * min(n_params, 500_000_000)
    return static, (1.0 / world if zero_stage >= 3 else 1.0), grad_scale


@dataclass
class StepTrace:
    """The storages one simulated training step created, in op order, with their sizes."""

    records: list
    sizes: list  # bytes of each record
    fwd_end: int
    frames: int  # latent frames traced
    n_params: int
    grid_hw: int  # tokens per latent frame group after patching
    patch_t: int
    sp: int
    world_size: int
    zero_stage: int
    sp_impl: str = "none"
    attention: str = "native"
    depth: int = 0  # blocks traced
    fwd_marks: tuple = ()  # clocks: block i's forward starts (i < depth), the last one's ends (i = depth)
    bwd_marks: tuple = ()  # clocks: gradient of block i's output ready, for i = depth-1 .. 0, then block 0's input
    end_clock: int = 0
    lean: str = "real"  # lean-op slicing: "real" (as a run of this length), "long" (sliced) or "short" (not)
    lean_per_frame: tuple = ()  # (min, max) elements per latent frame of a lean op's input; () when none ran
    offloaded_bytes: int = 0  # bytes the offloader moved to the host in this step (all traced blocks)
    block_params: int = 0  # parameters of one block
    ops: list = None  # the op name at each clock tick (index = clock - 1)

    def report(self, sizes=None, frames=None) -> MemoryReport:
        static, param_scale, grad_scale = zero_static_bytes(self.n_params, self.zero_stage, self.world_size)
        sizes = self.sizes if sizes is None else sizes
        peak, cats, step_peak = _replay(self.records, sizes, self.fwd_end, static, param_scale, grad_scale)
        tokens = (self.frames if frames is None else frames) // self.patch_t * self.grid_hw
        return MemoryReport(peak, cats, step_peak, tokens, tokens // self.sp, self.world_size, self.sp,
                            self.zero_stage, self.sp_impl, self.attention)

    def live_at_backward_start(self) -> int:
        """Bytes the step allocated that are alive when backward starts: what forward left for backward."""
        return sum(n for r, n in zip(self.records, self.sizes)
                   if r.category is None and r.start <= self.fwd_end and (r.end is None or r.end > self.fwd_end))


class FrameSweep:
    """Memory at any frame count from two traces of the same step.

    At a fixed resolution the op sequence of a step does not depend on the frame count, and every
    storage's size is affine in it (fused attention is linear in length; temporal attention runs B*H*W
    sequences of T), except the flash workspace, whose rows round up to 128: its row size and row count
    are each affine. Two traces at different lengths therefore give every size at every length, so a
    bisection over lengths costs two traces; `exact_at` checks the claim against a third. It holds when
    the tokens of one latent frame split evenly over the SP degree and the MLP chunks (otherwise shard and
    chunk sizes round, and results are off by a token's bytes per tensor). Not for "math" attention, whose
    temporal scores are quadratic in the frame count.
    """

    def __init__(self, a: StepTrace, b: StepTrace):
        if "math" in (a.attention, b.attention):
            raise ValueError("math attention's scores grow with the square of the frame count: simulate each length")
        if _op_signature(a) != _op_signature(b):
            raise DifferentOps(f"steps at {a.frames} and {b.frames} frames ran different ops; simulate each length")
        self.a, self.b = a, b
        self.span = b.frames // b.patch_t - a.frames // a.patch_t

    def sizes(self, frames: int) -> list[int]:
        k = frames // self.a.patch_t - self.a.frames // self.a.patch_t

        def at(va, vb):  # one trace (span 0) models only its own length
            return va + (vb - va) * k // self.span if self.span else va

        sizes = []
        for ra, rb, sa, sb in zip(self.a.records, self.b.records, self.a.sizes, self.b.sizes):
            if ra.rows is None:
                sizes.append(at(sa, sb))
            else:  # interpolate the row size and the row count, then round the rows as the kernel does
                (row_a, n_a, multiple), (row_b, n_b, _) = ra.rows, rb.rows
                sizes.append(at(row_a, row_b) * _round_up(at(n_a, n_b), multiple))
        return sizes

    def evaluate(self, frames: int) -> MemoryReport:
        return self.a.report(self.sizes(frames), frames)

    def same_ops(self, trace: StepTrace) -> bool:
        """Whether `trace` (another length) ran this sweep's ops, so the sweep's sizes model it."""
        return _op_signature(trace) == _op_signature(self.a)

    def exact_at(self, trace: StepTrace) -> bool:
        return self.sizes(trace.frames) == trace.sizes


def trace_step(dit: DiTConfig, mem, latent_shape, text_len: int, micro_batch: int = 1, world_size: int = 1,
               sp: int = 1, zero_stage: int = 2, dtype: torch.dtype = torch.bfloat16, sp_mode: str = "ulysses",
               attention_kernel: str = "auto", depth: int | None = None, lean: str = "real") -> StepTrace:
    """Run one fake training step (forward and backward) of one rank and record its storages.

    Args:
        dit: the model's DiTConfig (e.g. resolve_preset("2b")).
        mem: a MemoryConfig-like policy (checkpointing, ratio, offload, mlp_chunks, ...), or None.
        latent_shape: (C, T, H, W) or (T, H, W) of one latent video (channels from `dit` if absent).
        world_size, sp: ranks in the job and the sequence-parallel degree (sp divides world_size).
        zero_stage: DeepSpeed ZeRO stage (sharded over all ranks).
        dtype: bf16 for GPU estimates; float32 to compare with a CPU run.
        sp_mode: "ulysses" or "switch" (ring attention picks K/V blocks from data, which fake tensors lack).
        attention_kernel: "flash" (a GPU's fused kernel and its backward workspace), "native" (the kernel
            torch picks for CPU tensors, as a real CPU run), "math" ((S, S) scores), or "auto": flash for
            bf16/fp16, native otherwise.
        depth: blocks to build instead of dit.depth (memory_timeline replays a short trace at full depth).
        lean: lean-op slicing (vgen/models/lean_ops.py): "real" decides by size as a run of this length
            does; "long" always slices and "short" never does, so that traces of any length run the ops
            of long (or short) lengths; `lean_per_frame` says from which length a real run agrees.
    """
    if world_size % sp:
        raise ValueError(f"sp degree {sp} must divide world size {world_size}")
    kernel = resolve_attention_kernel(attention_kernel, dtype)
    C, T, H, W = tuple(latent_shape) if len(latent_shape) == 4 else (dit.in_channels, *latent_shape)
    dit = replace(dit, in_channels=C)
    world = world_size if sp > 1 else 1
    dit = dit if depth is None else replace(dit, depth=int(depth))
    gt, gh, gw = VideoDiT.token_grid(SimpleNamespace(cfg=dit), (T, H, W))
    local_tokens = gt * gh * gw // sp
    with memory_sim_sp.fake_world(world) as real_sp, FakeTensorMode(), attention_context(kernel), \
            lean_slicing(lean, T, [], local_tokens) as lean_seen:
        model = _build(dit, dtype)
        sp_impl = memory_sim_sp.parallelize_fake(model, sp, sp_mode, real_sp, gt * gh * gw) if sp > 1 else "none"
        if _memory_on(mem):
            apply_memory_policy(model, mem)
        tracker = StorageTracker(flash_workspace=kernel == "flash")
        _untrack_host_buffers(model, tracker)
        x = torch.empty(micro_batch, C, T, H, W, dtype=dtype)
        batch = (x, torch.empty(micro_batch), torch.empty(micro_batch, text_len, dit.text_dim, dtype=dtype),
                 torch.ones(micro_batch, text_len, dtype=torch.bool), torch.empty_like(x))
        records, fwd_end = _run_step(model, batch, tracker)
        n_params = sum(p.numel() for p in model.parameters())
        block_params = sum(p.numel() for p in model.blocks[0].parameters()) if len(model.blocks) else 0
        offloader = getattr(model, "memory_offloader", None)
    sizes = [r.nbytes for r in records]
    marks = dict(fwd_marks=tuple(tracker.fwd_marks[i] for i in sorted(tracker.fwd_marks)),
                 bwd_marks=tuple(tracker.bwd_marks[i] for i in sorted(tracker.bwd_marks, reverse=True)))
    return StepTrace(records, sizes, fwd_end, T, n_params, gh * gw, dit.patch[0], sp, world_size, zero_stage, sp_impl,
                     kernel, dit.depth, end_clock=tracker.clock, lean=lean,
                     lean_per_frame=(min(lean_seen), max(lean_seen)) if lean_seen else (),
                     offloaded_bytes=int(getattr(offloader, "offloaded_bytes", 0)), block_params=block_params,
                     ops=tracker.ops, **marks)


@contextlib.contextmanager
def lean_slicing(mode: str, frames: int, seen: list, local_tokens: int):
    """Lean ops on the video's tokens slice as at long lengths ("long"), never ("short") or by size
    ("real"); those on other tokens (text keys) by size, which no length changes. Records each video lean
    input's elements per latent frame in `seen` (linear in the frame count): where a real run agrees.

    Args:
        local_tokens: this rank's video tokens, the token count that marks a lean op's input as the video's.
    """
    if mode not in ("real", "long", "short"):
        raise ValueError(f"lean={mode!r} must be 'real', 'long' or 'short'")
    from vgen.models import lean_ops

    decide = getattr(lean_ops, "token_slices", None)
    if decide is None:  # lean ops without a size switch: nothing to fix
        yield seen
        return

    def token_slices(n: int, numel: int):
        if n != local_tokens:
            return decide(n, numel)
        seen.append(numel / frames)
        if mode == "real":
            return decide(n, numel)
        return lean_ops.even_slices(n, lean_ops.CHUNKS if mode == "long" else 1)

    lean_ops.token_slices = token_slices
    try:
        yield seen
    finally:
        lean_ops.token_slices = decide


def lean_regime_holds(trace: StepTrace, frames: int) -> bool:
    """Whether a real run at `frames` slices its lean ops as `trace` did (true where no lean op ran)."""
    if not trace.lean_per_frame:
        return True
    from vgen.models.lean_ops import CHUNK_THRESHOLD

    lo, hi = trace.lean_per_frame
    if trace.lean == "long":
        return lo * frames > CHUNK_THRESHOLD
    if trace.lean == "short":
        return hi * frames <= CHUNK_THRESHOLD
    return all((n * frames > CHUNK_THRESHOLD) == (n * trace.frames > CHUNK_THRESHOLD) for n in (lo, hi))


def simulate(dit: DiTConfig, mem, latent_shape, text_len: int, **kw) -> MemoryReport:
    """One rank's memory for one training step at `latent_shape`; keyword arguments as trace_step."""
    return trace_step(dit, mem, latent_shape, text_len, **kw).report()


def _op_signature(trace: StepTrace) -> list:
    return [(r.start, r.end, r.category, r.rows is None) for r in trace.records]


class DifferentOps(ValueError):
    """Two traces of a FrameSweep ran different op sequences."""


def sweep(dit: DiTConfig, mem, latent_hw, text_len: int, frames=(16, 32), retries: int = 3, **kw) -> FrameSweep:
    """A FrameSweep over latent frame counts at resolution `latent_hw`, (C, H, W) or (H, W).

    Some ops switch to token slices above a fixed size (vgen/models/lean_ops.py), so two short traces
    can run different ops; then both frame counts double, up to `retries` times. Lengths below the first
    traced one are then extrapolated from longer ones, off by at most the transient copies of an op that
    runs unsliced there (inputs under lean_ops.CHUNK_THRESHOLD elements, tens of MB).
    """
    hw = tuple(latent_hw)
    lo, hi = frames
    for attempt in range(retries + 1):
        shapes = [(hw[0], T, *hw[1:]) if len(hw) == 3 else (T, *hw) for T in (lo, hi)]
        try:
            return FrameSweep(*(trace_step(dit, mem, shape, text_len, **kw) for shape in shapes))
        except DifferentOps:
            if attempt == retries:
                raise
            lo, hi = 2 * lo, 2 * hi


def resolve_attention_kernel(kernel: str, dtype: torch.dtype) -> str:
    """"auto" -> "flash" for the half dtypes a GPU trains in, else "native" (a CPU run's own kernel)."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention_kernel={kernel!r} must be one of {ATTENTION_KERNELS}")
    if kernel == "auto":
        return "flash" if dtype in (torch.bfloat16, torch.float16) else "native"
    return kernel


def attention_context(kernel: str):
    """The SDPA backend restriction that makes torch run `kernel`'s ops: fused for flash (a silent fall
    back to the unfused path would charge (S, S) scores), unfused for math, torch's choice for native."""
    if kernel == "flash":
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    if kernel == "math":
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


def attention_peak_bytes(shape, attention_kernel: str = "flash", dtype: torch.dtype = torch.bfloat16,
                         kv_len: int | None = None) -> int:
    """Peak bytes one attention's forward + backward allocates beyond its inputs, under `attention_kernel`.

    Args:
        shape: (B, S, h, d) of the queries, as the model's attention cores pass them to `sdpa`.
        kv_len: key/value length (default S).
    """
    kernel = resolve_attention_kernel(attention_kernel, dtype)
    B, S, h, d = shape
    with FakeTensorMode(), attention_context(kernel):
        q = torch.empty(B, S, h, d, dtype=dtype, requires_grad=True)
        k, v = (torch.empty(B, kv_len or S, h, d, dtype=dtype, requires_grad=True) for _ in range(2))
        grad = torch.empty(B, S, h, d, dtype=dtype)
        tracker = StorageTracker(flash_workspace=kernel == "flash")
        gc.collect()
        gc.disable()  # as in _run_step: frees follow reference counts
        try:
            with tracker:
                out = sdpa(q, k, v)  # (B, S, h, d)
                fwd_end = tracker.clock
                tracker.phase = "backward"
                out.backward(grad)
                del out
        finally:
            gc.enable()
        tracker.closed = True
    records = tracker.records()
    return _replay(records, [r.nbytes for r in records], fwd_end, {}, 1.0, 1.0)[2]


def _build(dit: DiTConfig, dtype: torch.dtype) -> VideoDiT:
    # the default dtype, not .to(dtype): Module.to cannot swap fake parameters in place
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return VideoDiT(dit)
    finally:
        torch.set_default_dtype(before)


def _memory_on(mem) -> bool:
    return mem is not None and (mem.checkpointing != "none" or mem.offload or int(mem.mlp_chunks) > 1)


def _untrack_host_buffers(model, tracker: StorageTracker) -> None:
    """Offloaded activations live in host memory: allocate the pool's buffers outside the accounting."""
    offloader = getattr(model, "memory_offloader", None)
    if offloader is None:
        return
    allocate = offloader.pool.allocate
    # the simulated job's host is not this machine: its pinned-memory share is checked by the run itself
    offloader.pool.limit_bytes = 1 << 62

    def host_allocate(nbytes):
        tracker.ignore = True
        try:
            return allocate(nbytes)
        finally:
            tracker.ignore = False

    offloader.pool.allocate = host_allocate


def _mark_blocks(model, tracker: StorageTracker) -> list:
    """Hooks that record the block boundaries of the step's forward and backward in `tracker`."""
    blocks, handles = list(model.blocks), []

    def on_grad(index):
        def hook(grad):
            tracker.bwd_marks.setdefault(index, tracker.clock)
        return hook

    def pre(index):
        def hook(module, args, kwargs):
            if tracker.phase == "forward" and index not in tracker.fwd_marks:
                tracker.fwd_marks[index] = tracker.clock
                if index == 0 and args[0].requires_grad:  # its gradient ends the last block backward
                    args[0].register_hook(on_grad(-1))
        return hook

    def post(index):
        def hook(module, args, kwargs, out):
            if tracker.phase == "forward" and out.requires_grad and index not in tracker.bwd_hooked:
                tracker.bwd_hooked.add(index)
                out.register_hook(on_grad(index))
                if index == len(blocks) - 1:
                    tracker.fwd_marks[len(blocks)] = tracker.clock
        return hook

    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(block.register_forward_hook(post(i), with_kwargs=True))
    return handles


def _run_step(model, batch, tracker: StorageTracker):
    owner = {id(p): i for i, block in enumerate(model.blocks) for p in block.parameters()}
    for p in model.parameters():
        tracker.register(p, "parameters", owner.get(id(p)))
    for t in batch:
        tracker.register(t, "activations")
    x, t, text, mask, target = batch
    handles = _mark_blocks(model, tracker)
    gc.collect()
    gc.disable()  # frees must follow reference counts, not the collector's timing, to be reproducible
    try:
        with tracker:
            loss = (model(x, t, text, mask).float() - target.float()).pow(2).mean()
            fwd_end = tracker.clock
            tracker.phase = "backward"
            loss.backward()
            del loss
    finally:
        gc.enable()
        for h in handles:
            h.remove()
    tracker.closed = True
    for p in model.parameters():
        if p.grad is not None and storage_key(p.grad) in tracker.live:
            tracker.live[storage_key(p.grad)].category = "gradients"
    return tracker.records(), fwd_end


def _replay(records, sizes, fwd_end: int, static: dict, param_scale: float, grad_scale: float):
    """Walk allocations and frees in op order; return (peak, categories at the peak, step-only peak)."""
    events = []
    for r, n in zip(records, sizes):
        cat = r.category or ("activations" if r.phase == "forward" and (r.end is None or r.end > fwd_end) else "temporaries")
        step = r.category in (None, "gradients")  # allocated by the step itself
        events.append((r.start, 0, cat, n, step))
        if r.end is not None:
            events.append((r.end, 1, cat, -n, step))
    events.sort(key=lambda e: (e[0], e[1]))
    scale = {"parameters": param_scale, "gradients": grad_scale}
    live = dict.fromkeys(CATEGORIES, 0.0)
    base = sum(static.values())
    best, best_cats, step_live, step_peak = -1.0, None, 0, 0
    for _, _, cat, nbytes, step in events:
        live[cat] += nbytes * scale.get(cat, 1.0)
        if step:
            step_live += nbytes
            step_peak = max(step_peak, step_live)
        total = base + sum(live.values())
        if total > best:
            best, best_cats = total, {k: int(live[k] + static.get(k, 0)) for k in CATEGORIES}
    return int(best), best_cats, int(step_peak)
