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

import vgen.data.loader as loader_mod
from vgen.data.demo import write_demo_shards
from vgen.data.loader import build_loader
from vgen.data.shards import DataError, DataWarning, ShardStream, list_shards
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


def _one_epoch_keys(stream: ShardStream) -> list[str]:
    keys = []
    for sample in stream:
        if sample.epoch > 0:
            return keys
        keys.append(sample.key)


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


@pytest.mark.parametrize("dp_size", [2, 3])
def test_ranks_read_disjoint_samples_covering_the_set(demo_dir, dp_size):
    shards = list_shards(demo_dir)
    per_rank = [_one_epoch_keys(ShardStream(shards, r, dp_size, seed=3, data_path=str(demo_dir)))
                for r in range(dp_size)]
    union = [k for keys in per_rank for k in keys]
    assert len(union) == len(set(union)) == 24
    assert set(union) == {f"{i:06d}" for i in range(24)}
    # the next epoch reads the shards (and the samples in them) in another order
    stream = ShardStream(shards, 0, dp_size, seed=3, data_path=str(demo_dir))
    epoch0 = _one_epoch_keys(stream)
    stream.load_state_dict({**stream.state_dict(), "epoch": 1, "shard_cursor": 0, "sample_cursor": 0})
    epoch1 = _one_epoch_keys(stream)
    assert epoch0 != epoch1


def test_too_few_shards_for_the_ranks(demo_dir):
    with pytest.raises(DataError, match=r"data.path=.* has 6 shards but dp_size=7"):
        build_loader(data_cfg(demo_dir), dp_rank=0, dp_size=7, seed=0)


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
    real = loader_mod.decode_video
    monkeypatch.setattr(loader_mod, "decode_video", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    resumed = build_loader(cfg, 0, 1, seed=0, prefetch=0)
    resumed.load_state_dict(state)
    assert next(resumed)["key"] == expected
    assert len(calls) == 2  # the 14 samples before the position were not decoded


def test_state_from_another_layout_restarts_its_epoch(demo_dir):
    loader = build_loader(data_cfg(demo_dir), 0, 2, seed=0, prefetch=0)
    state = {**loader.state_dict(), "epoch": 3, "shard_cursor": 1, "sample_cursor": 2, "dp_size": 3}
    with pytest.warns(DataWarning, match="another layout"):
        loader.load_state_dict(state)
    assert (loader.state_dict()["epoch"], loader.state_dict()["shard_cursor"]) == (3, 0)


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


def test_bad_samples_and_truncated_shards_are_skipped(demo_dir, tmp_path):
    expected = _damaged_set(demo_dir, tmp_path)
    good_per_epoch = len(expected)

    loader = build_loader(data_cfg(tmp_path, micro_batch=1), 0, 1, seed=0, prefetch=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # our once-per-shard rule, not Python's dedup, must do the work
        keys = [next(loader)["key"][0] for _ in range(2 * good_per_epoch)]
    assert set(keys[:good_per_epoch]) == expected and len(set(keys[good_per_epoch:])) == len(expected)
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert len(messages) == 2, messages
    assert any("b-bad.tar" in m for m in messages) and any("c-truncated.tar" in m for m in messages)
    stats = loader.stats()
    per_epoch = {"not_a_video": 2, "missing_caption": 1, "too_few_frames": 1, "corrupt_tar": 1}
    assert set(stats["skipped_by_reason"]) == set(per_epoch)
    for reason, count in per_epoch.items():  # one full epoch, plus part of the next
        assert count <= stats["skipped_by_reason"][reason] <= 2 * count, stats
    assert stats["skipped"] == sum(stats["skipped_by_reason"].values())


def test_resume_over_damaged_data_keeps_batches_and_counts(demo_dir, tmp_path):
    _damaged_set(demo_dir, tmp_path)
    cfg = data_cfg(tmp_path, micro_batch=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        straight = build_loader(cfg, 0, 1, seed=1, prefetch=2)
        reference = [next(straight) for _ in range(10)]
        first = build_loader(cfg, 0, 1, seed=1, prefetch=2)
        # save inside the truncated shard: its damage was counted before the save and must not be again
        for k in range(1, 10):
            next(first)
            _wait_until_prefetched(first)
            state = first.state_dict()
            shard = first._maker.stream.epoch_shards(state["epoch"])[state["shard_cursor"]]
            if shard.endswith("c-truncated.tar") and state["sample_cursor"] > 0:
                break
        assert shard.endswith("c-truncated.tar"), "no batch ended inside the truncated shard"
        resumed = build_loader(cfg, 0, 1, seed=1, prefetch=2)
        resumed.load_state_dict(json.loads(json.dumps(state)))
        _assert_same_batches(reference[k:], [next(resumed) for _ in range(10 - k)])
    assert resumed.stats() == straight.stats() and straight.stats()["skipped"] > 0
    for loader in (straight, first, resumed):
        loader.close()


def test_data_with_nothing_decodable_fails_instead_of_spinning(tmp_path):
    _write_tar(tmp_path / "junk.tar", [{"__key__": f"{i}", "mp4": b"junk" * 40, "txt": "x"} for i in range(3)])
    loader = build_loader(data_cfg(tmp_path, micro_batch=1), 0, 1, seed=0, prefetch=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        with pytest.raises(DataError, match="no decodable sample"):
            next(loader)
