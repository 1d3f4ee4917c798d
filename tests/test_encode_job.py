"""The encoding job (videos -> latent shards) under the real launchers, its restarts and bad input, and the
latents loader: rank split, exact resume, caption-dropout null text, damaged samples."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import webdataset as wds
from omegaconf import OmegaConf

from e2e_utils import PY, ROOT, TORCHRUN, env, free_port
from vgen.config import load_config
from vgen.data.demo import write_demo_shards
from vgen.data.encode_job import run_encode
from vgen.data.latents import check_compatible, unpack_sample
from vgen.data.loader import build_loader
from vgen.data.shards import DataError, DataWarning, index_tar, list_shards
from vgen.data.video import decode_video, encode_video
from vgen.models.autoencoder import PatchAutoencoder, build_autoencoder
from vgen.models.text_encoder import TextEncoder

torch.set_num_threads(1)
CLIP = ["data.num_frames=4", "data.height=16", "data.width=16", "data.make_demo=false", "text.max_length=8"]
TINY_VAE = ("autoencoder.vae={base_dim:8,z_dim:4,dim_mult:[1,2,2,2],num_res_blocks:1,"
            "temperal_downsample:[false,true,true],tile_size:8,tile_overlap:0}")


def encode_cmd(launcher: str, src, dst, extra=()) -> list[str]:
    script = str(ROOT / "launch" / "encode.py")
    head = [PY, script]
    if launcher == "torchrun":
        head = [TORCHRUN, "--nproc_per_node=2", f"--master_port={free_port()}", script]
    return head + [f"data.path={src}", f"encode.out={dst}", "encode.batch=3", *CLIP, *extra]


def run(cmd) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def read_tar(path) -> dict[str, dict[str, bytes]]:
    samples, error = index_tar(str(path))
    assert error is None
    out = {}
    with open(path, "rb") as f:
        for key, entries in samples:
            out[key] = {}
            for ext, (offset, size) in entries.items():
                f.seek(offset)
                out[key][ext] = f.read(size)
    return out


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """16 demo clips in 4 shards, encoded by 2 torchrun ranks: (src, dst, stdout)."""
    root = tmp_path_factory.mktemp("encode")
    src, dst = root / "src", root / "dst"
    write_demo_shards(src, num_clips=16, clips_per_shard=4, num_frames=4, height=16, width=16)
    return src, dst, run(encode_cmd("torchrun", src, dst))


@pytest.fixture(scope="module")
def text_encoder():
    return TextEncoder(None, max_length=8, layers=tuple(load_config([]).text.layers))  # the job's text layers


def cfg_for(src, dst, *extra):
    return load_config([f"data.path={src}", f"data.encode_out={dst}", "data.encode_batch=3", *CLIP, *extra])


# ---- the job ------------------------------------------------------------------------------------------------

def test_two_ranks_write_latents_that_decode_to_the_source(encoded, text_encoder):
    src, dst, out = encoded
    for rank, shards in ((0, (0, 2)), (1, (1, 3))):  # rank r takes shards r::2
        for i in shards:
            assert f"[encode {rank}/2] encoded demo-{i:06d}.tar: 4 clips, 0 skipped" in out
    ae, keys = PatchAutoencoder((1, 2, 2)), []
    for shard in list_shards(src):
        source, latents = read_tar(shard), read_tar(dst / Path(shard).name)
        assert sorted(latents) == sorted(source)
        meta = json.loads((dst / "latents_meta.json").read_text())
        for key, parts in latents.items():
            sample = unpack_sample(parts, meta)
            assert sample["latent"].shape == (12, 4, 8, 8) and sample["caption"] == source[key]["txt"].decode()
            video = decode_video(source[key]["mp4"], 4, 16, 16, start=0)
            assert torch.equal(ae.decode(sample["latent"][None])[0], video)  # the patch autoencoder is exact
            emb, mask = text_encoder([sample["caption"]])
            torch.testing.assert_close(sample["text"], emb[0], atol=1e-5, rtol=1e-5)
            assert torch.equal(sample["text_mask"], mask[0])
            assert json.loads(parts["json"])["source"] == {"key": key, "shard": Path(shard).name}
            keys.append(key)
    assert sorted(keys) == [f"{i:06d}" for i in range(16)]
    complete = json.loads((dst / "_COMPLETE").read_text())
    assert complete["encoded"] == 16 and complete["skipped"] == 0
    null = safetensors.torch.load_file(str(dst / "null_text.safetensors"))
    emb, mask = text_encoder([""])
    torch.testing.assert_close(null["text"], emb[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(null["text_mask"], mask[0])


def test_rerun_skips_finished_shards_and_redoes_a_partial_one(encoded, tmp_path):
    src, done, _ = encoded
    dst = tmp_path / "dst"
    shutil.copytree(done, dst)
    # as if killed while writing shard 3: no final file, a half-written temp one
    (dst / "demo-000003.tar").unlink()
    (dst / "demo-000003.tar.partial").write_bytes(b"half a tar")
    mtimes = {p.name: p.stat().st_mtime_ns for p in dst.glob("demo-00000[012].tar")}
    out = run(encode_cmd("python", src, dst))
    for i in range(3):
        assert f"skip demo-{i:06d}.tar: already encoded" in out
    assert "encoded demo-000003.tar: 4 clips" in out
    assert {p.name: p.stat().st_mtime_ns for p in dst.glob("demo-00000[012].tar")} == mtimes
    assert not (dst / "demo-000003.tar.partial").exists()
    meta = json.loads((dst / "latents_meta.json").read_text())
    again, first = read_tar(dst / "demo-000003.tar"), read_tar(done / "demo-000003.tar")
    assert sorted(again) == sorted(first)
    for key in first:
        a, b = unpack_sample(again[key], meta), unpack_sample(first[key], meta)
        assert torch.equal(a["latent"], b["latent"]) and torch.allclose(a["text"], b["text"], atol=1e-5)


def _video(frames: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_video(rng.integers(0, 255, (frames, 16, 16, 3), dtype=np.uint8), fps=8)


def test_bad_videos_are_listed_and_the_rest_encoded(tmp_path, text_encoder):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    samples = {"good0": {"mp4": _video(4, 0), "txt": "a"}, "garbage": {"mp4": b"not a video" * 50, "txt": "b"},
               "empty": {"mp4": b"", "txt": "c"}, "short": {"mp4": _video(2, 1), "txt": "d"},
               "nocaption": {"mp4": _video(4, 2)}, "good1": {"mp4": _video(5, 3), "txt": "e"}}
    with wds.TarWriter(str(src / "mixed-000000.tar")) as sink:
        for key, parts in samples.items():
            sink.write({"__key__": key, **parts})
    # a second shard cut off inside its third sample: what index_tar keeps before the cut is encoded (it
    # drops the last whole-looking sample too, in case the cut took its last members), the cut is listed
    with wds.TarWriter(str(tmp_path / "whole.tar")) as sink:
        for i in range(4):
            sink.write({"__key__": f"cut{i}", "mp4": _video(4, 10 + i), "txt": f"clip {i}"})
    data = (tmp_path / "whole.tar").read_bytes()
    (src / "mixed-000001.tar").write_bytes(data[:_cut_inside(tmp_path / "whole.tar", "cut2")])
    summary = run_encode(cfg_for(src, dst), 0, 1, torch.device("cpu"))
    readable = sorted(key for key, _ in index_tar(str(src / "mixed-000001.tar"))[0])
    assert readable and "cut2" not in readable
    assert (summary["encoded"], summary["skipped"]) == (2 + len(readable), 5)
    listed = json.loads((dst / "mixed-000000.skipped.json").read_text())
    reasons = {s["key"]: s["reason"] for s in listed["skipped"]}
    assert reasons == {"garbage": "not_a_video", "empty": "not_a_video", "short": "too_few_frames",
                       "nocaption": "missing_caption"}
    assert sorted(read_tar(dst / "mixed-000000.tar")) == ["good0", "good1"]
    cut = json.loads((dst / "mixed-000001.skipped.json").read_text())["skipped"]
    assert [(s["key"], s["reason"]) for s in cut] == [(None, "corrupt_tar")]
    assert sorted(read_tar(dst / "mixed-000001.tar")) == readable


def _cut_inside(tar_path, key) -> int:
    """A byte offset inside `key`'s video payload."""
    samples, _ = index_tar(str(tar_path))
    offset, size = dict(samples)[key]["mp4"]
    return offset + size // 2


def test_bad_paths_and_settings_fail_with_the_setting_named(encoded, tmp_path):
    src, dst, _ = encoded
    with pytest.raises(DataError, match=f"data.path={tmp_path}/nope does not exist"):
        run_encode(cfg_for(tmp_path / "nope", tmp_path / "out"), 0, 1, torch.device("cpu"))
    # the same output directory with another autoencoder would mix two latent spaces
    other = tmp_path / "dst"
    shutil.copytree(dst, other)
    with pytest.raises(DataError, match="holds latents of another encoding.*autoencoder"):
        run_encode(cfg_for(src, other, "autoencoder.patch=[1,4,4]"), 0, 1, torch.device("cpu"))
    proc = subprocess.run([PY, str(ROOT / "launch" / "encode.py"), f"data.path={src}", *CLIP], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "data.encode_out=DIR is required" in proc.stderr


def test_vae_latents_match_the_vae(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_demo_shards(src, num_clips=4, clips_per_shard=2, num_frames=5, height=16, width=16)
    cfg = cfg_for(src, dst, "data.num_frames=5", "autoencoder.kind=vae", TINY_VAE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random VAE weights: warned about, fine here
        run_encode(cfg, 0, 1, torch.device("cpu"))
    torch.manual_seed(cfg.run.seed)  # the job seeds the same way, so both hold the same random VAE
    vae = build_autoencoder(cfg.autoencoder)
    meta = json.loads((dst / "latents_meta.json").read_text())
    assert meta["latent_shape"] == [4, 2, 2, 2] and meta["autoencoder"]["vae"]["tile_size"] == 8
    for shard in list_shards(src):
        for key, parts in read_tar(dst / Path(shard).name).items():
            video = decode_video(read_tar(shard)[key]["mp4"], 5, 16, 16, start=0)
            torch.testing.assert_close(unpack_sample(parts, meta)["latent"], vae.encode(video[None])[0],
                                       atol=1e-5, rtol=1e-4)


# ---- the latents loader ---------------------------------------------------------------------------------------

def latents_cfg(path, **over):
    return OmegaConf.create({"kind": "latents", "path": str(path), "micro_batch": 3, "num_frames": 99,
                             "height": 1, "width": 1, "frame_stride": 1, "make_demo": True, **over})


def test_loader_splits_ranks_and_serves_null_text(encoded, text_encoder):
    _, dst, _ = encoded
    keys = []
    for rank in range(2):
        loader = build_loader(latents_cfg(dst, micro_batch=4), rank, 2, seed=1, prefetch=0)
        batches = [next(loader), next(loader)]  # 2 shards = 8 samples per rank and epoch
        assert loader.stats()["epoch"] == 0
        keys.append({k for b in batches for k in b["key"]})
    assert not keys[0] & keys[1] and keys[0] | keys[1] == {f"{i:06d}" for i in range(16)}
    b = batches[0]
    assert b["latent"].shape == (4, 12, 4, 8, 8) and b["latent"].dtype == torch.float32
    assert b["text"].shape == (4, 8, 384 * len(load_config([]).text.layers)) and b["text_mask"].shape == (4, 8) and b["text_mask"].dtype == torch.bool
    assert len(b["caption"]) == 4 and all(" moving " in c for c in b["caption"])
    emb, mask = loader.null_text()
    ref_emb, ref_mask = text_encoder([""])
    torch.testing.assert_close(emb, ref_emb[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(mask, ref_mask[0]) and mask.sum() == 2  # [CLS] [SEP]
    cfg = load_config(CLIP + [f"data.path={dst}", "data.kind=latents"])
    check_compatible(loader.meta, cfg)
    with pytest.raises(DataError, match="encoded with autoencoder"):
        check_compatible(loader.meta, load_config(CLIP + [f"data.path={dst}", "autoencoder.patch=[1,4,4]"]))
    with pytest.raises(DataError, match="text.max_length=16"):
        check_compatible(loader.meta, load_config(CLIP[:-1] + [f"data.path={dst}", "text.max_length=16"]))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_loader_resumes_exactly(encoded, prefetch):
    _, dst, _ = encoded
    cfg = latents_cfg(dst)  # rank 1 of 2: 8 samples an epoch, 3 a batch, so batches cross epochs
    straight = build_loader(cfg, 1, 2, seed=5, prefetch=prefetch)
    reference = [next(straight) for _ in range(5)]
    first = build_loader(cfg, 1, 2, seed=5, prefetch=prefetch)
    next(first), next(first)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = build_loader(cfg, 1, 2, seed=5, prefetch=prefetch)
    resumed.load_state_dict(state)
    for want, got in zip(reference[2:], [next(resumed) for _ in range(3)]):
        assert want["key"] == got["key"] and want["caption"] == got["caption"]
        for name in ("latent", "text", "text_mask"):
            assert torch.equal(want[name], got[name])
    assert resumed.stats() == straight.stats() and straight.stats()["epoch"] == 1
    for loader in (straight, first, resumed):
        loader.close()


def test_loader_skips_damaged_samples_and_needs_the_meta(encoded, tmp_path):
    _, done, _ = encoded
    dst = tmp_path / "dst"
    shutil.copytree(done, dst)
    samples = read_tar(done / "demo-000000.tar")
    bad_key, wrong_key = sorted(samples)[:2]
    samples[bad_key]["safetensors"] = b"\x00" * 40
    samples[wrong_key]["safetensors"] = safetensors.torch.save({"latent": torch.zeros(3, 4, 8, 8),
                                                               "text": torch.zeros(8, 384),
                                                               "text_mask": torch.ones(8, dtype=torch.bool)})
    with wds.TarWriter(str(dst / "demo-000000.tar")) as sink:
        for key, parts in samples.items():
            sink.write({"__key__": key, **parts})
    loader = build_loader(latents_cfg(dst, micro_batch=14), 0, 1, seed=0, prefetch=0)
    with pytest.warns(DataWarning, match="bad_latent"):
        keys = next(loader)["key"]
    # the two bad slots were filled by stand-ins of the same bucket (so a key may repeat)
    assert bad_key not in keys and wrong_key not in keys and len(keys) == 14 and len(set(keys)) >= 12
    assert set(loader.stats()["skipped_by_reason"]) == {"bad_latent"}  # 14 of 16 slots: one or both bad ones
    assert 1 <= loader.stats()["skipped_by_reason"]["bad_latent"] <= 2
    os.remove(dst / "latents_meta.json")
    with pytest.raises(DataError, match="latents_meta.json"):
        build_loader(latents_cfg(dst), 0, 1, seed=0)
    os.remove(dst / "_COMPLETE")
    shutil.copy(done / "latents_meta.json", dst)
    with pytest.warns(DataWarning, match="_COMPLETE"):
        build_loader(latents_cfg(dst), 0, 1, seed=0)


# ---- buckets -------------------------------------------------------------------------------------------------

def test_latents_are_written_at_each_samples_bucket_and_train_with_the_same_buckets(tmp_path):
    from bucket_data import BUCKETS, write_bucket_set

    src, dst = tmp_path / "src", tmp_path / "dst"
    write_bucket_set(src, copies=1, corrupt=True)
    over = [f"data.path={src}", f"data.encode_out={dst}", f"data.buckets={BUCKETS}", "data.frame_stride=2",
            "data.make_demo=false", "text.max_length=8"]
    cfg = load_config(over)
    summary = run_encode(cfg, 0, 1, torch.device("cpu"))
    assert summary["encoded"] == 6 and summary["skipped"] == 1  # the corrupt video
    meta = json.loads((dst / "latents_meta.json").read_text())
    assert [(b["frames"], b["height"], b["width"], b["latent_shape"]) for b in meta["buckets"]] == [
        (4, 12, 16, [12, 4, 6, 8]), (4, 16, 8, [12, 4, 8, 4]), (1, 8, 8, [12, 1, 4, 4])]
    lat = OmegaConf.merge(cfg.data, {"kind": "latents", "path": str(dst)})
    loader = build_loader(lat, 0, 1, seed=0, prefetch=0)
    videos = build_loader(cfg.data, 0, 1, seed=0, prefetch=0)
    assert loader.histogram == {"4x12x16": 2, "4x16x8": 1, "1x8x8": 3, "none": 0}
    assert videos.histogram == {"4x12x16": 3, "4x16x8": 1, "1x8x8": 3, "none": 0}  # + the corrupt one
    shapes = {}
    for _ in range(6):
        batch = next(loader)
        want = {"4x12x16": (2, 12, 4, 6, 8), "4x16x8": (1, 12, 4, 8, 4), "1x8x8": (3, 12, 1, 4, 4)}[batch["bucket"]]
        assert tuple(batch["latent"].shape) == want
        shapes[batch["bucket"]] = want
    assert len(shapes) == 3
