"""Full-depth memory of a training step from a trace of a few blocks, and the longest length that fits.

A DiT's blocks are identical, so a step's storage timeline is: the stem's forward, the same block forward
`depth` times, the head (final layer, loss and its backward), the same block backward `depth` times, the
stem's backward. `trace_step(..., depth=k)` (vgen/parallel/memory_sim.py) records where those segments
start (hooks on each block's forward and on the gradient of its output). Here the trace's records are
cut at the segments and laid out for the full depth: the first block and a tail of last blocks keep their
own records (the first backward has no gradient to accumulate yet, the last one feeds the stem; the
offloader prefetches nothing before the first block, keeps the last `offload_keep_last` blocks on the
device and reloads the last offloaded one early: `trace_blocks` says how long the tail is), and the
middle block is repeated. A record's death is kept
relative to its birth block (a block's residual dies in the next block's forward, its saved activations
in its own backward, the gradient it passes down in the block below), so what accumulates over blocks
(offloaded inputs reloaded, gradients) is replayed, not extrapolated as one number. The result is the
event timeline of a full-depth trace; tests compare the two record by record.

Sizes come from two such traces at different frame counts (every size is affine in the frame count, see
memory_sim.FrameSweep), so the live bytes after every event are affine too, and the longest length whose
peak fits a budget is the smallest of one ratio per event: a closed form, checked and refined by exact
replays around it (the flash workspace's rows round up to 128, the one non-affine size).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from vgen.parallel.memory_sim import CATEGORIES, FrameSweep, MemoryReport, StepTrace, trace_step, zero_static_bytes

_CAT = {c: i for i, c in enumerate(CATEGORIES)}
_BLOCK_KINDS = ("fwd", "bwd")


class NotRepeating(ValueError):
    """The traced blocks do not repeat as the layout assumes (a record tied to the middle block's index)."""


def _segments(trace: StepTrace):
    """(labels, start clocks, lengths) of the trace's segments in time order."""
    k = trace.depth
    bounds = list(trace.fwd_marks) + list(trace.bwd_marks)
    if len(trace.fwd_marks) != k + 1 or len(trace.bwd_marks) != k + 1 or bounds != sorted(bounds):
        raise NotRepeating(f"the trace of {k} blocks has no clean block boundaries: {bounds}")
    labels = [("stem", 0)] + [("fwd", i) for i in range(k)] + [("head", 0)]
    labels += [("bwd", i) for i in reversed(range(k))] + [("tail", 0)]
    starts = [0] + bounds
    lengths = [b - a for a, b in zip(starts, bounds + [max(trace.end_clock, bounds[-1])])]
    return labels, bounds, starts, lengths


class DepthLayout:
    """Where each record of a `k`-block trace lands in a `depth`-block step: (source record, start, end).

    Args:
        trace: a trace_step(..., depth=k) with k >= 3: the first block, the middle one, and k - 2 tail
            blocks (k = trace_blocks(mem, depth), or k = depth).
        depth: the model's real depth.
    """

    def __init__(self, trace: StepTrace, depth: int):
        k = trace.depth
        if depth < k or (k < 3 and depth != k):
            raise ValueError(f"need a trace of >= 3 blocks (or of every block) and depth >= its blocks, got {k} and {depth}")
        self.trace, self.depth, self.k, self.m = trace, depth, k, min(1, k - 1)
        labels, self._bounds, self._starts, lengths = _segments(trace)
        self._labels = labels
        src_len = dict(zip(labels, lengths))
        self._seg = {lab: (st, n) for lab, st, n in zip(labels, self._starts, lengths)}
        self._aligned: dict = {}
        target = [("stem", 0)] + [("fwd", p) for p in range(depth)] + [("head", 0)]
        target += [("bwd", p) for p in reversed(range(depth))] + [("tail", 0)]
        self.start_of, clock = {}, 0
        for kind, p in target:
            self.start_of[(kind, p)] = clock
            clock += src_len[(kind, self._source(p) if kind in _BLOCK_KINDS else 0)]
        self.end_clock = clock
        self.fwd_end = self._place(*self._locate(trace.fwd_end), 0)
        self._build()

    def _source(self, p: int) -> int:
        """The traced block whose records block p of the full depth repeats."""
        if p < self.m:
            return p
        if p > self.depth - 1 - (self.k - 1 - self.m):
            return p - (self.depth - self.k)
        return self.m

    def _copies(self, i: int) -> range:
        """Full-depth blocks that repeat traced block i."""
        if i < self.m:
            return range(i, i + 1)
        if i > self.m:
            return range(i + self.depth - self.k, i + self.depth - self.k + 1)
        return range(self.m, self.m + self.depth - self.k + 1)

    def _locate(self, t: int):
        s = bisect.bisect_left(self._bounds, t)
        return self._labels[s], t - self._starts[s]

    def _place(self, label, offset: int, shift: int | None) -> int:
        """Clock of (label, offset) at full depth; block labels move by `shift` blocks (None: fixed ends)."""
        kind, j = label
        if kind not in _BLOCK_KINDS:
            return self.start_of[label] + offset
        if shift is None:  # a stem/head record dying in a block: only the first or last blocks are fixed
            if j == self.m and self.depth != self.k:
                raise NotRepeating(f"a record outside the blocks dies in the repeated block {label}")
            q = j if j < self.m else j + self.depth - self.k
        else:
            q = j + shift
        if not 0 <= q < self.depth:
            raise NotRepeating(f"a record's end lands in block {q} of {self.depth}")
        if shift is not None and self._source(q) != j:  # measured in a first/last block, lands in another
            offset = self._align((kind, j), (kind, self._source(q)), offset)
        return self.start_of[(kind, q)] + offset

    def _align(self, frm, to, offset: int) -> int:
        """`offset` in segment `frm` moved to the same op of segment `to`.

        A first or last block runs a few ops more or fewer than the middle ones (a gradient with nothing
        to accumulate into, a prefetch with no block below, the stem's backward interleaved with the
        first block's): a free after op i of `frm` happens after the op of `to` that i matches, or after
        the last matched op before it.
        """
        key = (frm, to)
        if key not in self._aligned:
            (sa, na), (sb, nb) = self._seg[frm], self._seg[to]
            matched = _match_ops(self.trace.ops[sa:sa + na], self.trace.ops[sb:sb + nb])
            last, to_offset = -1, [0] * (na + 1)
            for i, j in enumerate(matched):
                last = j if j >= 0 else last
                to_offset[i + 1] = last + 1
            self._aligned[key] = to_offset
        return self._aligned[key][offset]

    def _build(self) -> None:
        src, start, end = [], [], []
        for idx, r in enumerate(self.trace.records):
            if r.owner is not None:  # a block's parameter: alive from clock 0, one per repeated block
                for _ in self._copies(r.owner):
                    src.append(idx), start.append(r.start), end.append(-1 if r.end is None else r.end)
                continue
            label, off = self._locate(r.start)
            dead = None if r.end is None else self._locate(r.end)
            if label[0] not in _BLOCK_KINDS:
                src.append(idx), start.append(self._place(label, off, None))
                end.append(-1 if dead is None else self._place(*dead, None))
                continue
            for p in self._copies(label[1]):
                shift = p - label[1]
                src.append(idx), start.append(self._place(label, off, shift))
                end.append(-1 if dead is None else self._place(*dead, shift))
        self.src, self.start, self.end = (np.asarray(a, dtype=np.int64) for a in (src, start, end))

    def records(self, sizes=None):
        """(start, end or None, nbytes, category, phase) per full-depth record, sorted: to compare with a
        full-depth trace."""
        sizes = self.trace.sizes if sizes is None else sizes
        recs = self.trace.records
        return sorted((int(s), None if e < 0 else int(e), int(sizes[i]), recs[i].category, recs[i].phase)
                      for i, s, e in zip(self.src, self.start, self.end))


def _match_ops(a: list, b: list, window: int = 8) -> list:
    """For each op of `a`, the index of the same op in `b` (-1: only in `a`), matching in order.

    The sequences differ by a few inserted or dropped runs: walk both while they agree; where they do
    not, take the smallest skip (in either or both) after which `window` ops agree again.
    """
    matched, i, j = [-1] * len(a), 0, 0
    while i < len(a) and j < len(b):
        if a[i] == b[j]:
            matched[i], i, j = j, i + 1, j + 1
            continue
        i, j = _resync(a, b, i, j, window)
    return matched


def _resync(a, b, i, j, window):
    for skip in range(1, len(a) - i + len(b) - j + 1):
        for di in range(skip + 1):
            ii, jj = i + di, j + skip - di
            if ii <= len(a) and jj <= len(b) and a[ii:ii + window] == b[jj:jj + window]:
                return ii, jj
    return len(a), len(b)


@dataclass
class _Events:
    """The layout's allocations and frees in replay order (independent of sizes)."""

    rec: np.ndarray  # timeline record of each event
    sign: np.ndarray  # +1 allocation, -1 free
    cat: np.ndarray  # category code of each event's record
    step: np.ndarray  # the step itself allocated it (not weights or the batch)


def _events(layout: DepthLayout) -> _Events:
    recs = layout.trace.records
    n = len(layout.src)
    fwd_end = layout.fwd_end
    cat = np.empty(n, dtype=np.int64)
    step = np.empty(n, dtype=bool)
    for t, (i, e) in enumerate(zip(layout.src, layout.end)):
        r = recs[i]
        name = r.category or ("activations" if r.phase == "forward" and (e < 0 or e > fwd_end) else "temporaries")
        cat[t], step[t] = _CAT[name], r.category in (None, "gradients")
    freed = np.nonzero(layout.end >= 0)[0]
    times = np.concatenate([layout.start, layout.end[freed]])
    kinds = np.concatenate([np.zeros(n, np.int64), np.ones(len(freed), np.int64)])
    rec = np.concatenate([np.arange(n), freed])
    order = np.lexsort((rec, kinds, times))  # as memory_sim._replay: by time, allocations first, stable
    rec = rec[order]
    return _Events(rec, np.where(kinds[order] == 0, 1.0, -1.0), cat[rec], step[rec])


class DepthSweep:
    """Memory of the full-depth step at any frame count, from two `k`-block traces at two frame counts.

    Args:
        a, b: trace_step(..., depth=k) at two frame counts, same everything else.
        depth: the model's depth.
    """

    def __init__(self, a: StepTrace, b: StepTrace, depth: int):
        self.sweep = FrameSweep(a, b)  # checks that both ran the same ops
        self.a, self.b, self.depth = a, b, depth
        self.layout = DepthLayout(a, depth)
        self.events = _events(self.layout)
        self.n_params = a.n_params + (depth - a.depth) * a.block_params
        static, self.param_scale, self.grad_scale = zero_static_bytes(self.n_params, a.zero_stage, a.world_size)
        self.static = static
        scale = np.ones(len(CATEGORIES))
        scale[_CAT["parameters"]], scale[_CAT["gradients"]] = self.param_scale, self.grad_scale
        self._scale = scale[self.events.cat]

    # ---- exact evaluation
    def sizes(self, frames: int) -> np.ndarray:
        """Each full-depth record's bytes at `frames`."""
        return np.asarray(self.sweep.sizes(frames), dtype=np.float64)[self.layout.src]

    def evaluate(self, frames: int) -> MemoryReport:
        ev = self.events
        delta = ev.sign * self.sizes(frames)[ev.rec]
        live = np.cumsum(delta * self._scale)
        at = int(np.argmax(live)) if len(live) else 0
        base = sum(self.static.values())
        cats = {}
        for c, name in enumerate(CATEGORIES):
            mask = ev.cat[: at + 1] == c
            cats[name] = int((delta[: at + 1] * self._scale[: at + 1])[mask].sum() + self.static.get(name, 0))
        step_peak = int(np.cumsum(np.where(ev.step, delta, 0.0)).max()) if len(delta) else 0
        a = self.a
        tokens = frames // a.patch_t * a.grid_hw
        return MemoryReport(int(base + (live[at] if len(live) else 0)), cats, step_peak, tokens, tokens // a.sp,
                            a.world_size, a.sp, a.zero_stage, a.sp_impl, a.attention)

    def offloaded_bytes_per_block(self, frames: int) -> float:
        """Bytes one block sends to the host at `frames` (the traced blocks' mean, interpolated)."""
        a, b = self.a, self.b
        per = [t.offloaded_bytes / t.depth for t in (a, b)]
        k = frames // a.patch_t - a.frames // a.patch_t
        return per[0] + (per[1] - per[0]) * k / self.sweep.span if self.sweep.span else per[0]

    # ---- closed form
    def _affine(self, round_rows: str):
        """Per event, live bytes after it as A + B * k (k: frame groups beyond trace a); the flash
        workspace's rounded rows replaced by their bound ("up": n + multiple - 1, "down": n)."""
        span = self.sweep.span
        lo, hi = [], []
        for ra, rb, sa, sb in zip(self.a.records, self.b.records, self.a.sizes, self.b.sizes):
            if ra.rows is None:
                lo.append(sa), hi.append(sb)
                continue
            (row_a, n_a, mult), (row_b, n_b, _) = ra.rows, rb.rows
            pad = mult - 1 if round_rows == "up" else 0
            lo.append(row_a * (n_a + pad)), hi.append(row_b * (n_b + pad))
        lo, hi = (np.asarray(v, dtype=np.float64)[self.layout.src] for v in (lo, hi))
        ev = self.events
        A = np.cumsum(ev.sign * lo[ev.rec] * self._scale)
        B = np.cumsum(ev.sign * (hi - lo)[ev.rec] * self._scale) / span
        return A + sum(self.static.values()), B

    def _closed_form(self, budget: float, round_rows: str, mult: float, add: tuple) -> float:
        """Largest k (frame groups beyond trace a, real-valued) with mult * live + add0 + add1 * k <= budget
        after every event; -inf when none."""
        A, B = self._affine(round_rows)
        A, B = mult * A + add[0], mult * B + add[1]
        if np.any((B <= 0) & (A > budget)):
            return -np.inf
        grow = B > 0
        return float(np.min((budget - A[grow]) / B[grow])) if grow.any() else np.inf

    def max_frames(self, fits, budget: float, max_frames: int, mult: float = 1.0, add: tuple = (0.0, 0.0)) -> int:
        """Longest frame count in [1, max_frames] with fits(frames), bracketed by the closed form.

        Args:
            fits: exact test at one frame count (e.g. the device total of evaluate(frames) <= budget).
            budget, mult, add: the affine form of the same test: mult * peak + add[0] + add[1] * k <= budget.
        """
        pt, base = self.a.patch_t, self.a.frames // self.a.patch_t
        bounds = []
        for rows in ("up", "down"):
            k = self._closed_form(budget, rows, mult, add)
            bounds.append(max_frames if k == np.inf else max(0, min(max_frames // pt, int(np.floor(base + k)))) * pt)
        good, bad = max(bounds[0] - pt, 0), min(bounds[1] + pt, max_frames + pt)
        if good and not fits(good):  # the bound is exact up to the rounding of uneven slices: walk down
            while good > 0 and not fits(good):
                good -= pt
            return good
        while bad - good > pt:
            mid = (good + bad) // 2 // pt * pt
            mid = mid if mid > good else good + pt
            good, bad = (mid, bad) if fits(mid) else (good, mid)
        return good


def depth_sweep(dit, mem, latent_chw, text_len: int, frames=(64, 128), blocks: int | None = None, lean: str = "long",
                **kw) -> DepthSweep:
    """A DepthSweep of `blocks`-block traces (None: trace_blocks) at two frame counts; other arguments as
    memory_sim.trace_step."""
    C, H, W = latent_chw
    blocks = trace_blocks(mem, dit.depth) if blocks is None else blocks
    traces = [trace_step(dit, mem, (C, T, H, W), text_len, depth=min(blocks, dit.depth), lean=lean, **kw)
              for T in frames]
    return DepthSweep(*traces, depth=dit.depth)



def trace_blocks(mem, depth: int) -> int:
    """How many blocks a trace needs for DepthLayout to lay it out for `depth` (`depth`: trace them all).

    Roles: the first block, one middle block (repeated), and a tail that runs differently. With offload
    the last `offload_keep_last` blocks stay on the device and the last offloaded block before them is
    special too (its reload starts at the final block's output gradient, and the second reload buffer is
    allocated in its backward), so the tail is keep_last + 1 blocks; otherwise the tail is the last block.
    Every block between the first and the tail must run the middle block's plan, and a trace of that many
    blocks must plan its blocks as the same roles do at full depth; else every block is traced.
    """
    from vgen.parallel.checkpointing import block_plans

    if mem is None:
        return min(3, depth)
    keep = int(getattr(mem, "offload_keep_last", 1)) if bool(getattr(mem, "offload", False)) else 0
    tail = 1 + keep if 0 < keep < depth else 1
    k = 2 + tail
    if k >= depth:
        return depth
    full, short = block_plans(mem, depth), block_plans(mem, k)
    if full[1:depth - tail] != [short[1]] * (depth - 1 - tail) or short != full[:2] + full[depth - tail:]:
        return depth
    return k


def _lean_order(dit, latent_chw, frames: int, micro_batch: int, sp: int) -> tuple:
    """The lean-op regime to try first: the one a real run at the longer traced length is in (a lean
    input holds micro_batch x local tokens x hidden elements)."""
    from vgen.models.lean_ops import CHUNK_THRESHOLD

    _, H, W = latent_chw
    pt, ph, pw = dit.patch
    numel = micro_batch * (frames // pt) * (H // ph) * (W // pw) // sp * dit.hidden
    return ("long", "short") if numel > CHUNK_THRESHOLD else ("short", "long")


def solve_max_frames(dit, mem, latent_chw, text_len: int, budget: float, max_frames: int, terms=None,
                     frames=(64, 128), **kw) -> dict:
    """The longest latent frame count whose step fits `budget` bytes per GPU, from short traces (trace_blocks).

    Args:
        terms: a gpu_memory.GpuTerms (its n_params is set here): the budget then holds the device total
            (reserved tensors + context, NCCL, EMA, encoders, offload pool); None: tensors only.
        frames: the two traced frame counts (long enough that every frame-proportional tensor is over
            the offloader's size threshold, so longer steps offload the same tensors).
        kw: as memory_sim.trace_step.
    Returns:
        dict(frames, report (MemoryReport at the answer), device (dict of GPU terms or None), sweep, lean).
    """
    blocks = trace_blocks(mem, dit.depth)
    answer = None
    for lean in _lean_order(dit, latent_chw, frames[1], kw.get("micro_batch", 1), kw.get("sp", 1)):
        sw = depth_sweep(dit, mem, latent_chw, text_len, frames=frames, blocks=blocks, lean=lean, **kw)
        if terms is not None:
            terms.n_params = sw.n_params
        pool0 = sw.offloaded_bytes_per_block(sw.a.frames)
        pool1 = (sw.offloaded_bytes_per_block(sw.b.frames) - pool0) / sw.sweep.span
        mult, add = terms.affine(pool0, pool1) if terms is not None else (1.0, (0.0, 0.0))

        def device(T, sw=sw):
            rep = sw.evaluate(T)
            d = terms.device_bytes(rep.peak_bytes, sw.offloaded_bytes_per_block(T)) if terms is not None else None
            return rep, d

        def fits(T):
            rep, d = device(T)
            return (d["device"] if d else rep.peak_bytes) <= budget

        T = sw.max_frames(fits, budget, max_frames, mult, add)
        from vgen.parallel.memory_sim import lean_regime_holds

        answer = (T, sw, lean)
        if T == 0 or lean_regime_holds(sw.a, T):
            break
    T, sw, lean = answer
    rep, d = device(max(T, sw.a.patch_t))
    return dict(frames=T, report=rep, device=d, sweep=sw, lean=lean)
