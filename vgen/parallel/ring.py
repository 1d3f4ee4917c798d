"""Ring attention (Liu et al., arXiv 2310.01889) for the spatial and temporal cores, and the hybrid of
Ulysses inside groups with a ring across them (USP, arXiv 2405.07719), on a fused kernel that returns the
log-sum-exp (vgen/parallel/fused_attention.py).

Position i of the ring holds the token chunk [i*C, (i+1)*C) of the (t, h, w) sequence (padding at the end).
A query chunk needs K/V only from the chunks that share an attention group with it: a frame (spatial) or a
spatial position (temporal). `ring_plan` works out on the host, from the grid alone, which token range of
each chunk every position needs and the batched kernel calls ("pieces") of each chunk pair:
  * Transfers. At step s (1..n-1) position i receives from i-s the K/V of the tokens it needs and sends to
    i+s what i+s needs of its own chunk; steps with nothing to move are skipped. Spatial chunks of at least
    a frame exchange only the partial frames at their borders, with their neighbours; temporal chunks of
    at least a frame need every chunk whole, which is the usual ring volume. Chunks go straight to the
    rank at offset s rather than hop by hop, so no rank forwards K/V it does not use; each step is still a
    permutation (one peer to send to, one to receive from). The next step's transfer is posted before the
    current chunk is computed, so it overlaps.
  * Pieces. A chunk's tokens form at most three rectangles of frames x positions (a partial first frame,
    whole frames, a partial last frame). A piece is a query rectangle against a key rectangle over the
    groups both hold: one kernel call batched over those groups. Summed over pieces and chunk pairs this is
    exactly the grouped attention's work, and no score matrix exists outside the kernel.
Partial outputs are merged with their log-sum-exp in fp32; the saved output is in the model's dtype.
Under selective checkpointing the block's recomputation does not run the ring again: see `_SacStash`.
Backward re-sends the K/V, runs each piece's kernel backward with the final (merged) output and LSE, and
sends each partial dK/dV (model dtype) straight back to the chunk's owner, which sums them in fp32.
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode, _pop_mode_temporarily

from vgen.models.attention import AttentionCore
from vgen.parallel.comm import COUNTER, nbytes
from vgen.parallel.fused_attention import attention_backward, attention_forward
from vgen.parallel.ulysses import heads_to_seq, seq_to_heads

# gloo matches messages by (peer, tag) in order: with two ranks, K/V and dK/dV go the same way at once
KV_TAG, DKV_TAG = 0, 1


@dataclass(frozen=True)
class RingSpec:
    ranks: tuple[int, ...]  # global ranks, in ring order; position i holds token chunk i
    index: int  # this rank's position
    group: Any = field(default=None, compare=False)  # process group of the ring

    @property
    def size(self) -> int:
        return len(self.ranks)


@dataclass(frozen=True)
class Rect:
    """Consecutive tokens starting at global index `start` that fill frames [f0, f1) x positions [p0, p1):
    either part of one frame or whole frames, so they view as (frames, positions) without a copy."""

    start: int
    f0: int
    f1: int
    p0: int
    p1: int

    @property
    def size(self) -> int:
        return (self.f1 - self.f0) * (self.p1 - self.p0)


@dataclass(frozen=True)
class Piece:
    """One kernel call: queries of rectangle `q` against keys of rectangle `k` in groups [g0, g1)
    (frames for spatial, positions for temporal)."""

    q: Rect
    k: Rect
    g0: int
    g1: int


@dataclass(frozen=True)
class Step:
    """What this position moves at ring step `offset`: (peer position, first token, end token) or None."""

    offset: int
    recv: tuple[int, int, int] | None
    send: tuple[int, int, int] | None


@dataclass(frozen=True)
class RingPlan:
    kind: str
    base: int  # first token of this position's chunk
    steps: tuple[Step, ...]
    pieces: dict  # source position -> tuple[Piece, ...] (a dict: the plan is cached, never mutated)


def _frame_size(kind: str, grid) -> int:
    T, H, W = grid
    return T * H * W if kind == "full" else H * W  # "full": the whole sequence is one group


def _chunk_range(index: int, chunk: int, tokens: int) -> tuple[int, int]:
    """Real tokens of chunk `index` (empty when the chunk is all padding)."""
    lo = min(index * chunk, tokens)
    return lo, min(lo + chunk, tokens)


@functools.lru_cache(maxsize=4096)
def needed_range(kind: str, grid: tuple[int, int, int], chunk: int, qi: int, kj: int) -> tuple[int, int] | None:
    """The smallest token range of chunk kj holding every key a query of chunk qi attends to, or None.
    Plain integers (no tensors), so the plan is the same under fake tensors."""
    T, H, W = grid
    P = _frame_size(kind, grid)
    (q0, q1), (k0, k1) = _chunk_range(qi, chunk, T * H * W), _chunk_range(kj, chunk, T * H * W)
    if q0 == q1 or k0 == k1:
        return None
    if kind != "temporal":  # the frames of chunk qi, a run of whole-frame token ranges
        lo, hi = max(k0, q0 // P * P), min(k1, ((q1 - 1) // P + 1) * P)
        return (lo, hi) if lo < hi else None
    positions = set(range(P)) if q1 - q0 >= P else {t % P for t in range(q0, q1)}
    first = next((t for t in range(k0, min(k1, k0 + P)) if t % P in positions), None)
    if first is None:
        return None
    last = next(t for t in range(k1 - 1, max(k0, k1 - P) - 1, -1) if t % P in positions)
    return first, last + 1


def rects(lo: int, hi: int, P: int) -> tuple[Rect, ...]:
    """Tokens [lo, hi) as at most three rectangles: a partial first frame, whole frames, a partial last."""
    out, pos = [], lo
    while pos < hi:
        f, p = divmod(pos, P)
        if p == 0 and hi - pos >= P:
            n = (hi - pos) // P
            out.append(Rect(pos, f, f + n, 0, P))
            pos += n * P
        else:
            end = min(hi, (f + 1) * P)
            out.append(Rect(pos, f, f + 1, p, end - f * P))
            pos = end
    return tuple(out)


def _pieces(kind: str, q_rects, k_rects) -> tuple[Piece, ...]:
    out = []
    for a in q_rects:
        for b in k_rects:
            g0, g1 = (max(a.p0, b.p0), min(a.p1, b.p1)) if kind == "temporal" else (max(a.f0, b.f0), min(a.f1, b.f1))
            if g0 < g1:
                out.append(Piece(a, b, g0, g1))
    return tuple(out)


@functools.lru_cache(maxsize=1024)
def ring_plan(kind: str, grid: tuple[int, int, int], chunk: int, size: int, index: int) -> RingPlan:
    """Transfers and kernel calls of ring position `index` (see the module docstring)."""
    T, H, W = grid
    P = _frame_size(kind, grid)
    lo, hi = _chunk_range(index, chunk, T * H * W)
    pieces = {index: _pieces(kind, rects(lo, hi, P), rects(lo, hi, P))}
    steps = []
    for s in range(1, size):
        src, dst = (index - s) % size, (index + s) % size
        need, give = needed_range(kind, grid, chunk, index, src), needed_range(kind, grid, chunk, dst, index)
        if need is not None:
            pieces[src] = _pieces(kind, rects(lo, hi, P), rects(*need, P))
        if need is not None or give is not None:
            steps.append(Step(s, None if need is None else (src, *need), None if give is None else (dst, *give)))
    return RingPlan(kind, index * chunk, tuple(steps), pieces)


def _take(x: torch.Tensor, r: Rect, base: int, kind: str, g0: int, g1: int) -> torch.Tensor:
    """(B, C, ...) tokens from global index `base` on -> (B, G, L, ...) view of rectangle r's tokens in
    groups [g0, g1), each group's tokens in order."""
    v = x[:, r.start - base : r.start - base + r.size].unflatten(1, (r.f1 - r.f0, r.p1 - r.p0))
    if kind == "temporal":
        return v[:, :, g0 - r.p0 : g1 - r.p0].transpose(1, 2)
    return v[:, g0 - r.f0 : g1 - r.f0]


def _post(sends, recvs, spec: RingSpec, label: str, tag: int):
    """Post async P2P: sends = [(position, tensor)], recvs = [(position, buffer)]. Returns (works, the
    tensors in flight), which the caller holds until `_wait`: a send buffer must outlive its transfer.
    Counts the bytes sent under `label` (comm.COUNTER)."""
    tensors = [(p, t.contiguous()) for p, t in sends]
    ops = [dist.P2POp(dist.isend, t, spec.ranks[p], spec.group, tag) for p, t in tensors]
    ops += [dist.P2POp(dist.irecv, t, spec.ranks[p], spec.group, tag) for p, t in recvs]
    for _, t in tensors:
        COUNTER.add(label, nbytes(t))
    return (dist.batch_isend_irecv(ops) if ops else []), tensors + recvs


def _wait(pending) -> None:
    for work in pending[0]:
        work.wait()


def _post_step(kv: torch.Tensor, step: Step, plan: RingPlan, spec, label):
    """Post one step's K/V transfer; returns (receive buffer or None, works)."""
    sends = [] if step.send is None else [(step.send[0], kv[:, :, step.send[1] - plan.base : step.send[2] - plan.base])]
    buf = None if step.recv is None else kv.new_empty(kv.shape[0], kv.shape[1], step.recv[2] - step.recv[1], *kv.shape[3:])
    return buf, _post(sends, [] if buf is None else [(step.recv[0], buf)], spec, label, KV_TAG)


def _incoming(kv: torch.Tensor, plan: RingPlan, spec: RingSpec, label: str):
    """Yield (step or None for this rank's own chunk, token base, K/V (2, B, L, h, d) or None) for the own
    chunk and then every step; each step's transfer is posted before the previous one is computed."""
    pending = _post_step(kv, plan.steps[0], plan, spec, label) if plan.steps else None
    yield None, plan.base, kv
    for n, step in enumerate(plan.steps):
        nxt = _post_step(kv, plan.steps[n + 1], plan, spec, label) if n + 1 < len(plan.steps) else None
        buf, works = pending
        _wait(works)
        yield step, (None if step.recv is None else step.recv[1]), buf
        pending = nxt


def _merge(out: torch.Tensor, lse: torch.Tensor, blk_out: torch.Tensor, blk_lse: torch.Tensor) -> None:
    """In place: fold a softmax-normalised block over other keys into (out, lse), views of the fp32
    accumulators. lse starts at -inf, whose weight exp(-inf - new) is 0."""
    new = torch.logaddexp(lse, blk_lse)
    out.copy_(out * (lse - new).exp().unsqueeze(-1) + blk_out * (blk_lse - new).exp().unsqueeze(-1))
    lse.copy_(new)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32  # the kernels' LSE dtype


def _groups(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(0, 1)  # (B, G, L, ...) -> (B*G, L, ...): the kernel's batch of groups


def _forward_label(kind: str) -> str:
    """comm.py's labels: a forward transfer made again inside backward (checkpoint recomputation) is
    "/recompute", so the re-sent bytes are counted apart from the forward's."""
    return f"{kind}/fwd" if torch._C._current_graph_task_id() == -1 else f"{kind}/recompute"


class _SacStash:
    """Static helpers that keep the ring's (out, lse) for the recomputation of a selectively checkpointed block.

    Selective checkpointing (vgen/parallel/checkpointing.py) keeps per-op outputs in a storage shared by
    torch's two dispatch modes of one checkpoint call: _CachingTorchDispatchMode (forward) and
    _CachedTorchDispatchMode (recomputation). The ring's P2P are not functional ops the policy could keep,
    so the whole ring call runs with that mode popped (none of its ops enter the per-op cache, whose
    counters must match between forward and recomputation), and its result goes into the same storage
    under this core's own key: the recomputation takes it from there instead of sending K/V again. The
    storage lives and dies with the checkpoint's graph, so a forward without backward leaks nothing. Any
    other situation (no selective checkpoint, another dispatch mode on top, no grad, an entry already
    taken) runs the ring as usual."""

    @staticmethod
    def mode():
        """The selective checkpoint's dispatch mode when it is the innermost one and grad is on, or None."""
        mode = _get_current_dispatch_mode()
        name = type(mode).__name__
        ok = name in ("_CachingTorchDispatchMode", "_CachedTorchDispatchMode") and hasattr(mode, "storage")
        return mode if ok and torch.is_grad_enabled() else None

    @staticmethod
    def run(core: nn.Module, mode, q, k, v, spec, kind, grid):
        key = ("vgen.parallel.ring", id(core))  # one queue per core (per block) in the checkpoint's storage
        entries = mode.storage.get(key)  # (out, lse) of this core's calls, in forward order
        if type(mode).__name__ == "_CachingTorchDispatchMode":
            if entries is None:
                mode.storage[key] = entries = deque()
            box = {}
            with _pop_mode_temporarily():
                out = RingAttention.apply(q, k, v, spec, kind, grid, box)
            entries.append(box["kept"])
            return out
        kept = entries.popleft() if entries else None
        with _pop_mode_temporarily():
            return RingAttention.apply(q, k, v, spec, kind, grid, {"reuse": kept} if kept else None)


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec: RingSpec, kind: str, grid, box=None):
        # q, k, v: (B, C, h, d), the token chunk `spec.index`; K/V travel in the model's dtype.
        # box (optional, _SacStash): {"reuse": (out, lse)} skips the computation; otherwise "kept" is set
        ctx.spec, ctx.kind, ctx.grid = spec, kind, tuple(grid)
        if box is not None and "reuse" in box:
            out, lse = box["reuse"]
            ctx.save_for_backward(q, k, v, out, lse)
            return out.detach()  # a fresh alias: autograd marks the output, not the kept tensor
        out, lse = _ring_forward(q, k, v, spec, kind, grid)
        ctx.save_for_backward(q, k, v, out, lse)
        if box is not None:
            box["kept"] = (out.detach(), lse)
        return out  # (B, C, h, d)

    @staticmethod
    def backward(ctx, grad):
        return (*_ring_backward(ctx, grad), None, None, None, None)


def _ring_forward(q, k, v, spec: RingSpec, kind: str, grid):
    """The ring's (out in q's dtype, lse in fp32) of chunk `spec.index`."""
    B, C, h, d = q.shape
    plan = ring_plan(kind, tuple(grid), C, spec.size, spec.index)
    out = torch.zeros(q.shape, dtype=_acc_dtype(q), device=q.device)  # fp32 merge
    lse = torch.full((B, C, h), float("-inf"), dtype=_acc_dtype(q), device=q.device)
    for step, base, kv in _incoming(torch.stack([k, v]), plan, spec, _forward_label(kind)):
        for pc in plan.pieces[spec.index if step is None else step.recv[0]] if kv is not None else ():
            qp = _groups(_take(q, pc.q, plan.base, kind, pc.g0, pc.g1))
            kp, vp = (_groups(_take(t, pc.k, base, kind, pc.g0, pc.g1)) for t in kv)
            o, l = attention_forward(qp, kp, vp, d**-0.5)  # (B*G, Lq, h, d), (B*G, h, Lq)
            _merge(_take(out, pc.q, plan.base, kind, pc.g0, pc.g1), _take(lse, pc.q, plan.base, kind, pc.g0, pc.g1),
                   o.to(out.dtype).unflatten(0, (B, -1)), l.transpose(1, 2).unflatten(0, (B, -1)))
    return out.to(q.dtype), lse


def _ring_backward(ctx, grad):
    """(dq, dk, dv) of RingAttention."""
    q, k, v, out, lse = ctx.saved_tensors
    spec, kind = ctx.spec, ctx.kind
    plan = ring_plan(kind, ctx.grid, q.shape[1], spec.size, spec.index)
    dq = torch.zeros(q.shape, dtype=_acc_dtype(q), device=q.device)
    dkv = torch.zeros((2, *k.shape), dtype=_acc_dtype(q), device=q.device)  # own chunk's dK/dV, summed here
    returning = []  # (works, buffer, token start) of partial dK/dV of own tokens coming back
    label = f"{kind}/bwd"
    for step, base, kv in _incoming(torch.stack([k, v]), plan, spec, label):
        sends, recvs = [], []
        if kv is not None:
            part = dkv if step is None else torch.zeros(kv.shape, dtype=dkv.dtype, device=q.device)
            src = spec.index if step is None else step.recv[0]
            _piece_grads(plan, kind, plan.pieces[src], (grad, q, out, lse), kv, base, dq, part)
            if step is not None:
                sends.append((src, part.to(k.dtype)))  # the owner sums the partials in fp32
        if step is not None and step.send is not None:
            peer, lo, hi = step.send
            recvs.append((peer, k.new_empty(2, k.shape[0], hi - lo, *k.shape[2:])))
        works = _post(sends, recvs, spec, label, DKV_TAG)
        _drain(returning, dkv, plan.base)  # the previous step's partials: one step behind
        returning.append((works, recvs[0][1] if recvs else None, step.send[1] if recvs else None))
    _drain(returning, dkv, plan.base)
    dk, dv = dkv.to(k.dtype).unbind(0)
    return dq.to(q.dtype), dk, dv


def _piece_grads(plan, kind, pieces, q_side, kv, base, dq, dkv) -> None:
    """Add each piece's kernel backward to dq (this chunk) and dkv (the K/V tokens from `base` on).
    q_side = (grad, q, out, lse) of this chunk; out and lse are the final, merged ones."""
    B, d = dq.shape[0], dq.shape[-1]
    for pc in pieces:
        qg, qq, qo, ql = (_groups(_take(t, pc.q, plan.base, kind, pc.g0, pc.g1)) for t in q_side)
        kp, vp = (_groups(_take(t, pc.k, base, kind, pc.g0, pc.g1)) for t in kv)
        gq, gk, gv = attention_backward(qg, qq, kp, vp, qo, ql.transpose(1, 2).contiguous(), d**-0.5)
        _take(dq, pc.q, plan.base, kind, pc.g0, pc.g1).add_(gq.unflatten(0, (B, -1)))
        for acc, g in zip(dkv, (gk, gv)):
            _take(acc, pc.k, base, kind, pc.g0, pc.g1).add_(g.unflatten(0, (B, -1)))


def _drain(returning: list, dkv: torch.Tensor, own_base: int) -> None:
    """Wait for the posted dK/dV exchanges and add the partials that came back into dkv."""
    while returning:
        works, buf, start = returning.pop(0)
        _wait(works)
        if buf is not None:
            dkv[:, :, start - own_base : start - own_base + buf.shape[2]] += buf


class RingCore(nn.Module):
    """Wraps an AttentionCore for ring mode, or for hybrid when `ulysses_group` is given: all-to-all inside
    the Ulysses group first (its ranks hold consecutive token shards, so the gathered sequence is the
    contiguous chunk `ring_rank`), then the ring over chunks with the local heads.

    Args:
        local: the model's original core.
        spec: this rank's ring.
        ulysses_group: process group of the Ulysses level (None for pure ring).
    """

    def __init__(self, local: AttentionCore, spec: RingSpec, ulysses_group=None):
        super().__init__()
        self.local, self.spec, self.ulysses_group = local, spec, ulysses_group
        self.kind = local.kind

    def forward(self, q, k, v, grid, kv_mask=None):
        # q: (B, N_local, h, d); k, v the same, or (B, L, h, d) text for "cross"
        if self.kind == "cross":
            return self.local(q, k, v, grid, kv_mask=kv_mask)  # exact without communication
        if self.ulysses_group is not None:
            q, k, v = seq_to_heads(q, k, v, self.ulysses_group, self.kind).unbind(0)  # (B, u*N_local, h/u, d)
        mode = _SacStash.mode()  # selective checkpointing: the recomputation reuses the forward's result
        if mode is None:
            out = RingAttention.apply(q, k, v, self.spec, self.kind, tuple(grid))
        else:
            out = _SacStash.run(self, mode, q, k, v, self.spec, self.kind, tuple(grid))
        if self.ulysses_group is not None:
            out = heads_to_seq(out, self.ulysses_group, self.kind)  # (B, N_local, h, d)
        return out

    def extra_repr(self) -> str:
        return f"kind={self.kind}, ring={self.spec.size}, ulysses={self.ulysses_group is not None}"
