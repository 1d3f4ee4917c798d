"""Ring and hybrid attention on the fused kernel (vgen/parallel/ring.py, vgen/parallel/fused_attention.py).

1. The ring-wrapped spatial and temporal cores on 2 and 4 CPU gloo ranks against the single-process core:
   output and the gradients of q, k and v (fp32, <= 1e-5 relative), even and uneven token counts, chunks
   smaller than a frame (spatial K/V from several neighbours, temporal pairs that share no position), a
   chunk of padding only, and dp x sp layouts. Each rank's sent bytes equal the minimal volume, counted
   here by brute force over tokens: spatial K/V go only to ranks that share a frame.
2. Per-rank peak memory of one attention forward + backward at two lengths 4x apart (16K tokens per rank at
   the longer): real CPU tensors, torch's dispatch-level storage tracker, a fake process group.
3. Kernel FLOPs (FlopCounterMode) summed over all ranks against the grouped attention's, on fake tensors.
The whole-model parity of ring and hybrid is in tests/test_sp.py and tests/test_sp_train.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sp_utils import read_results, spawn, write_result

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sp_ring_bench", ROOT / "benchmarks" / "sp_ring.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

TOL = 1e-5
HEADS, HEAD_DIM, BATCH = 4, 8, 2


def _case(mode, degree, kind, grid, u=1):
    return dict(mode=mode, degree=degree, ulysses_degree=u, kind=kind, grid=grid)


# grids (T, H, W) of tokens: frames split evenly; 45 tokens (uneven, frames straddle chunks); chunks smaller
# than a frame (2 x 20 tokens on 4 ranks); 6 tokens on 4 ranks (the last chunk is padding only)
EVEN, UNEVEN, SMALL_CHUNKS, FEW = (4, 4, 4), (5, 3, 3), (2, 4, 5), (2, 1, 3)
KINDS = ("spatial", "temporal")
CASES = {
    2: [_case("ring", 2, k, g) for k in KINDS for g in (EVEN, UNEVEN, (1, 5, 5), (3, 2, 5))]
    + [_case("hybrid", 2, "temporal", UNEVEN)],
    4: [_case(m, 4, k, g, u) for m, u in (("ring", 1), ("hybrid", 2)) for k in KINDS for g in (EVEN, UNEVEN, SMALL_CHUNKS, FEW)]
    + [_case("ring", 2, k, UNEVEN) for k in KINDS],  # dp 2 x sp 2: ring peers are global ranks != SP ranks
}


def _run_core_case(case: dict) -> dict:
    from vgen.models.attention import AttentionCore
    from vgen.parallel.comm import COUNTER, pad_dim, shard_plan
    from vgen.parallel.sequence import make_core
    from vgen.parallel.topology import build_topology

    grid, kind = tuple(case["grid"]), case["kind"]
    topo = build_topology(SimpleNamespace(**{k: case[k] for k in ("mode", "degree", "ulysses_degree")}), heads=HEADS)
    g = torch.Generator().manual_seed(0)
    N = grid[0] * grid[1] * grid[2]
    q, k, v = (2 * torch.randn(BATCH, N, HEADS, HEAD_DIM, generator=g) for _ in range(3))  # far from uniform
    dout = torch.randn(BATCH, N, HEADS, HEAD_DIM, generator=g)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = AttentionCore(kind)(*ref_in, grid)
    ref.backward(dout)

    plan = shard_plan(grid, topo.sp_size, topo.sp_mode)
    start = topo.sp_rank * plan.local

    def shard(x):
        return pad_dim(x, plan.padded, 1)[:, start : start + plan.local].clone()

    local = [shard(t).requires_grad_() for t in (q, k, v)]
    COUNTER.reset()
    out = make_core(AttentionCore(kind), topo)(*local, grid)
    out.backward(shard(dout))
    real = max(0, min(plan.local, N - start))  # tokens of this shard that are not padding

    def err(a, b, full):
        # norm-wise; a temporal group of one frame has dq == 0 exactly, so 0/0 must not become nan
        return float((a[:, :real] - b[:, :real]).abs().max() / full.abs().max().clamp_min(1e-30)) if real else 0.0

    return {
        "case": case,
        "sp_rank": topo.sp_rank,
        "out": err(out.detach(), shard(ref.detach()), ref.detach()),
        "grads": [err(a.grad, shard(b.grad), b.grad) for a, b in zip(local, ref_in)],
        "padding_out": float(out.detach()[:, real:].abs().max()) if real < plan.local else 0.0,
        "bytes": COUNTER.snapshot(),
        "local": plan.local,
    }


def _core_worker(rank: int, world: int, cases: list, out_dir: str) -> None:
    write_result(out_dir, rank, [_run_core_case(case) for case in cases])


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def results(request, tmp_path_factory):
    world = request.param
    out_dir = str(tmp_path_factory.mktemp(f"ring{world}"))
    spawn(_core_worker, world, CASES[world], out_dir)
    return [r for rank_results in read_results(out_dir, world) for r in rank_results]


def _label(r) -> str:
    c = r["case"]
    return f"{c['mode']}(degree={c['degree']}, u={c['ulysses_degree']}) {c['kind']} grid={tuple(c['grid'])} sp_rank={r['sp_rank']}"


@pytest.mark.slow
def test_ring_cores_match_single_process(results):
    assert len(results) >= 18
    for r in results:
        assert r["out"] <= TOL, f"{_label(r)}: output rel err {r['out']:.2e}"
        for name, e in zip("qkv", r["grads"]):
            assert e <= TOL, f"{_label(r)}: d{name} rel err {e:.2e}"
        assert r["padding_out"] == 0.0, _label(r)


def _group(t: int, kind: str, positions: int) -> int:
    return t % positions if kind == "temporal" else t // positions


def _needed_tokens(kind, grid, chunk, qi, kj) -> int:
    """Brute force: tokens from the first to the last of chunk kj that share a group with chunk qi
    (for spatial that range holds nothing else: frames are consecutive)."""
    T, H, W = grid
    N, P = T * H * W, H * W
    groups = {_group(t, kind, P) for t in range(qi * chunk, min((qi + 1) * chunk, N))}
    hits = [t for t in range(kj * chunk, min((kj + 1) * chunk, N)) if _group(t, kind, P) in groups]
    if kind == "spatial":
        assert len(hits) == (hits[-1] - hits[0] + 1 if hits else 0)
    return hits[-1] - hits[0] + 1 if hits else 0


def _expected_bytes(r) -> dict[str, int]:
    c = r["case"]
    u = c["ulysses_degree"] if c["mode"] == "hybrid" else 1
    ring = c["degree"] // u
    pos, chunk, kind = r["sp_rank"] // u, u * r["local"], c["kind"]
    token = BATCH * HEADS // u * HEAD_DIM * 4  # one token of K (or V) with the ring's heads, fp32
    others = [j for j in range(ring) if j != pos]
    given = sum(_needed_tokens(kind, tuple(c["grid"]), chunk, j, pos) for j in others)
    taken = sum(_needed_tokens(kind, tuple(c["grid"]), chunk, pos, j) for j in others)
    a2a = 4 * BATCH * r["local"] * HEADS * HEAD_DIM * 4 * (u - 1) // u  # q, k, v in; the output back
    fwd = a2a + 2 * token * given
    bwd = a2a + 2 * token * given + 2 * token * taken  # K/V again, partial dK/dV back to their owners
    return {k: v for k, v in ((f"{kind}/fwd", fwd), (f"{kind}/bwd", bwd)) if v}


@pytest.mark.slow
def test_bytes_are_minimal(results):
    for r in results:
        assert r["bytes"] == _expected_bytes(r), _label(r)
    # spatial chunks that hold whole frames move nothing; a chunk larger than a frame sends its neighbours
    # at most the two partial frames at its borders
    for r in results:
        c = r["case"]
        if c["kind"] == "spatial" and c["mode"] == "ring" and tuple(c["grid"]) == EVEN:
            assert r["bytes"] == {}, _label(r)


# ---- memory and FLOPs: one rank of a large ring on a fake process group ------------------------------------


@pytest.mark.parametrize("mode", ["ring", "hybrid"])
def test_peak_memory_grows_linearly(mode):
    """Peak bytes of one attention forward + backward per rank, real CPU tensors, at 4K and 16K tokens per
    rank: a fused kernel keeps it linear (4x); one dense score matrix would make it 16x."""
    ratios = {}
    for kind in KINDS:
        small, large = (bench.measure_rank(mode, 4, kind, (frames, 15, 16), heads=2, head_dim=32, rank=1)["peak_bytes"]
                        for frames in (67, 268))  # 4020 (frames straddle ranks) and 16080 tokens per rank
        ratios[kind] = large / small
    assert all(3.5 <= r <= 5.0 for r in ratios.values()), ratios


@pytest.mark.parametrize("mode, u", [("ring", 1), ("hybrid", 2)])
def test_kernel_flops_equal_grouped_attention(mode, u):
    """Kernel FLOPs of one attention forward + backward, summed over the ranks of a degree-4 job, against
    the grouped attention of the whole sequence in one process. FLOPs depend on shapes only, so a small
    grid whose chunks straddle frames (1.75 frames per rank) stands for any size (the benchmark runs 2b shapes)."""
    grid = (7, 10, 13)
    for kind in KINDS:
        ring = sum(bench.measure_rank(mode, 4, kind, grid, heads=4, head_dim=16, rank=r, u=u)["flops"]
                   for r in range(4))
        grouped = bench.grouped_flops(kind, grid, heads=4, head_dim=16)
        assert abs(ring / grouped - 1) <= 0.10, (kind, ring, grouped)


# ---- the kernel wrapper: forward/backward with an LSE against autograd through SDPA ----------------------


def _check_kernel(device: str, dtype: torch.dtype, tol: float) -> None:
    import torch.nn.functional as F

    from vgen.parallel.fused_attention import attention_backward, attention_forward

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 37, 2, 64, generator=g).to(device, dtype)  # odd lengths: padded LSE rows on CUDA
    k, v = (torch.randn(3, 53, 2, 64, generator=g).to(device, dtype) for _ in range(2))
    dout = torch.randn(3, 37, 2, 64, generator=g).to(device, dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in leaves)).transpose(1, 2)
    ref.backward(dout)
    out, lse = attention_forward(q, k, v, 64**-0.5)
    scores = torch.einsum("gqhd,gkhd->ghqk", q.double(), k.double()) * 64**-0.5
    assert lse.dtype == torch.float32 and lse.shape == (3, 2, 37)
    assert torch.allclose(lse.double(), scores.logsumexp(-1), atol=tol, rtol=tol)
    assert torch.allclose(out.float(), ref.float(), atol=tol, rtol=tol)
    for got, leaf in zip(attention_backward(dout, q, k, v, out, lse, 64**-0.5), leaves):
        assert torch.allclose(got.float(), leaf.grad.float(), atol=tol, rtol=tol)


def test_cpu_kernel_returns_lse_and_takes_it_back():
    _check_kernel("cpu", torch.float32, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_kernels_return_lse_and_take_it_back(dtype):
    """flash-attn (bf16, when installed) or PyTorch's memory-efficient kernel: unverified until a GPU runs this."""
    _check_kernel("cuda", dtype, 2e-2 if dtype == torch.bfloat16 else 1e-4)


def test_next_transfer_posted_before_current_chunk_computes(monkeypatch):
    """Overlap is a schedule: step s+1's K/V transfer is posted before step s's kernels run (forward and
    backward), and each step's partial dK/dV is posted as soon as it is computed."""
    import itertools

    from vgen.parallel import ring

    events = []

    def log_post(sends, recvs, spec, label, tag):
        if sends or recvs:
            events.append(("kv " if tag == ring.KV_TAG else "dkv ") + label)
        return post(sends, recvs, spec, label, tag)

    def log_kernel(fn):
        def wrapper(*args, **kwargs):
            events.append("kernel")
            return fn(*args, **kwargs)
        return wrapper

    post = ring._post
    monkeypatch.setattr(ring, "_post", log_post)
    monkeypatch.setattr(ring, "attention_forward", log_kernel(ring.attention_forward))
    monkeypatch.setattr(ring, "attention_backward", log_kernel(ring.attention_backward))
    bench.measure_rank("ring", 4, "temporal", (4, 4, 4), heads=2, head_dim=8, rank=1)  # every chunk pair computes
    runs = [k for k, _ in itertools.groupby(events)]  # one step's kernel calls collapse into one entry
    kv, kvb, dkv, K = "kv temporal/fwd", "kv temporal/bwd", "dkv temporal/bwd", "kernel"
    # own chunk, steps 1, 2, 3 (the last two computes are adjacent: nothing left to post between them)
    assert runs == [kv, K, kv, K, kv, K] + [kvb, K, kvb, K, dkv, kvb, K, dkv, K, dkv], runs


@pytest.mark.parametrize("policy", ["selective", "block"])
def test_selective_recomputation_reuses_the_ring_result(monkeypatch, policy):
    """Under selective checkpointing the block's recomputation takes the ring's (out, lse) from the
    checkpoint's storage and runs no ring forward (so sends no K/V); `block` runs it again. A fused kernel
    after the ring (the same op the ring calls inside) still gets its own cached output, and gradients
    match the plain run. A forward without backward frees what was kept with its graph. One ring position,
    so no process group is needed; the bytes on 2 and 4 ranks: tests/test_sp.py::test_selective_checkpointing_sends_nothing_twice."""
    import functools
    import gc
    import weakref

    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    from vgen.models.attention import AttentionCore
    from vgen.parallel import ring
    from vgen.parallel.checkpointing import _SelectivePolicy

    runs, kept = [], []
    ring_forward = ring._ring_forward

    def counting(*args):
        runs.append("recompute" if torch._C._current_graph_task_id() != -1 else "forward")
        out, lse = ring_forward(*args)
        kept.append(weakref.ref(lse))
        return out, lse

    monkeypatch.setattr(ring, "_ring_forward", counting)
    grid = (2, 3, 4)
    core, after = ring.RingCore(AttentionCore("spatial"), ring.RingSpec((0,), 0)), AttentionCore("temporal")

    def block(x, k, v):
        return after(core(x.sin(), k, v, grid) * 2, k, v, grid).cos()

    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 24, 2, 8, generator=g, requires_grad=True) for _ in range(3)]
    ref = block(*inputs)
    ref_grads = torch.autograd.grad(ref.sum(), inputs)
    extra = {}
    if policy == "selective":
        extra["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _SelectivePolicy(False, False))
    runs.clear()
    out = checkpoint(block, *inputs, use_reentrant=False, **extra)
    grads = torch.autograd.grad(out.sum(), inputs)
    assert runs == (["forward"] if policy == "selective" else ["forward", "recompute"])
    assert float((out - ref).detach().abs().max()) <= 1e-6 * float(ref.detach().abs().max())
    for a, b in zip(grads, ref_grads):
        assert float((a - b).abs().max()) <= 1e-6 * float(b.abs().max())

    kept.clear()
    out = checkpoint(block, *inputs, use_reentrant=False, **extra)  # no backward
    del out
    gc.collect()
    assert kept and all(ref() is None for ref in kept)
    with torch.no_grad():
        checkpoint(block, *inputs, use_reentrant=False, **extra)
