"""Per-rank memory of the sequence-parallel stem, measured (issue 9): every storage the stem allocates in a
real CPU forward and backward is recorded by a TorchDispatchMode, at sp=1 and on each rank of sp=4.

The stem is the VideoDiT's own forward with no blocks: patchify -> seq_in -> patch_embed (+ the sinusoidal
position embedding when `abs_pos`), the RoPE tables for `seq_in.rows(grid)`, then the final layer on this
rank's tokens (`seq_out` with `shard_loss` returns the shard, so nothing is gathered) and backward.

Excluded, on purpose: the patchified input (B, N, patch_dim). `patchify` is a reshape of the latent every
rank already holds (the batch is the same on all ranks of an SP group); the reshape makes one copy of the
latent's bytes, which `seq_in` then slices. It is checked to be exactly that one copy and nothing more.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import vgen.models.dit as dit
from vgen.models.presets import resolve_preset
from vgen.models.pos_embed import sincos_pos_embed
from vgen.models.rope import rope_tables
from vgen.parallel.comm import shard_plan
from vgen.parallel.offload import storage_key
from vgen.parallel.sequence import SequenceGather, SequenceSplit
from vgen.parallel.topology import Topology

SP, B, D, CHANNELS, TEXT_DIM, TEXT_LEN = 4, 2, 64, 4, 20, 7
# 160 tokens (8 frames: every layout splits evenly) and 75 tokens (5 frames of 15: the last token shard is
# padded, switch's frame shards are 2, 1, 1, 1 frames). No other tensor of the stem has a dimension equal to
# any of these row counts or B times them, so a dimension equal to the row count marks a per-token tensor.
GRIDS = {"even": (8, 4, 5), "uneven": (5, 3, 5)}


class _Allocations(TorchDispatchMode):
    """Every new storage an op returns (views of an input are not new): (window, shape, bytes)."""

    def __init__(self):
        super().__init__()
        self.window, self.records = "forward", []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {storage_key(a) for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and storage_key(t) not in inputs:
                self.records.append((self.window, tuple(t.shape), t.untyped_storage().nbytes()))
        return out


def _windowed(fn, rec, name):
    def wrapper(*args, **kwargs):
        outer, rec.window = rec.window, name
        try:
            return fn(*args, **kwargs)
        finally:
            rec.window = outer
    return wrapper


def _measure(monkeypatch, grid, mode, rank, abs_pos):
    """Bytes the stem allocates on `rank` of an SP group of `SP` (SP=1 when rank is None)."""
    torch.manual_seed(0)
    cfg = resolve_preset("tiny", depth=0, hidden=D, heads=4, in_channels=CHANNELS, text_dim=TEXT_DIM, abs_pos=abs_pos)
    model = dit.VideoDiT(cfg)
    # sp=1 runs the same seams at degree 1 (seq_in slices all N tokens as a view), so the two runs differ
    # only in the degree; shard_loss: seq_out returns the tokens, the loss is taken on them, nothing gathers
    degree = 1 if rank is None else SP
    topo = Topology(world_size=degree, rank=rank or 0, sp_size=degree, sp_mode=mode)
    model.seq_in, model.seq_out = SequenceSplit(topo), SequenceGather(topo, shard_loss=True)
    T, H, W = grid
    x = torch.randn(B, CHANNELS, T, 2 * H, 2 * W)  # patch (1, 2, 2)
    t, text, mask = torch.rand(B), torch.randn(B, TEXT_LEN, TEXT_DIM), torch.ones(B, TEXT_LEN, dtype=torch.bool)

    rec, embed = _Allocations(), {}
    monkeypatch.setattr(model, "patchify", _windowed(model.patchify, rec, "patchify"))
    monkeypatch.setattr(dit, "rope_tables", _windowed(rope_tables, rec, "rope"))
    monkeypatch.setattr(dit, "sincos_pos_embed", _windowed(sincos_pos_embed, rec, "pos"))

    def on_embed(module, inputs, out):
        embed["embed"] = out.untyped_storage().nbytes()  # storage ids are reused once freed: keep the bytes
        out.register_hook(lambda g: embed.__setitem__("embed_grad", g.untyped_storage().nbytes()))

    model.patch_embed.register_forward_hook(on_embed)
    with rec:
        out = model(x, t, text, mask)
        rec.window = "backward"
        out.float().pow(2).sum().backward()
    return rec.records, embed, out.shape[1], x, {tuple(p.shape) for p in model.parameters()}


def _split(records, rows):
    """(per-token bytes, fixed bytes) of records: per-token ones have a dimension of `rows` or B * rows."""
    per_token = sum(n for _, shape, n in records if rows in shape or B * rows in shape)
    return per_token, sum(n for _, _, n in records) - per_token


@pytest.mark.parametrize("abs_pos", [True, False], ids=["abs_pos", "rope_only"])
@pytest.mark.parametrize("mode", ["ulysses", "switch"])
@pytest.mark.parametrize("shape", list(GRIDS))
def test_stem_memory_is_local(monkeypatch, shape, mode, abs_pos):
    """Embedding output, its gradient, the RoPE tables (and the position table) on each of 4 ranks take
    rows/N of their sp=1 bytes, rows <= one shard (N/4 rounded up to a token, or to a frame for switch);
    the rest of the stem's bytes do not change with sp; nothing of full length is allocated on an SP rank."""
    grid = GRIDS[shape]
    N = math.prod(grid)
    full, embed1_, _, x, _ = _measure(monkeypatch, grid, mode, None, abs_pos)
    windows = ("rope", "pos") if abs_pos else ("rope",)
    ref = {w: _split([r for r in full if r[0] == w], N) for w in windows}
    ref["stem"] = _split([r for r in full if r[0] != "patchify"], N)
    embed1, grad1 = embed1_["embed"], embed1_["embed_grad"]
    assert embed1 == grad1 == B * N * D * 4
    assert ref["rope"][0] > 0 and (not abs_pos or ref["pos"][0] > 0)

    plan = shard_plan(grid, SP, mode)
    bound = -(-grid[0] // SP) * grid[1] * grid[2] if plan.by_frames else -(-N // SP)
    for rank in range(SP):
        records, embed, rows, _, weights = _measure(monkeypatch, grid, mode, rank, abs_pos)
        label = f"{shape} {mode} rank {rank}"
        assert rows == plan.size(rank) <= bound < N, label
        # the patchified input: one copy of the latent every rank holds, the same as at sp=1 (see docstring)
        assert [r[2] for r in records if r[0] == "patchify"] == [x.nbytes], label
        rest = [r for r in records if r[0] != "patchify"]
        # nothing of full length: no token dimension of N, no buffer (but a weight gradient, which does
        # not depend on N) as large as the (B, N, D) embedding
        big = [r for r in rest if N in r[1] or B * N in r[1] or (r[2] >= B * N * D * 4 and r[1] not in weights)]
        assert not big, label
        # embedding output and its gradient: exactly rows/N of sp=1
        assert embed["embed"] * N == embed1 * rows, label
        assert embed["embed_grad"] * N == grad1 * rows, label
        # RoPE (and position) tables, everything allocated inside the call: per-token part scales by rows/N
        for w in windows:
            per_token, fixed = _split([r for r in records if r[0] == w], rows)
            assert (per_token * N, fixed) == (ref[w][0] * rows, ref[w][1]), (label, w)
        # the whole stem: per-token bytes scale by rows/N, plus at most what nn.Linear adds for a strided input
        # (a shard sliced out of the patches, not padded: a contiguous copy (B, rows, patch_dim) and the
        # product before the bias add (B, rows, D), transient); the rest is unchanged but for a padded shard's pad
        per_token, fixed = _split(rest, rows)
        patch_dim = x.numel() // (B * N)
        pad = B * (plan.size(rank) - plan.real(rank)) * patch_dim * 4
        strided = B * rows * (patch_dim + D) * 4
        assert ref["stem"][0] * rows <= per_token * N <= ref["stem"][0] * rows + strided * N, label
        assert fixed == ref["stem"][1] + pad, label
