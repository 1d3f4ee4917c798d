"""Decoding, shard listing, rank splitting, exact resume and damaged-data handling of vgen.data."""

import json
import random
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf

import vgen.data.items as items_mod
from vgen.data.demo import write_demo_shards
from vgen.data.loader import build_loader
from vgen.data.shards import DataError, DataWarning, list_shards
from vgen.data.video import VideoDecodeError, decode_video, encode_video, read_video_file

torch.set_num_threads(1)
COUNTDOWN = "/work/shared/data/countdown-320x240.mp4"


def data_cfg(path, **overrides):
    cfg = dict(kind="videos", path=str(path), num_frames=8, height=32, width=32, frame_stride=1, micro_batch=5,
               make_demo=False, demo_clips=24, demo_clips_per_shard=4)
    return OmegaConf.create({**cfg, **overrides})


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo")
    write_demo_shards(path, num_clips=24, clips_per_shard=4)  # 6 shards
    return path


# ---- decoding ---------------------------------------------------------------------------------------------

def test_decode_real_camera_video():
    data = Path(COUNTDOWN).read_bytes()
    clip = decode_video(data, num_frames=8, height=32, width=48, frame_stride=2)
    assert clip.shape == (3, 8, 32, 48) and clip.dtype == torch.float32
    assert clip.min() >= -1 and clip.max() <= 1 and clip.std() > 0.05
    # at full size no resize happens: the clip is exactly frames 10, 13, 16, 19 of the file
    frames = read_video_file(COUNTDOWN)
    assert frames.shape == (209, 240, 320, 3)
    full = decode_video(data, num_frames=4, height=240, width=320, frame_stride=3, start=10)
    expected = (frames[10:20:3].permute(3, 0, 1, 2).float() / 127.5 - 1)
    assert torch.equal(full, expected)
    # random starts: reproducible from the rng, and not always 0
    a = decode_video(data, 4, 24, 32, rng=random.Random(5))
    assert torch.equal(a, decode_video(data, 4, 24, 32, rng=random.Random(5)))
    starts = [decode_video(data, 4, 24, 32, rng=random.Random(s)) for s in range(3)]
    assert not all(torch.equal(starts[0], s) for s in starts[1:])


def test_resize_scales_shorter_side_then_crops_centre():
    # 32 high x 64 wide: left quarter red, middle half green, right quarter blue
    frames = np.zeros((3, 32, 64, 3), np.uint8)
    frames[:, :, :16] = (255, 0, 0)
    frames[:, :, 16:48] = (0, 255, 0)
    frames[:, :, 48:] = (0, 0, 255)
    clip = decode_video(encode_video(frames, fps=8), num_frames=3, height=16, width=16)
    assert clip.shape == (3, 3, 16, 16)
    # scaled to 16x32, the centre 16 columns are the green band
    mean = clip.mean(dim=(1, 2, 3))
    assert mean[1] > 0.9 and mean[0] < -0.9 and mean[2] < -0.9


def test_decode_errors_say_why():
    with pytest.raises(VideoDecodeError, match="not a video") as info:
        decode_video(b"this is not a video file at all" * 20, 8, 32, 32)
    assert isinstance(info.value, ValueError) and info.value.reason == "not_a_video"
    short = encode_video(np.full((5, 32, 32, 3), 128, np.uint8), fps=8)
    with pytest.raises(VideoDecodeError, match="has 5 frames, needs 8 with stride 1"):
        decode_video(short, 8, 32, 32)
    with pytest.raises(VideoDecodeError, match="has 5 frames, needs 3 with stride 3"):
        decode_video(short, 3, 32, 32, frame_stride=3)
    assert decode_video(short, 3, 32, 32, frame_stride=2).shape == (3, 3, 32, 32)


# ---- shard listing and rank split -------------------------------------------------------------------------

def test_list_shards_forms_and_errors(demo_dir, tmp_path):
    shards = list_shards(demo_dir)
    assert [s.rsplit("/", 1)[1] for s in shards] == [f"demo-{i:06d}.tar" for i in range(6)]
    assert list_shards(shards[2]) == [shards[2]]
    assert list_shards(f"{demo_dir}/demo-{{000001..000003}}.tar") == shards[1:4]
    with pytest.raises(DataError, match=f"data.path={tmp_path}/nope does not exist"):
        list_shards(tmp_path / "nope")
    with pytest.raises(DataError, match=f"data.path={tmp_path} holds no .tar shards"):
        list_shards(tmp_path)
    with pytest.raises(DataError, match="1 of its 2 shards do not exist"):
        list_shards(f"{demo_dir}/demo-{{000005..000006}}.tar")
    with pytest.raises(DataError, match="does not exist"):
        build_loader(data_cfg(tmp_path / "nope"), 0, 1, seed=0)
    with pytest.raises(DataError, match="holds no .tar shards"):
        build_loader(data_cfg(tmp_path), 0, 1, seed=0)
    with pytest.raises(DataError, match="data.kind=latents"):  # video shards hold no latents_meta.json
        build_loader(data_cfg(demo_dir, kind="latents"), 0, 1, seed=0)


def _epoch_keys(loader) -> list[str]:
    """Keys of the global batches that filled in epoch 0, in order."""
    keys = []
    while True:
        batch = next(loader)
        if batch["epoch"] > 0:
            return keys
        keys += batch["key"]


@pytest.mark.parametrize("dp_size", [2, 3])
def test_ranks_read_disjoint_samples_covering_the_set(demo_dir, dp_size):
    # 24 samples, global batch dp_size x 2: each epoch is a whole number of global batches
    per_rank = [_epoch_keys(build_loader(data_cfg(demo_dir, micro_batch=2), r, dp_size, seed=3, prefetch=0))
                for r in range(dp_size)]
    union = [k for keys in per_rank for k in keys]
    assert len(union) == len(set(union)) == 24
    assert set(union) == {f"{i:06d}" for i in range(24)}
    # the next epoch draws the samples in another order
    loader = build_loader(data_cfg(demo_dir, micro_batch=2), 0, dp_size, seed=3, prefetch=0)
    epoch0 = _epoch_keys(loader)
    epoch1 = [k for _ in range(len(epoch0) // 2 - 1) for k in next(loader)["key"]]
    assert epoch0[2:] != epoch1 and set(epoch1) <= set(union)


def _step_keys(cfg, dp_size, grad_accum, steps, seed=3, state=None):
    """Per step: the sample keys of the whole global batch, in slot order, gathered over the ranks."""
    loaders = [build_loader(cfg, r, dp_size, seed=seed, prefetch=0, grad_accum=grad_accum) for r in range(dp_size)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    out = []
    for _ in range(steps):
        slots = {}
        for loader in loaders:
            for _ in range(grad_accum):
                batch = next(loader)
                slots.update(zip(batch["sample_id"], batch["key"]))
        out.append([slots[s] for s in sorted(slots)])
    states = [loader.state_dict() for loader in loaders]
    assert all({**s, "skipped_by_reason": 0, "dp_size": 0} == {**states[0], "skipped_by_reason": 0, "dp_size": 0}
               for s in states), "the position after a step differs between ranks"
    return out, states[0]


def test_global_order_does_not_depend_on_the_data_parallel_size(demo_dir):
    # global batch 12 laid out as (dp_size, grad_accum, micro_batch) in five ways; 5 steps cross an epoch
    layouts = [(1, 1, 12), (2, 1, 6), (3, 1, 4), (4, 1, 3), (2, 2, 3), (6, 2, 1)]
    runs = [_step_keys(data_cfg(demo_dir, micro_batch=mb), dp, accum, steps=5)[0] for dp, accum, mb in layouts]
    assert all(run == runs[0] for run in runs[1:])
    assert len(set(runs[0][0] + runs[0][1])) == 24  # steps 1-2 are the first epoch: every sample once


@pytest.mark.parametrize("new", [(3, 1, 4), (1, 2, 6), (4, 3, 1)])
def test_resume_on_another_data_parallel_size_sees_the_same_samples(demo_dir, new):
    straight, _ = _step_keys(data_cfg(demo_dir, micro_batch=6), 2, 1, steps=6)
    first, state = _step_keys(data_cfg(demo_dir, micro_batch=6), 2, 1, steps=3)
    dp, accum, mb = new
    resumed, _ = _step_keys(data_cfg(demo_dir, micro_batch=mb), dp, accum, steps=3,
                            state=json.loads(json.dumps(state)))
    assert first + resumed == straight


def test_more_ranks_than_shards(demo_dir):
    # the order is by sample, not by shard: 7 ranks share 6 shards
    keys = [next(build_loader(data_cfg(demo_dir, micro_batch=2), r, 7, seed=0, prefetch=0))["key"]
            for r in range(7)]
    flat = [k for ks in keys for k in ks]
    assert len(flat) == len(set(flat)) == 14


# ---- loader: batches and exact resume ---------------------------------------------------------------------

def test_batches_hold_clips_and_captions(demo_dir):
    loader = build_loader(data_cfg(demo_dir, micro_batch=3), 0, 1, seed=0, prefetch=0)
    batch = next(loader)
    assert batch["video"].shape == (3, 3, 8, 32, 32) and batch["video"].dtype == torch.float32
    assert -1 <= batch["video"].min() and batch["video"].max() <= 1
    assert len(batch["caption"]) == len(batch["key"]) == 3
    assert all(c.startswith("a ") and " moving " in c for c in batch["caption"])


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["key"] == y["key"] and x["caption"] == y["caption"]
        assert torch.equal(x["video"], y["video"])


def _wait_until_prefetched(loader, timeout=10.0):
    deadline = time.monotonic() + timeout
    while loader._prefetch and loader._queue.qsize() < loader._prefetch and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("k", [1, 3])
def test_resume_gives_the_same_batches(demo_dir, prefetch, k):
    # rank 1 of 2: 3 shards, 12 samples an epoch, 5 a batch; 4 of 8 frames, so clip starts are random
    cfg = data_cfg(demo_dir, num_frames=4)
    straight = build_loader(cfg, 1, 2, seed=7, prefetch=prefetch)
    reference = [next(straight) for _ in range(k + 3)]
    assert straight.stats()["epoch"] >= 1  # the compared batches cross an epoch boundary
    first = build_loader(cfg, 1, 2, seed=7, prefetch=prefetch)
    for _ in range(k):
        next(first)
        _wait_until_prefetched(first)  # the saved position must be the consumed one, not the read-ahead
    state = json.loads(json.dumps(first.state_dict()))
    resumed = build_loader(cfg, 1, 2, seed=7, prefetch=prefetch)
    resumed.load_state_dict(state)
    _assert_same_batches(reference[k:], [next(resumed) for _ in range(3)])
    assert resumed.stats() == straight.stats()
    for loader in (straight, first, resumed):
        loader.close()


def test_seeking_decodes_nothing_skipped(demo_dir, monkeypatch):
    cfg = data_cfg(demo_dir, micro_batch=2)
    first = build_loader(cfg, 0, 1, seed=0, prefetch=0)
    for _ in range(7):
        next(first)
    state, expected = first.state_dict(), next(first)["key"]
    calls = []
    real = items_mod.decode_video
    monkeypatch.setattr(items_mod, "decode_video", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    resumed = build_loader(cfg, 0, 1, seed=0, prefetch=0)
    resumed.load_state_dict(state)
    assert next(resumed)["key"] == expected
    assert len(calls) == 2  # the 14 samples before the position were not decoded


def test_state_from_another_data_set_or_seed_restarts_its_epoch(demo_dir):
    loader = build_loader(data_cfg(demo_dir), 0, 2, seed=0, prefetch=0)
    for _ in range(7):
        next(loader)
    state = loader.state_dict()
    assert state["epoch"] >= 1
    other = build_loader(data_cfg(demo_dir), 0, 2, seed=1, prefetch=0)
    with pytest.warns(DataWarning, match="another data set"):
        other.load_state_dict(state)
    fresh = build_loader(data_cfg(demo_dir), 0, 2, seed=1, prefetch=0)
    fresh._maker.order.epoch = state["epoch"]
    assert next(other)["key"] == next(fresh)["key"]


# ---- damaged data -----------------------------------------------------------------------------------------

def _write_tar(path, samples):
    with wds.TarWriter(str(path), mtime=0) as sink:
        for sample in samples:
            sink.write(sample)


def _damaged_set(demo_dir, tmp_path) -> set[str]:
    """A good shard, a shard of bad samples and a truncated shard; returns the readable keys."""
    good = tmp_path / "a-good.tar"
    shutil.copy(list_shards(demo_dir)[0], good)  # samples 000000..000003
    clip = encode_video(np.full((8, 32, 32, 3), 90, np.uint8), fps=8)
    short = encode_video(np.full((3, 32, 32, 3), 90, np.uint8), fps=8)
    _write_tar(tmp_path / "b-bad.tar", [
        {"__key__": "bad-ok", "mp4": clip, "txt": "a fine clip"},
        {"__key__": "bad-garbage", "mp4": b"\x00garbage" * 50, "txt": "garbage"},
        {"__key__": "bad-nocaption", "mp4": clip},
        {"__key__": "bad-short", "mp4": short, "txt": "too short"},
        {"__key__": "bad-garbage2", "mp4": b"more garbage" * 30, "txt": "garbage"},
    ])
    # a shard (samples 000008..000015) cut off inside 000013.mp4: the 5 whole samples before it are read,
    # 000013 (only its .json survived) is not
    data = write_demo_shards(tmp_path / "src", num_clips=16, clips_per_shard=8, seed=5)[1].read_bytes()
    offset = data.index(b"000013.mp4")
    (tmp_path / "c-truncated.tar").write_bytes(data[:offset + 1200])
    shutil.rmtree(tmp_path / "src")
    return {f"{i:06d}" for i in range(4)} | {"bad-ok"} | {f"{i:06d}" for i in range(8, 13)}


def test_bad_samples_are_replaced_and_truncated_shards_read_to_the_damage(demo_dir, tmp_path):
    expected = _damaged_set(demo_dir, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # our once-per-shard rule, not Python's dedup, must do the work
        loader = build_loader(data_cfg(tmp_path, micro_batch=1), 0, 1, seed=0, prefetch=0)
        # the index holds the 4 + 5 + 5 readable-by-header samples; one epoch = 14 slots
        keys = [next(loader)["key"][0] for _ in range(14)]
    # every slot is filled with a readable sample; the 4 bad ones were replaced by readable ones
    assert set(keys) <= expected and len(set(keys)) >= len(expected) - 4
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert len(messages) == 2, messages
    assert any("b-bad.tar" in m for m in messages) and any("c-truncated.tar" in m for m in messages)
    stats = loader.stats()
    # the truncated shard counted once, at indexing; each bad sample each time its slot comes (once an epoch),
    # plus any time it was drawn as a stand-in
    assert stats["skipped_by_reason"]["corrupt_tar"] == 1
    for reason, count in {"not_a_video": 2, "missing_caption": 1, "too_few_frames": 1}.items():
        assert count <= stats["skipped_by_reason"][reason] <= 3 * count, stats
    assert stats["skipped"] == sum(stats["skipped_by_reason"].values())


def test_resume_over_damaged_data_keeps_batches_and_counts(demo_dir, tmp_path):
    _damaged_set(demo_dir, tmp_path)
    cfg = data_cfg(tmp_path, micro_batch=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        straight = build_loader(cfg, 0, 1, seed=1, prefetch=2)
        reference = [next(straight) for _ in range(10)]
        for k in (3, 6):
            first = build_loader(cfg, 0, 1, seed=1, prefetch=2)
            for _ in range(k):
                next(first)
                _wait_until_prefetched(first)
            state = first.state_dict()
            resumed = build_loader(cfg, 0, 1, seed=1, prefetch=2)
            resumed.load_state_dict(json.loads(json.dumps(state)))
            _assert_same_batches(reference[k:], [next(resumed) for _ in range(10 - k)])
            assert resumed.stats() == straight.stats()
            first.close(), resumed.close()
    assert straight.stats()["skipped"] > 1
    straight.close()


def test_data_with_nothing_decodable_fails_instead_of_spinning(tmp_path):
    _write_tar(tmp_path / "junk.tar", [{"__key__": f"{i}", "mp4": b"junk" * 40, "txt": "x"} for i in range(3)])
    loader = build_loader(data_cfg(tmp_path, micro_batch=1), 0, 1, seed=0, prefetch=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        with pytest.raises(DataError, match="no decodable sample"):
            next(loader)
