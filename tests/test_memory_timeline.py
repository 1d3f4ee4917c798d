"""The 3-block timeline laid out for the full depth against full-depth traces, the closed-form longest fit
against bisection of real traces, and the GPU terms. VGEN_FULL=1 runs every policy on the mid-size preset."""

from __future__ import annotations

import json
import os
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from vgen.models.presets import resolve_preset
from vgen.parallel.gpu_memory import GpuProfile, GpuTerms, communicators, load_profile
from vgen.parallel.memory_sim import trace_step
from vgen.parallel.memory_timeline import DepthLayout, DepthSweep, solve_max_frames, trace_blocks

torch.set_num_threads(1)
FULL = os.environ.get("VGEN_FULL") == "1"


def mem_cfg(**kw):
    base = dict(checkpointing="none", ratio=1.0, offload=False, mlp_chunks=1, recompute_mlp=False, offload_min_bytes=0)
    return SimpleNamespace(**{**base, **kw})


POLICIES = {
    "plain": mem_cfg(),
    "block": mem_cfg(checkpointing="block"),
    "selective": mem_cfg(checkpointing="selective", offload=True),
    "block+offload": mem_cfg(checkpointing="block", offload=True),
    "block+offload+chunks": mem_cfg(checkpointing="block", offload=True, mlp_chunks=4),
    "nested+offload+chunks": mem_cfg(checkpointing="nested", offload=True, mlp_chunks=4),
}
TINY = resolve_preset("tiny", in_channels=4, text_dim=32, attention="sdpa", depth=6)
MID = resolve_preset("tiny", in_channels=4, text_dim=32, attention="sdpa", hidden=256, heads=4, depth=8)


def events(trace):
    return Counter((r.start, r.end, n, r.category, r.phase) for r, n in zip(trace.records, trace.sizes))


def check_layout(dit, mem, shape, sp):
    kw = dict(micro_batch=1, world_size=2, sp=sp)
    full = trace_step(dit, mem, shape, 6, **kw)
    k = trace_blocks(mem, dit.depth)
    # offload: first, middle, last offloaded, the offload_keep_last blocks kept on the device
    assert k == (3 + getattr(mem, "offload_keep_last", 1) if mem.offload else 3)
    short = trace_step(dit, mem, shape, 6, depth=k, **kw)
    layout = DepthLayout(short, dit.depth)
    assert Counter(layout.records()) == events(full)  # every allocation and free, at the same op
    other = trace_step(dit, mem, (shape[0], shape[1] // 2, *shape[2:]), 6, depth=k, **kw)
    sweep = DepthSweep(other, short, dit.depth)
    assert sweep.evaluate(shape[1]).peak_bytes == full.report().peak_bytes
    assert sweep.evaluate(shape[1]).by_category == full.report().by_category


@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("sp", [1, 2])
def test_three_blocks_replay_the_full_depth_tiny(name, sp):
    check_layout(TINY, POLICIES[name], (4, 16, 8, 8), sp)


@pytest.mark.parametrize("keep_last", [0, 2])
def test_three_blocks_replay_the_full_depth_keep_last(keep_last):
    check_layout(TINY, mem_cfg(checkpointing="block", offload=True, offload_keep_last=keep_last), (4, 16, 8, 8), 1)


def test_trace_blocks_roles():
    assert trace_blocks(None, 6) == 3 and trace_blocks(mem_cfg(), 2) == 2
    assert trace_blocks(mem_cfg(offload=True, checkpointing="block"), 6) == 4  # offload_keep_last defaults to 1
    assert trace_blocks(mem_cfg(offload=True, checkpointing="block", offload_keep_last=2), 6) == 5
    assert trace_blocks(mem_cfg(offload=True, checkpointing="block", offload_keep_last=2), 5) == 5  # all traced
    assert trace_blocks(mem_cfg(offload=True, checkpointing="block", offload_keep_last=6), 6) == 3  # none offloaded
    assert trace_blocks(mem_cfg(checkpointing="ratio", ratio=0.5), 8) == 8  # blocks differ: trace them all


@pytest.mark.parametrize("name", list(POLICIES) if FULL else ["nested+offload+chunks"])
def test_three_blocks_replay_the_full_depth_mid(name):
    check_layout(MID, POLICIES[name], (4, 16, 16, 16), 2)


def test_closed_form_is_the_last_fit_of_real_traces():
    dit = resolve_preset("tiny", in_channels=4, text_dim=32, attention="sdpa", depth=5)
    mem = POLICIES["block+offload"]
    sim = dict(micro_batch=1, world_size=2, sp=1)

    def peak(T):
        return trace_step(dit, mem, (4, T, 16, 16), 6, **sim).report().peak_bytes

    budget = (peak(40) + peak(41)) / 2
    got = solve_max_frames(dit, mem, (4, 16, 16), 6, budget, 256, None, frames=(8, 16), **sim)
    assert got["frames"] == 40 and got["report"].peak_bytes == peak(40)
    terms = GpuTerms(GpuProfile(context_bytes=1e6, nccl_bytes_per_communicator=0, fragmentation=0.05), world=2)
    got = solve_max_frames(dit, mem, (4, 16, 16), 6, budget, 256, terms, frames=(8, 16), **sim)
    d = got["device"]
    assert d["device"] <= budget and d["reserved"] == pytest.approx(1.05 * got["report"].peak_bytes)
    assert 0 < got["frames"] < 40


def test_gpu_terms_and_profile(tmp_path):
    p = GpuProfile()
    terms = GpuTerms(p, world=8, sp=2, n_params=1_000_000)
    d = terms.device_bytes(10e9, offloaded_per_block=1e9)
    assert communicators(8, 2) == 3 and communicators(8, 8) == 2 and communicators(1, 1) == 0
    assert d["reserved"] == pytest.approx(10e9 * (1 + p.fragmentation))
    assert d["ema"] == 4 * 1_000_000 / 8 and d["nccl"] == 3 * p.nccl_bytes_per_communicator
    assert d["device"] == pytest.approx(d["reserved"] + d["context"] + d["nccl"] + d["ema"] + d["offload_pool"])
    path = tmp_path / "h100.json"
    path.write_text(json.dumps({"profile": {"context_bytes": 5e8, "measured": True}}))
    assert load_profile(path).context_bytes == 5e8 and load_profile(path).measured
    path.write_text(json.dumps({"context_gb": 1}))
    with pytest.raises(ValueError, match=r"h100.json has unknown keys \['context_gb'\]"):
        load_profile(path)


def test_calibrate_dry_run_writes_a_loadable_profile(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "calibrate_memory.py"
    spec = importlib.util.spec_from_file_location("calibrate_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "profile.json"
    result = module.main(["--dry-run", "--out", str(out)])
    assert result["measured_fields"] == [] and not load_profile(out).measured
    assert load_profile(out).context_bytes == GpuProfile().context_bytes
