"""Activation offload: the last block stays on the device, one host arena serves every length, reloads
land in two device buffers, and a plan that needs too much pinned memory fails naming the setting."""

from __future__ import annotations

import copy

import pytest
import torch

from test_memory import LATENT, TEXT, batch, loss_and_grads, mem_cfg, rel_err, tiny_model
from vgen.parallel.checkpointing import apply_memory_policy
from vgen.parallel.offload import OffloadHostMemoryError, _Packed, reserve_offload_arena

BLOCK_INPUT = LATENT[0] * 64 * 128 * 4  # one block input (B, N, D) float32 at LATENT


def sized_batch(frames: int, seed: int = 1):
    x, t, text, mask, target = batch(seed)
    return x[:, :, :1].repeat(1, 1, frames, 1, 1), t, text, mask, target[:, :, :1].repeat(1, 1, frames, 1, 1)


def offloaded(**kw):
    model = apply_memory_policy(tiny_model(), mem_cfg(checkpointing="block", offload=True, **kw))
    return model, model.memory_offloader


@pytest.mark.parametrize("keep_last", [1, 2])
def test_last_blocks_are_not_offloaded(keep_last):
    model, off = offloaded(offload_keep_last=keep_last)
    depth = len(model.blocks)
    loss_and_grads(model, batch())
    assert off.offloaded_bytes == (depth - keep_last) * BLOCK_INPUT
    assert len(off.plans) == depth - keep_last
    metrics = off.step_metrics()
    assert metrics["offload_d2h_bytes"] == metrics["offload_h2d_bytes"] == (depth - keep_last) * BLOCK_INPUT
    assert "offload_stall_ms" not in metrics  # timed with CUDA events, on GPU only


def test_offload_gives_the_plain_gradients_with_reuse_across_steps():
    ref_loss, ref_grads = loss_and_grads(tiny_model(), batch())
    model, off = offloaded(offload_keep_last=0)  # every block offloaded: both reload buffers take turns
    for _ in range(2):  # the second step reuses the arena and the reload buffers the first one filled
        loss, grads = loss_and_grads(model, batch())
        assert rel_err(loss, ref_loss) <= 1e-6
        assert max(rel_err(grads[n], g) for n, g in ref_grads.items() if g.abs().sum() > 0) <= 1e-6


def test_reloads_land_in_two_device_buffers():
    model, off = offloaded(offload_keep_last=0)
    seen = set()
    unpack = off._unpack

    def spy(item):
        t = unpack(item)
        if isinstance(item, _Packed):
            seen.add(t.untyped_storage().data_ptr())
        return t

    off._unpack = spy  # block_scope binds the hook at each block's entry
    loss_and_grads(model, batch())
    assert len(model.blocks) >= 3 and len(seen) == 2, seen
    assert {b.untyped_storage().data_ptr() for b in off.reload.buffers} == seen


def test_planned_arena_does_not_grow_across_lengths():
    model, off = offloaded()
    longest = (LATENT[1], 8, LATENT[3], LATENT[4])
    reserve_offload_arena(model, longest, LATENT[0], 1, torch.device("cpu"))
    capacity, allocations = off.pool.capacity, off.pool.allocations
    assert capacity == (len(model.blocks) - 1) * 2 * BLOCK_INPUT and allocations == 1
    ref = tiny_model()
    for frames in (8, 2, 4):  # three lengths, the longest first and last below it
        data = sized_batch(frames)
        loss, grads = loss_and_grads(model, data)
        ref_loss, ref_grads = loss_and_grads(ref, data)
        assert rel_err(loss, ref_loss) <= 1e-6
        assert max(rel_err(grads[n], g) for n, g in ref_grads.items() if g.abs().sum() > 0) <= 1e-6
        assert (off.pool.capacity, off.pool.allocations, off.pool.overflow_bytes) == (capacity, allocations, 0)
    assert off.pool.live == 0  # every region came back


def test_unplanned_arena_sizes_itself_once():
    model, off = offloaded()
    loss_and_grads(model, batch())  # no plan: the first step uses one-off buffers, then the arena grows once
    after_first = off.pool.allocations
    loss_and_grads(model, batch())
    assert off.pool.capacity == (len(model.blocks) - 1) * BLOCK_INPUT
    assert off.pool.allocations == after_first + 1
    loss_and_grads(model, sized_batch(2))  # a shorter length fits
    assert off.pool.allocations == after_first + 1


def test_offload_keeps_small_tensors():
    model, off = offloaded(offload_min_bytes=1 << 30)
    loss_and_grads(model, batch())
    assert off.offloaded_bytes == 0


def test_over_budget_plan_names_the_setting():
    model, off = offloaded(offload_host_fraction=1e-9)  # a few bytes of a host's RAM
    with pytest.raises(OffloadHostMemoryError, match=r"parallel\.memory\.offload"):
        reserve_offload_arena(model, (LATENT[1], 8, LATENT[3], LATENT[4]), LATENT[0], 1, torch.device("cpu"))
    with pytest.raises(OffloadHostMemoryError, match="offload_host_fraction"):  # unplanned: at the first copy
        loss_and_grads(model, batch())


def test_deepcopy_gets_its_own_offloader():
    model, off = offloaded()
    clone = copy.deepcopy(model)
    assert clone.memory_offloader is not off
    assert clone.blocks[0].forward.offloader is clone.memory_offloader


@pytest.mark.slow
def test_training_logs_offload_and_refuses_an_over_budget_plan(tmp_path):
    """launch/train.py: offload figures per step in metrics.jsonl; a plan needing more pinned memory than
    parallel.memory.offload_host_fraction allows exits with status 2 and names the setting, before step 1."""
    import json

    from e2e_utils import check, launch
    from vgen.data.demo import write_demo_shards

    shards = tmp_path / "shards"
    write_demo_shards(shards, num_clips=8, clips_per_shard=8, num_frames=4, height=16, width=16)
    common = [f"data.path={shards}", "train.max_steps=2", "checkpoint.every_steps=0", "parallel.memory.checkpointing=block",
              "parallel.memory.offload=true", "parallel.memory.offload_min_bytes=0", "model.depth=3"]
    check(launch("python", common + [f"run.dir={tmp_path / 'ok'}"]))
    rows = [json.loads(line) for line in (tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:  # two of the three blocks go to the host and come back, every step
        assert r["offload_d2h_bytes"] == r["offload_h2d_bytes"] > 0
    bad = launch("python", common + [f"run.dir={tmp_path / 'bad'}", "parallel.memory.offload_host_fraction=1e-12"])
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "parallel.memory.offload" in bad.stderr and "offload_host_fraction" in bad.stderr
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()
