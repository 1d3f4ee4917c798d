"""The memory simulator against real CPU allocations, its attention accounting, frame sweep, ZeRO
accounting, SP, and the planner.

The independent measurement: torch.profiler with profile_memory=True records every allocation and free
the c10 CPU allocator makes (kernel workspaces included) as "[memory]" events with signed byte counts;
their running sum over one forward + backward, from a start with weights and batch already allocated, is
the real peak the step added. The simulator sees only dispatcher-level storages of fake tensors, so the
two share no code path.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from vgen.models.attention import sdpa
from vgen.models.dit import VideoDiT
from vgen.models.presets import resolve_preset
from vgen.parallel import memory_sim_sp
from vgen.parallel.checkpointing import apply_memory_policy
from vgen.parallel.memory_sim import FrameSweep, attention_peak_bytes, simulate, sweep, trace_step
from vgen.parallel.planner import CANDIDATES, MemoryBudgetError, plan_memory

torch.set_num_threads(1)
TINY = resolve_preset("tiny", in_channels=4, text_dim=32, attention="sdpa")
SHAPE, TEXT, BATCH = (4, 4, 16, 16), 6, 2  # (C, T, H, W): 256 tokens


def mem_cfg(**kw):
    base = dict(checkpointing="none", ratio=1.0, offload=False, mlp_chunks=1, recompute_mlp=False, offload_min_bytes=1 << 20)
    return SimpleNamespace(**{**base, **kw})


def allocator_peak(prof) -> int:
    """The running sum of a profile's allocation events at its highest."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def cpu_step_peak(mem) -> int:
    """Peak bytes the CPU allocator held during one real forward + backward, above its starting level."""
    torch.manual_seed(0)
    model = VideoDiT(TINY)
    if mem.checkpointing != "none" or mem.mlp_chunks > 1:
        apply_memory_policy(model, mem)
    x, target = torch.randn(BATCH, *SHAPE), torch.randn(BATCH, *SHAPE)
    t, text = torch.rand(BATCH), torch.randn(BATCH, TEXT, 32)
    mask = torch.ones(BATCH, TEXT, dtype=torch.bool)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = (model(x, t, text, mask).float() - target.float()).pow(2).mean()
        loss.backward()
        del loss
    return allocator_peak(prof)


@pytest.mark.parametrize("mem", [mem_cfg(), mem_cfg(checkpointing="block"), mem_cfg(checkpointing="selective"),
                                 mem_cfg(checkpointing="ratio", ratio=0.5, mlp_chunks=4)],
                         ids=["none", "block", "selective", "ratio_chunks"])
def test_simulated_peak_matches_cpu_allocator(mem):
    # float32 traces account attention as the CPU run computes it: torch's fused CPU kernel ("native")
    report = simulate(TINY, mem, SHAPE, TEXT, micro_batch=BATCH, dtype=torch.float32)
    assert report.attention == "native"
    real, sim = cpu_step_peak(mem), report.step_peak_bytes
    assert abs(sim - real) <= 0.05 * real, f"simulated {sim} vs real {real} bytes ({sim / real - 1:+.1%})"


def test_flash_attention_accounting_is_linear_and_math_quadratic():
    B, h, d = 2, 4, 32
    seq = (512, 1024, 2048, 4096)
    flash = [attention_peak_bytes((B, S, h, d), "flash") for S in seq]
    math = [attention_peak_bytes((B, S, h, d), "math") for S in seq]
    # flash: output + fp32 log-sum-exp forward; dq, dk, dv + FlashAttention-2's fp32 workspace backward
    per_token = 4 * B * h * d * 2 + B * h * 4 + B * h * (d + 1) * 4
    assert flash == [per_token * S for S in seq]
    # math: fp32 (B, h, S, S) scores and their softmax: doubling S quadruples the peak, asymptotically
    assert [b / a for a, b in zip(math, math[1:])] == pytest.approx([4, 4, 4], rel=0.1)
    assert math[-1] > 100 * flash[-1]
    # ... as the CPU allocator sees a real float32 attention restricted to the math path
    q, k, v = (torch.randn(B, 512, h, d, requires_grad=True) for _ in range(3))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, sdpa_kernel([SDPBackend.MATH]):
        sdpa(q, k, v).backward(torch.randn(B, 512, h, d))
    real = allocator_peak(prof)
    sim = attention_peak_bytes((B, 512, h, d), "math", dtype=torch.float32)
    assert abs(sim - real) <= 0.05 * real, f"simulated {sim} vs real {real} bytes"
    # the workspace's rows round up to 128 (69 frames of temporal attention pay for 128)
    assert attention_peak_bytes((B, 69, h, d), "flash") - attention_peak_bytes((B, 69, h, d), "native") \
        == B * h * (d + 1) * 4 * 128
    # bf16 (the GPU simulation) defaults to flash, float32 (a CPU run) to the CPU kernel
    assert attention_peak_bytes((B, 512, h, d), "auto") == flash[0]
    assert attention_peak_bytes((B, 512, h, d), "auto", dtype=torch.float32) < 2 * flash[0]


def test_categories_and_zero_accounting():
    plain = simulate(TINY, mem_cfg(), SHAPE, TEXT, micro_batch=BATCH, dtype=torch.float32, zero_stage=0)
    n = sum(p.numel() for p in VideoDiT(TINY).parameters())
    assert plain.by_category["parameters"] == 4 * n  # float32 weights, unsharded
    assert plain.by_category["optimizer"] == 12 * n
    assert plain.peak_bytes == sum(plain.by_category.values())
    sharded = simulate(TINY, mem_cfg(), SHAPE, TEXT, micro_batch=BATCH, dtype=torch.float32, zero_stage=3, world_size=4)
    assert sharded.by_category["parameters"] == n and sharded.by_category["optimizer"] == 3 * n
    block = simulate(TINY, mem_cfg(checkpointing="block"), SHAPE, TEXT, micro_batch=BATCH, dtype=torch.float32, zero_stage=0)
    assert block.by_category["activations"] < 0.3 * plain.by_category["activations"]


def test_offload_moves_block_inputs_off_the_device():
    dit, shape = resolve_preset("tiny", in_channels=4, text_dim=32, depth=6), (4, 16, 32, 32)
    kept = trace_step(dit, mem_cfg(checkpointing="block"), shape, TEXT, micro_batch=BATCH)
    moved = trace_step(dit, mem_cfg(checkpointing="block", offload=True), shape, TEXT, micro_batch=BATCH)
    block_input = BATCH * 4096 * 128 * 2  # (B, N, D) bf16, above the 1 MiB threshold
    assert kept.live_at_backward_start() - moved.live_at_backward_start() == 5 * block_input  # the last stays
    # the smallest threshold also moves nothing else: checkpointed blocks save only their inputs
    tiny = trace_step(dit, mem_cfg(checkpointing="block", offload=True, offload_min_bytes=0), shape, TEXT, micro_batch=BATCH)
    assert tiny.live_at_backward_start() == moved.live_at_backward_start()
    assert moved.report().peak_bytes <= kept.report().peak_bytes


def test_frame_sweep_is_exact():
    mem = mem_cfg(checkpointing="selective", offload=True, mlp_chunks=4, offload_min_bytes=0)
    traces = [trace_step(TINY, mem, (4, T, 8, 8), TEXT) for T in (4, 8, 14)]
    sw = FrameSweep(traces[0], traces[1])
    assert sw.exact_at(traces[2])
    assert sw.evaluate(14).peak_bytes == traces[2].report().peak_bytes
    assert sw.evaluate(14).tokens == 14 * 16


def test_sequence_parallel_real_wrappers_and_stand_ins_agree():
    pytest.importorskip("vgen.parallel.sequence")
    dit = resolve_preset("tiny", in_channels=4, text_dim=32, depth=2)
    one = simulate(dit, mem_cfg(), SHAPE, TEXT, micro_batch=BATCH, world_size=2, sp=1)
    real = simulate(dit, mem_cfg(), SHAPE, TEXT, micro_batch=BATCH, world_size=2, sp=2)
    original = memory_sim_sp.fake_world
    memory_sim_sp.fake_world = lambda world: contextlib.nullcontext(False)  # as if distributed were running
    try:
        stand_in = simulate(dit, mem_cfg(), SHAPE, TEXT, micro_batch=BATCH, world_size=2, sp=2)
    finally:
        memory_sim_sp.fake_world = original
    assert not torch.distributed.is_initialized()
    assert (real.sp_impl, stand_in.sp_impl) == ("fake process group", "stand-ins")
    assert real.local_tokens == stand_in.local_tokens == one.tokens // 2
    assert real.by_category["activations"] < 0.6 * one.by_category["activations"]
    assert abs(stand_in.step_peak_bytes - real.step_peak_bytes) <= 0.1 * real.step_peak_bytes


ZERO_TERMS = None


def planner_cfg(budget_gb, tmp_path_factory=None):
    """GPU terms zeroed (a profile file), so budgets compare with the tensors' peaks."""
    import json
    import tempfile

    global ZERO_TERMS
    if ZERO_TERMS is None:
        ZERO_TERMS = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False).name
        keys = ("context_bytes", "nccl_bytes_per_communicator", "fragmentation", "expandable_fragmentation",
                "offload_pool_blocks")
        with open(ZERO_TERMS, "w") as f:
            json.dump(dict.fromkeys(keys, 0), f)
    memory = SimpleNamespace(checkpointing="auto", policy="auto", budget_gb=budget_gb, offload_min_bytes=0,
                             gpu_profile=ZERO_TERMS)
    return SimpleNamespace(
        model=SimpleNamespace(preset="tiny", hidden=None, depth=2, heads=None, mlp_ratio=None, patch=None),
        data=SimpleNamespace(micro_batch=BATCH),
        parallel=SimpleNamespace(zero_stage=0, sp=SimpleNamespace(degree=1, mode="ulysses"), memory=memory),
    )


def test_planner_picks_the_cheapest_fitting_policy():
    shape = (4, 8, 16, 16)
    lines = []
    plain = plan_memory(planner_cfg(100.0), shape, TEXT, 1, text_dim=32, log=lines.append)
    assert plain.checkpointing == "none" and len(lines) == 2  # one candidate tried, then the choice
    assert plain.report.attention == "flash" and "flash attention" in lines[-1]  # GPU budgets: GPU kernels
    block = simulate(resolve_preset("tiny", in_channels=4, text_dim=32, depth=2), mem_cfg(checkpointing="block"),
                     shape, TEXT, micro_batch=BATCH, zero_stage=0)
    ema = 4 * sum(p.numel() for p in VideoDiT(resolve_preset("tiny", in_channels=4, text_dim=32, depth=2)).parameters())
    budget = ((plain.report.peak_bytes + block.peak_bytes) / 2 + ema) / 1e9  # plain does not fit, block does
    plan = plan_memory(planner_cfg(budget), shape, TEXT, 1, text_dim=32, log=lines.append)
    assert plan.name != "none" and plan.report.device["device"] <= budget * 1e9
    assert plan.settings()["checkpointing"] == plan.checkpointing and plan.settings()["policy"] == "auto"
    assert all("> " in line for line in plan.why[:-1]) and "<=" in plan.why[-1]  # all cheaper ones failed
    names = [c[0] for c in CANDIDATES]
    assert names.index(plan.name) <= names.index("block")


def test_planner_rejects_an_impossible_budget():
    with pytest.raises(MemoryBudgetError, match=r"budget_gb=0.001 GB.*smallest simulated peak.*on the device"):
        plan_memory(planner_cfg(0.001), (4, 4, 8, 8), TEXT, 1, text_dim=32, log=lambda line: None)
    with pytest.raises(ValueError, match="budget_gb must be set"):
        plan_memory(planner_cfg(None), (4, 4, 8, 8), TEXT, 1, text_dim=32)


def _benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "max_seq_len.py"
    spec = importlib.util.spec_from_file_location("max_seq_len", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bisection_finds_the_last_fitting_length_from_any_guess():
    bisect = _benchmark().bisect_frames
    for hi, limit in [(1, 0), (1, 1), (100, 0), (100, 37), (100, 100), (100, 250), (1000, 1)]:
        for guess in (None, 1, limit - 3, limit, limit + 1, limit + 40, hi):
            probes = []
            got = bisect(lambda T: probes.append(T) or T <= limit, 1, hi, guess)
            assert got == min(limit, hi) and all(1 <= T <= hi for T in probes), (hi, limit, guess, got)
            if guess == limit and 1 < limit < hi:
                assert len(probes) <= 3  # lo, the guess, the one above it


def test_simulated_benchmark_writes_a_table(tmp_path, capsys):
    out = tmp_path / "result.json"
    result = _benchmark().main(["--simulate", "model.preset=tiny", "model.depth=2", "--world-size", "2",
                                "--budget-gb", "0.05", "--latent-hw", "16", "16", "--text-len", "8", "--max-frames", "256",
                                "--policies", "plain", "checkpointing", "--out", str(out), "--no-gpu-terms",
                                "--trace-frames", "4", "8", "--jobs", "1", "--check", "1"])
    rows = {(r["policy"], r["sp"]): r for r in result["rows"]}
    assert set(rows) == {("plain", 1), ("checkpointing", 1), ("plain", 2), ("checkpointing", 2)}
    for r in rows.values():
        assert 0 < r["peak_gb"] <= 0.05 and r["tokens"] == r["frames"] * 64  # 16x16 latent, 2x2 patches
    assert abs(rows[("plain", 1)]["full_depth_rel_error"]) < 1e-9  # the full-depth trace at the answer
    assert rows[("checkpointing", 1)]["frames"] > rows[("plain", 1)]["frames"]
    assert rows[("plain", 2)]["frames"] > rows[("plain", 1)]["frames"]
    assert out.exists() and "max tokens per GPU budget" in capsys.readouterr().out
