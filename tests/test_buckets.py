"""Buckets: assignment from metadata, one bucket per micro-batch, images with videos, exact resume, decoding
workers, micro_batch=auto, and bad bucket settings."""

import json
import warnings

import pytest
import torch
from omegaconf import OmegaConf

from bucket_data import BUCKETS, write_bucket_set
from vgen.config import ConfigError, load_config
from vgen.data.buckets import Bucket, BucketError, assign, auto_micro_batch, buckets_from_config
from vgen.data.loader import build_loader
from vgen.data.sample_index import SampleMeta
from vgen.data.shards import DataError, DataWarning

torch.set_num_threads(1)


def bucket_cfg(path, buckets=BUCKETS, **over):
    cfg = load_config([f"data.path={path}", f"data.buckets={buckets}", "data.frame_stride=2",
                       "data.make_demo=false"]).data
    return OmegaConf.merge(cfg, over)


@pytest.fixture(scope="module")
def bucket_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("buckets")
    write_bucket_set(path)
    return path


@pytest.fixture(autouse=True)
def _quiet():
    """Bad samples warn once per shard; these tests count them in stats() instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        yield


# ---- assignment ---------------------------------------------------------------------------------------------

def test_assignment_prefers_aspect_ratio_then_frames_and_keeps_images_in_image_buckets():
    buckets = [Bucket(12, 16, 4), Bucket(16, 8, 4), Bucket(8, 8, 1), Bucket(12, 16, 2)]
    default = SampleMeta(8, 32, 32, "video")
    def pick(**meta):
        return assign(SampleMeta(**meta), buckets, 2, default)
    assert pick(num_frames=12, width=32, height=24, kind="video") == 0  # 4:3, the most frames
    assert pick(num_frames=4, width=32, height=24, kind="video") == 3  # 4 frames at stride 2 need 7
    assert pick(num_frames=12, width=16, height=32, kind="video") == 1  # portrait
    assert pick(num_frames=2, width=32, height=24, kind="video") == 2  # too short for any clip: one frame
    assert pick(num_frames=1, width=300, height=100, kind="image") == 2
    assert pick() == 0  # no metadata: the configured shape (8 frames 32x32) -> closest ratio is 4:3
    assert assign(SampleMeta(1, 10, 10, "image"), buckets[:2], 2, default) == -1  # no image bucket
    latent = SampleMeta(kind="latent", shape=(4, 16, 8))
    assert assign(latent, buckets, 2, default) == 1 and assign(latent, buckets[2:], 2, default) == -1


def test_bad_bucket_settings_name_the_setting(tmp_path):
    for bad, match in [("[{height: 8, width: 8, frames: 1, micro_batch: 0}]", r"data.buckets\[0\].micro_batch=0"),
                       ("[{height: 8, width: 8, frames: 1, micro_batch: -2}]", r"micro_batch=-2 must be a positive"),
                       ("[{height: 8, width: 8, frames: 1, micro_batch: lots}]", r"micro_batch='lots'"),
                       ("[{height: 8, width: 8, frames: 1, micro_batch: 1.5}]", r"micro_batch=1.5"),
                       ("[{height: 8, width: 8}]", r"data.buckets\[0\].frames=None"),
                       ("[{height: 8, width: 8, frames: 1, fps: 3}]", r"unknown keys \['fps'\]")]:
        with pytest.raises(ConfigError, match=match):
            load_config([f"data.buckets={bad}"])
    # a bucket list no sample fits: named, before anything is written
    write_bucket_set(tmp_path / "set", copies=1, corrupt=False)
    cfg = bucket_cfg(tmp_path / "set", buckets="[{height: 8, width: 8, frames: 40, micro_batch: 1}]")
    with pytest.raises(DataError, match=r"data.buckets: none of the 6 samples .* fits any bucket \(40x8x8"):
        build_loader(cfg, 0, 1, seed=0)


# ---- batches ------------------------------------------------------------------------------------------------

def test_every_micro_batch_holds_one_bucket_and_every_rank_of_a_step_the_same(bucket_dir):
    loaders = [build_loader(bucket_cfg(bucket_dir), r, 2, seed=0, prefetch=0, grad_accum=2) for r in range(2)]
    assert loaders[0].histogram == {"4x12x16": 7, "4x16x8": 3, "1x8x8": 9, "none": 0}
    shapes = {"4x12x16": (4, 12, 16), "4x16x8": (4, 16, 8), "1x8x8": (1, 8, 8)}
    mbs = {"4x12x16": 2, "4x16x8": 1, "1x8x8": 3}
    seen = {}
    for step in range(12):
        batches = [[next(loader) for _ in range(2)] for loader in loaders]
        buckets = {b["bucket"] for rank in batches for b in rank}
        assert len(buckets) == 1, f"step {step} mixes buckets {buckets}"
        for b in (b for rank in batches for b in rank):
            assert tuple(b["video"].shape) == (mbs[b["bucket"]], 3, *shapes[b["bucket"]])
            for key in b["key"]:
                seen.setdefault(b["bucket"], set()).add(key.rstrip("0123456789"))
    # images and too-short videos train as 1-frame samples beside the videos; the broken file was replaced
    assert seen == {"4x12x16": {"land", "square"}, "4x16x8": {"port"}, "1x8x8": {"short", "img", "pic"}}
    assert loaders[0].stats()["skipped_by_reason"].get("not_a_video", 0) + \
        loaders[1].stats()["skipped_by_reason"].get("not_a_video", 0) >= 1


def test_set_without_index_reads_metadata_from_the_tars(tmp_path):
    write_bucket_set(tmp_path, copies=1, corrupt=False, index=False)
    loader = build_loader(bucket_cfg(tmp_path), 0, 1, seed=0, prefetch=0)
    assert loader.histogram == {"4x12x16": 2, "4x16x8": 1, "1x8x8": 3, "none": 0}


@pytest.mark.parametrize("stop", [1, 4, 7])
def test_resume_with_buckets_gives_the_same_batches(bucket_dir, stop):
    cfg = bucket_cfg(bucket_dir)
    straight = build_loader(cfg, 1, 2, seed=4, prefetch=2, grad_accum=2)
    reference = [next(straight) for _ in range(10)]
    first = build_loader(cfg, 1, 2, seed=4, prefetch=2, grad_accum=2)
    for _ in range(stop):  # an odd stop saves inside a step
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = build_loader(cfg, 1, 2, seed=4, prefetch=0, grad_accum=2)
    resumed.load_state_dict(state)
    for want, got in zip(reference[stop:], [next(resumed) for _ in range(10 - stop)]):
        assert want["key"] == got["key"] and want["sample_id"] == got["sample_id"]
        assert torch.equal(want["video"], got["video"])
    assert resumed.stats() == straight.stats()
    for loader in (straight, first, resumed):
        loader.close()


def test_sequence_parallel_ranks_of_one_group_get_the_same_samples(bucket_dir):
    # SP ranks share their dp rank, so they build the same loader; with dp=1 that is the whole set
    a, b = (build_loader(bucket_cfg(bucket_dir), 0, 1, seed=2, prefetch=p) for p in (0, 2))
    for _ in range(6):
        x, y = next(a), next(b)
        assert x["key"] == y["key"] and torch.equal(x["video"], y["video"])
    b.close()


# ---- decoding workers -----------------------------------------------------------------------------------------

def _keys_and_clips(cfg, n, workers, **kw):
    loader = build_loader(OmegaConf.merge(cfg, {"workers": workers}), 0, 1, seed=6, prefetch=2, **kw)
    try:
        return [(next(loader)) for _ in range(n)], loader.stats()
    finally:
        loader.close(workers=True)


def test_workers_give_the_same_batches_whatever_their_number(bucket_dir):
    base, stats = _keys_and_clips(bucket_cfg(bucket_dir), 8, workers=0)
    for workers in (1, 2):
        got, got_stats = _keys_and_clips(bucket_cfg(bucket_dir), 8, workers=workers)
        assert got_stats == stats
        for want, have in zip(base, got):
            assert want["key"] == have["key"] and torch.equal(want["video"], have["video"])


def test_a_worker_that_dies_costs_its_sample_not_the_run(bucket_dir, monkeypatch):
    monkeypatch.setenv("VGEN_FAULT_CRASH_DECODE", "land1")
    batches, stats = _keys_and_clips(bucket_cfg(bucket_dir), 20, workers=2)
    assert stats["skipped_by_reason"].get("worker_crash", 0) >= 1
    assert all("land1" not in b["key"] for b in batches)


# ---- micro_batch: auto ----------------------------------------------------------------------------------------

def test_auto_micro_batch_fits_the_budget_and_rejects_an_impossible_one():
    from vgen.models.presets import resolve_preset
    from vgen.parallel.memory_sim import simulate

    over = ["model.hidden=32", "model.depth=2", "model.heads=2", "text.max_length=8"]
    bucket = Bucket(16, 16, 4, "auto")
    shape = (12, 4, 8, 8)  # the patch autoencoder's latent of 4x16x16
    cfg = load_config(over)
    dit = resolve_preset("tiny", hidden=32, depth=2, heads=2, in_channels=12)
    def peak(mb):
        return simulate(dit, cfg.parallel.memory, shape, 8, micro_batch=mb, world_size=1, attention_kernel="flash").peak_gb
    budget = (peak(2) + peak(3)) / 2  # between the peaks of 2 and 3
    cfg = load_config(over + [f"parallel.memory.budget_gb={budget}"])
    lines = []
    assert auto_micro_batch(cfg, bucket, shape, world_size=1, log=lines.append) == 2
    assert "4x16x16 micro_batch=auto -> 2" in lines[0]
    cfg = load_config(over + [f"parallel.memory.budget_gb={peak(1) / 2}"])
    with pytest.raises(BucketError, match=r"data.buckets 4x16x16: micro_batch=auto, but even 1 sample needs"):
        auto_micro_batch(cfg, bucket, shape, world_size=1)
    with pytest.raises(BucketError, match="parallel.memory.budget_gb"):
        auto_micro_batch(load_config(over), bucket, shape, world_size=1)


def test_buckets_default_to_the_single_shape():
    cfg = load_config(["data.num_frames=5", "data.height=24", "data.width=40", "data.micro_batch=3"]).data
    assert buckets_from_config(cfg) == [Bucket(24, 40, 5, 3)]
