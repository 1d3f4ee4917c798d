"""Sequence parallelism: every mode on 2 and 4 CPU gloo ranks against the single-process model (forward
output and every parameter gradient), even and uneven token/frame counts, the per-shard loss, the
trainer's loss-scale contract, the communication byte counts, switch's overlap schedule, what selective
checkpointing re-sends, the per-rank rows of the stem, and the start-up errors of bad settings.

Two spawns in all (one per world size), each running its cases in a loop; the 4-rank spawn includes
dp = 2 x sp = 2 layouts, so ring peers and group offsets are exercised with global ranks != SP ranks.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sp_utils import read_results, sp_worker, spawn, tiny_model

TOL = 1e-5
DEPTH, FP32 = 2, 4


def _case(mode, degree, frames, hw, ulysses_degree=1, batch=2, **extra):
    return dict(mode=mode, degree=degree, ulysses_degree=ulysses_degree, frames=frames, hw=hw, batch=batch, **extra)


# (frames, (h, w) tokens): 64 tokens; 45 (odd, 5 frames); 6 tokens in 2 frames, so on 4 ranks the last
# shard is pure padding, frames straddle shards, and switch has fewer frames than ranks (Ulysses, logged);
# 12 tokens in 4 frames of 3 positions: on 4 ranks switch leaves one rank without positions
EVEN, UNEVEN, FEW, THIN = (4, (4, 4)), (5, (3, 3)), (2, (1, 3)), (4, (1, 3))
CASES = {
    2: [_case(m, 2, *shape, ulysses_degree=u) for m, u in [("ulysses", 1), ("ring", 1), ("switch", 1), ("hybrid", 1)] for shape in (EVEN, UNEVEN)]
    + [_case("switch", 2, *EVEN, broken=True)]
    + [_case(m, 2, *UNEVEN, shard_loss=True) for m in ("ulysses", "switch")]
    + [_case("switch", 2, *UNEVEN, checkpointing=c, trace=True) for c in ("none", "selective", "block", "nested")]
    + [_case("ulysses", 2, *EVEN, checkpointing=c) for c in ("selective", "block")]
    + [_case("ring", 2, *UNEVEN, checkpointing=c) for c in ("none", "selective", "block")],
    4: [_case(m, 4, *shape, ulysses_degree=2) for m in ("ulysses", "ring", "hybrid", "switch") for shape in (EVEN, UNEVEN)]
    + [_case(m, 4, *FEW, ulysses_degree=2) for m in ("ulysses", "ring", "hybrid", "switch")]
    + [_case("switch", 4, *THIN)]
    + [_case("ring", 2, *UNEVEN), _case("switch", 2, *UNEVEN), _case("hybrid", 2, *EVEN, ulysses_degree=2)]
    + [_case("switch", 4, *EVEN, broken=True)]
    + [_case(m, 4, *UNEVEN, ulysses_degree=2, shard_loss=True) for m in ("ring", "hybrid", "switch")]
    + [_case("switch", 4, *UNEVEN, checkpointing="selective", trace=True), _case("ulysses", 4, *EVEN, checkpointing="selective")]
    + [_case("hybrid", 4, *UNEVEN, ulysses_degree=2, checkpointing=c) for c in ("none", "selective", "block")],
}


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def results(request, tmp_path_factory):
    world = request.param
    out_dir = str(tmp_path_factory.mktemp(f"sp{world}"))
    spawn(sp_worker, world, CASES[world], out_dir)
    return [r for rank_results in read_results(out_dir, world) for r in rank_results]


def _label(case) -> str:
    extra = "".join(f" {k}={case[k]}" for k in ("shard_loss", "checkpointing") if k in case)
    return f"{case['mode']}(degree={case['degree']}, u={case['ulysses_degree']}) T={case['frames']} hw={case['hw']}{extra}"


@pytest.mark.slow
def test_matches_single_process(results):
    checked = [r for r in results if not r["case"].get("broken")]
    assert checked
    for r in checked:
        label = _label(r["case"])
        # the output, or with shard_loss (no gathered output) the loss
        assert r["out"] <= TOL, f"{label}: forward rel err {r['out']:.2e}"
        assert r["sharded_output"] == bool(r["case"].get("shard_loss")), label
        assert r["grad_sp_sum"] <= TOL, f"{label}: SP-summed gradient rel err {r['grad_sp_sum']:.2e}"
        # the trainer's contract: loss * sp_loss_scale, gradients averaged over the whole world
        assert r["grad_world_mean"] <= TOL, f"{label}: world-mean gradient rel err {r['grad_world_mean']:.2e}"
        assert r["smallest_ref_grad"] > 1e-3, f"{label}: a reference gradient is ~0, the comparison is vacuous"


@pytest.mark.slow
def test_negative_control_fails(results):
    """Dropping switch's temporal all-to-all must break the comparison, or the test above proves nothing."""
    broken = [r for r in results if r["case"].get("broken")]
    assert broken
    for r in broken:
        assert r["out"] > 1e-2 and r["grad_sp_sum"] > 1e-2


def _switch_expected(case: dict, rank: int) -> int:
    """Bytes one switch rank sends per block in one direction: its frames at the others' positions (h),
    then all frames of its positions to the others (the temporal output). fp32."""
    from vgen.parallel.comm import even_bounds

    n, T, (h, w) = case["degree"], case["frames"], case["hw"]
    P, row = h * w, case["batch"] * 64 * FP32  # hidden 64
    fb, pb = even_bounds(T, n), even_bounds(P, n)
    frames, positions = fb[rank + 1] - fb[rank], pb[rank + 1] - pb[rank]
    return row * (frames * (P - positions) + positions * (T - frames))


def _expected(case: dict, elems: int, rank: int) -> dict[str, int]:
    """Bytes one rank sends per attention kind over the model (fp32, depth 2). `elems` = B * N_local * D."""
    n, u, act = case["degree"], case["ulysses_degree"], elems * FP32
    mode = case["mode"]
    if mode == "switch" and case["frames"] >= n:
        per = DEPTH * _switch_expected(case, rank)
        return {"temporal/fwd": per, "temporal/bwd": per}
    if mode in ("ulysses", "switch") or (mode == "hybrid" and u == n):
        per = DEPTH * 4 * act * (n - 1) // n
        return {f"{k}/{d}": per for k in ("spatial", "temporal") for d in ("fwd", "bwd")}
    u = u if mode == "hybrid" else 1
    r = n // u
    a2a = DEPTH * 4 * act * (u - 1) // u
    # ring over whole-frame chunks (EVEN): spatial K/V stay home; temporal K/V go to the r - 1 other chunks,
    # twice (forward, backward), and each partial dK/dV goes straight back to its owner
    kv = DEPTH * 2 * act * (r - 1)
    volumes = {"spatial/fwd": a2a, "spatial/bwd": a2a, "temporal/fwd": a2a + kv, "temporal/bwd": a2a + 2 * kv}
    return {k: v for k, v in volumes.items() if v}


def _plain(r) -> bool:
    return not (r["case"].get("broken") or r["case"].get("checkpointing") or r["case"].get("shard_loss"))


@pytest.mark.slow
def test_bytes_match_formulas(results):
    """The counter sees the real collectives: per-rank bytes equal the analytic volume of each mode, and
    the counter agrees with the bytes the all-to-all ops themselves were handed (OpRecorder)."""
    for r in results:
        case = r["case"]
        if not _plain(r):
            continue
        if case["mode"] in ("ring", "hybrid") and (case["frames"], tuple(case["hw"])) != EVEN:
            continue  # ring/hybrid at every layout, token by token: tests/test_sp_ring.py::test_bytes_are_minimal
        sent = {k: v for k, v in r["bytes"].items() if not k.startswith("seq_out")}
        assert sent == _expected(case, r["local_elems"], r["rank"]), _label(case)
        if case["mode"] in ("ulysses", "switch"):  # ring's P2P transfers are not all-to-alls
            fwd = sum(v for k, v in sent.items() if k.endswith("/fwd"))
            bwd = sum(v for k, v in sent.items() if k.endswith("/bwd"))
            assert r["wire"] == {"forward": fwd, "backward": bwd}, _label(case)


@pytest.mark.slow
def test_switch_moves_two_activations(results):
    """Switch: forward bytes per block per rank <= 2 activations of the local shard, and a quarter of
    Ulysses' (q, k, v and output of two attentions = 8 activations against h and the temporal output)."""
    for r in results:
        if r["case"]["mode"] == "switch" and _plain(r) and r["case"]["frames"] >= r["case"]["degree"]:
            assert r["bytes"]["temporal/fwd"] / DEPTH <= 2 * r["local_elems"] * FP32, _label(r["case"])
    by_mode = {r["case"]["mode"]: r for r in results if (r["case"]["frames"], tuple(r["case"]["hw"])) == EVEN and _plain(r)}
    core = {m: sum(v for k, v in r["bytes"].items() if k.endswith("/fwd") and not k.startswith("seq_out")) for m, r in by_mode.items()}
    assert core["switch"] * 4 == core["ulysses"]


def _by_checkpointing(results, mode):
    return {(r["case"]["checkpointing"], r["rank"]): r for r in results if r["case"].get("checkpointing") and r["case"]["mode"] == mode}


@pytest.mark.slow
def test_switch_exchange_overlaps_spatial_and_cross_attention(results):
    """Schedule of every block's forward: the exchange of h is posted, spatial and cross-attention run,
    and only then is it waited for (the temporal attention follows); then the output goes back. Under
    selective checkpointing the same order holds in forward, and backward's recomputation sends nothing."""
    runs = _by_checkpointing(results, "switch")
    assert runs
    block = [("all_to_all_single", "forward"), ("_scaled_dot_product_flash_attention_for_cpu", "forward"),
             ("_scaled_dot_product_flash_attention_for_cpu", "forward"), ("wait_tensor", "forward"),
             ("_scaled_dot_product_flash_attention_for_cpu", "forward"), ("all_to_all_single", "forward"),
             ("wait_tensor", "forward")]
    for (policy, rank), r in runs.items():
        if policy == "nested":  # runs attention in group slices: more kernel calls, same order
            continue
        fwd = [tuple(op) for op in r["ops"] if op[1] == "forward"]
        assert fwd == block * DEPTH, (policy, rank, fwd)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["switch", "ulysses", "ring", "hybrid"])
def test_selective_checkpointing_sends_nothing_twice(results, mode):
    """Backward bytes handed to all-to-alls: selective == the gradients' own exchanges; block and nested
    re-send the forward's (and the counter names them /recompute). Every policy stays exact. Ring and
    hybrid (ring P2P, counted by vgen/parallel/ring.py's _post): selective sends exactly what no
    checkpointing sends, label by label; block re-sends at least the forward's K/V under /recompute."""
    runs = _by_checkpointing(results, mode)
    if not runs:
        pytest.skip(f"no {mode} checkpointing case at this world size")
    if mode in ("ring", "hybrid"):
        for (policy, rank), r in runs.items():
            assert r["out"] <= TOL and r["grad_sp_sum"] <= TOL, (mode, policy, rank)
            recompute = sum(v for k, v in r["bytes"].items() if k.endswith("/recompute"))
            fwd = sum(v for k, v in r["bytes"].items() if k.endswith("/fwd") and not k.startswith("seq_out"))
            if policy == "block":
                assert recompute >= fwd > 0, (mode, rank, r["bytes"])
            elif policy == "selective":
                assert recompute == 0 and r["bytes"] == runs["none", rank]["bytes"], (mode, rank, r["bytes"])
                assert r["wire"] == runs["none", rank]["wire"], (mode, rank)  # hybrid's all-to-alls
        return
    for (policy, rank), r in runs.items():
        assert r["out"] <= TOL and r["grad_sp_sum"] <= TOL, (mode, policy)
        bwd = sum(v for k, v in r["bytes"].items() if k.endswith("/bwd"))
        recompute = sum(v for k, v in r["bytes"].items() if k.endswith("/recompute"))
        fwd = sum(v for k, v in r["bytes"].items() if k.endswith("/fwd") and not k.startswith("seq_out"))
        if policy in ("block", "nested"):  # nested may recompute an attention layer's collectives twice
            assert recompute >= fwd > 0 and r["wire"]["backward"] == bwd + recompute, (mode, policy, rank)
        else:
            assert recompute == 0 and r["wire"]["backward"] == bwd, (mode, policy, rank)
    assert any(policy == "selective" for policy, _ in runs)
    if ("none", 0) in runs:
        assert runs["selective", 0]["wire"] == runs["none", 0]["wire"]


@pytest.mark.slow
def test_stem_is_local(results):
    """Patch-embedding output, its gradient and the RoPE tables hold this rank's tokens only: N/sp rows
    (rounded up to a token, or to a frame for switch), never N. Shapes only; tests/test_sp_stem.py measures
    the bytes every op of the stem allocates."""
    import math

    from vgen.parallel.comm import shard_plan

    for r in results:
        case = r["case"]
        if case.get("broken"):
            continue
        grid = (case["frames"], *case["hw"])
        n, N = case["degree"], math.prod(grid)
        plan = shard_plan(grid, n, case["mode"])
        rows = plan.size(r["rank"])
        assert r["stem"] == {"embed": rows, "embed_grad": rows, "rope": rows}, _label(case)
        bound = -(-grid[0] // n) * grid[1] * grid[2] if plan.by_frames else -(-N // n)
        assert rows <= bound < N, _label(case)


# ---- tier 1: settings and layout arithmetic, no processes ------------------------------------------------


def _sp(mode="ulysses", degree=4, ulysses_degree=1):
    return SimpleNamespace(mode=mode, degree=degree, ulysses_degree=ulysses_degree)


@pytest.mark.parametrize(
    "cfg, world, setting",
    [
        (_sp(mode="zigzag"), 4, "parallel.sp.mode"),
        (_sp(degree=3), 4, "parallel.sp.degree"),
        (_sp(degree=0), 4, "parallel.sp.degree"),
        (_sp(mode="hybrid", degree=4, ulysses_degree=3), 8, "parallel.sp.ulysses_degree"),
    ],
)
def test_bad_settings_name_the_setting(cfg, world, setting):
    from vgen.parallel.topology import sp_layout

    with pytest.raises(ValueError, match=setting.replace(".", r"\.")):
        sp_layout(cfg, world)


def test_layout_degrees():
    from vgen.parallel.topology import sp_layout

    assert sp_layout(_sp("ulysses", 4), 8) == (4, 1)
    assert sp_layout(_sp("ring", 4), 8) == (1, 4)
    assert sp_layout(_sp("hybrid", 4, 2), 8) == (2, 2)
    assert sp_layout(_sp("switch", 2), 8) == (2, 1)


def test_heads_must_split_over_ulysses():
    from vgen.parallel.sequence import apply_sequence_parallel
    from vgen.parallel.topology import Topology, check_heads

    with pytest.raises(ValueError, match="model.heads=6"):
        check_heads(6, "hybrid", 4)
    check_heads(6, "switch", 4)  # switch scatters positions, not heads
    check_heads(6, "ring", 1)
    topo = Topology(world_size=4, rank=0, sp_size=4, sp_mode="ulysses", ulysses_size=4)
    with pytest.raises(ValueError, match="model.heads=2"):
        apply_sequence_parallel(tiny_model(heads=2), topo, _sp("ulysses", 4))


def test_switch_fallback_needs_heads_to_split():
    from vgen.models.attention import AttentionCore
    from vgen.parallel.switch import SwitchCore

    core = SwitchCore(AttentionCore("temporal"), group=None, sp_size=4, index=0)
    q = torch.zeros(1, 4, 2, 8)  # 2 heads, 2 frames < degree 4: Ulysses fallback impossible
    with pytest.raises(ValueError, match="parallel.sp.mode=switch"):
        core(q, q, q, (2, 2, 2))


def test_group_ranks():
    from vgen.parallel.topology import group_ranks

    g = group_ranks(8, 4, 2)
    assert g["sp"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert g["dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert g["ulysses"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g["ring"] == [[0, 2], [1, 3], [4, 6], [5, 7]]


def test_shard_plan_pads_tokens_or_frames():
    from vgen.parallel.comm import shard_plan

    p = shard_plan((5, 3, 3), 4, "ulysses")
    assert (p.tokens, p.local, p.padded, p.by_frames) == (45, 12, 48, False)
    p = shard_plan((5, 3, 3), 4, "switch")  # uneven frames, no padding: 2, 1, 1, 1
    assert (p.frame_bounds, p.by_frames, [p.size(i) for i in range(4)]) == ((0, 2, 3, 4, 5), True, [18, 9, 9, 9])
    assert [p.start(i) for i in range(4)] == [0, 18, 27, 36] and p.real(3) == 9
    assert not shard_plan((3, 3, 3), 4, "switch").by_frames  # fewer frames than ranks: token shards


# ---- the real trainer: DeepSpeed (ZeRO-2, world-wide averaging) with loss * sp_size -----------------------


@pytest.mark.slow
def test_deepspeed_sp_run_matches_single_process(tmp_path):
    """`deepspeed --num_gpus 2` with sp.degree=2 (dp = 1) against plain `python` on one rank: same data,
    same draws, so every step's loss and gradient norm must agree. Ring mode: custom autograd and P2P."""
    import json

    from e2e_utils import check, launch

    from vgen.data.demo import write_demo_shards

    write_demo_shards(tmp_path / "shards", num_clips=8, clips_per_shard=8, num_frames=4, height=16, width=16)
    common = [f"data.path={tmp_path / 'shards'}", "train.max_steps=3", "checkpoint.every_steps=0", "parallel.zero_stage=2"]
    check(launch("python", common + [f"run.dir={tmp_path / 'one'}"]))
    check(launch("deepspeed", common + [f"run.dir={tmp_path / 'sp'}", "parallel.sp.degree=2", "parallel.sp.mode=ring"]))
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()] for name in ("one", "sp")}
    assert len(rows["sp"]) == len(rows["one"]) == 3
    for a, b in zip(rows["sp"], rows["one"]):
        for key in ("loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= TOL * abs(b[key]), f"step {b['step']} {key}: sp {a[key]} vs one rank {b[key]}"


def test_rope_rows_are_rows_of_the_full_table():
    """A rank's RoPE rows (its token range, padding rows as the identity; switch's (frame, position) rows)
    equal the same rows of the full table, and are cached per grid."""
    from vgen.models.rope import rope_tables

    grid, d = (5, 3, 3), 16
    cos, sin = rope_tables(grid, d)
    c, s = rope_tables(grid, d, rows=("tokens", 36, 48))  # the last of 4 shards of 12: 9 real, 3 padding
    assert torch.equal(c[:9], cos[36:]) and torch.equal(s[:9], sin[36:])
    assert torch.equal(c[9:], torch.ones_like(c[9:])) and torch.equal(s[9:], torch.zeros_like(s[9:]))
    c, s = rope_tables(grid, d, rows=("positions", 3, 6))  # every frame's positions 3..5
    index = torch.tensor([t * 9 + p for t in range(5) for p in range(3, 6)])
    assert torch.equal(c, cos[index]) and torch.equal(s, sin[index])
    assert rope_tables(grid, d, rows=("positions", 3, 6))[0] is c
