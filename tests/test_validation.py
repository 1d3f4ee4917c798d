"""Held-out validation: the demo's validation clips are never training clips, val_loss is logged at its
cadence, and a resumed run logs bitwise the validation losses of an uninterrupted one (CPU)."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from e2e_utils import check, launch


def test_demo_validation_set_holds_no_training_clip(tmp_path):
    from vgen.data.demo import _clip_identity, demo_clip_identities, write_demo_val_shards
    from vgen.train.validation import read_val_samples

    data = OmegaConf.create({"num_frames": 4, "frame_stride": 1, "height": 16, "width": 16, "demo_clips": 96,
                             "demo_clips_per_shard": 32, "val_path": str(tmp_path / "val"), "val_clips": 48})
    write_demo_val_shards(data)
    train = demo_clip_identities(96, 4, 16, 16)
    val = [_clip_identity(json.loads(parts["json"])) for _, parts in read_val_samples(str(tmp_path / "val"), 1000)]
    assert len(val) == 48 and len(set(val)) > 40
    assert not set(val) & train
    # at 16 x 16 the clip space is small enough that the redraw is really needed now and then
    from vgen.data.demo import VAL_SEED, _combos, _render_indexed

    params = {"num_frames": 4, "height": 16, "width": 16, "seed": VAL_SEED}
    first_draws = {_clip_identity(_render_indexed(i, c, params)[1]) for i, c in enumerate(_combos(2000, VAL_SEED))}
    assert first_draws & train


@pytest.mark.slow
def test_val_loss_logged_and_bitwise_after_resume(tmp_path):
    from vgen.data.demo import write_demo_shards

    shards, val = tmp_path / "shards", tmp_path / "val"
    write_demo_shards(shards, num_clips=16, clips_per_shard=8, num_frames=4, height=16, width=16)
    write_demo_shards(val, num_clips=6, clips_per_shard=8, num_frames=4, height=16, width=16, seed=7)
    common = [f"data.path={shards}", f"data.val_path={val}", "log.val_every_steps=2", "log.every_steps=3",
              "train.max_steps=5", "checkpoint.every_steps=2", "model.i2v=true", "train.i2v_prob=0.5"]
    full, part = tmp_path / "full", tmp_path / "part"
    check(launch("python", common + [f"run.dir={full}"]))
    check(launch("python", common + [f"run.dir={part}", "train.stop_after_step=2"]))
    check(launch("python", common + [f"run.dir={part}"]))

    def rows(run):
        return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}

    a, b = rows(full), rows(part)
    val_steps = sorted(s for s, r in a.items() if "val_loss" in r)
    assert val_steps == [2, 4, 5]  # every 2 steps and the last, whatever log.every_steps says
    assert sorted(s for s, r in b.items() if "val_loss" in r) == val_steps
    for step in val_steps:
        for key in ("val_loss", "val_loss_t0.9", "val_loss_i2v", "loss"):
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])  # bitwise on CPU
    assert a[2]["val_loss"] != a[4]["val_loss"]  # it moves with the weights
