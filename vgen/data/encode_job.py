"""The encoding job: video shards -> latent shards (format: vgen.data.latents), split across ranks by shard.

    python launch/encode.py data.path=SRC data.encode_out=DST
    torchrun --nproc_per_node 8 launch/encode.py data.path=SRC data.encode_out=DST autoencoder.kind=vae ...
    deepspeed --num_gpus 8 launch/encode.py data.path=SRC encode.out=DST ...

Rank r of w takes the sorted source shards r::w and writes each to DST under the same name. There is no
process group: encoding needs no communication, and a collective at the end would make a rank that finished
early wait for (and, on a long job, time out on) the slowest one. The rank and world size come from the
launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK), which python, torchrun and deepspeed all set or imply.

Restarts lose at most the shards in flight: a shard is written as NAME.partial and renamed when complete,
so an existing NAME means done and a re-run skips it; a left-behind NAME.partial is overwritten. The rank
that finds every shard done at its end writes the _COMPLETE marker.

Clips are cut deterministically: from frame 0, at `data.frame_stride`, resized and centre-cropped as in
training, at the shape of the sample's bucket (`data.buckets`, assigned from the sample's metadata as the
training loader does; without buckets, `data.num_frames` x `data.height` x `data.width`). Samples that fit no
bucket are listed as skipped. So a re-encoded shard holds the same tensors, and with the fixed tar mtime the
same bytes. latents_meta.json lists every bucket with its latent shape, and each sample's .json names its
bucket, so `data.kind=latents` trains with the same buckets.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds

from vgen.config import ConfigError
from vgen.data.latents import (COMPLETE_NAME, DTYPES, NULL_TEXT_NAME, make_meta, pack_sample, write_meta,
                               write_null_text)
from vgen.data.buckets import Bucket, assign, buckets_from_config, default_meta
from vgen.data.loader import SampleError, bucket_clip, decode_clip_sample, make_demo_if_asked
from vgen.data.sample_index import build_index
from vgen.data.shards import DataError, index_tar, list_shards
from vgen.models import build_frozen_encoders
from vgen.models.text_encoder import TextEncoder, default_encoder_path

CLIP_START = 0


@dataclass
class EncodeSettings:
    out: Path
    batch: int  # clips per autoencoder call
    dtype: str  # storage dtype of latents and text: "float32" or "bfloat16"


def encode_settings(cfg) -> EncodeSettings:
    """The job's settings: a top-level `encode` section when the schema has one, else `data.encode_*`."""
    section = cfg.get("encode")
    if section is not None:
        out, batch, dtype, prefix = section.out, section.batch, section.dtype, "encode."
    else:
        out, batch, dtype, prefix = cfg.data.encode_out, cfg.data.encode_batch, cfg.data.encode_dtype, "data.encode_"
    if not out:
        raise ConfigError(f"{prefix}out=DIR is required: where the latent shards go")
    if batch < 1:
        raise ConfigError(f"{prefix}batch={batch} must be >= 1")
    if dtype not in DTYPES:
        raise ConfigError(f"{prefix}dtype={dtype!r} must be one of {sorted(DTYPES)}")
    if os.path.isdir(cfg.data.path) and Path(out).resolve() == Path(cfg.data.path).resolve():
        raise ConfigError(f"{prefix}out={out} is data.path: latent shards keep the source names, so they "
                          "would overwrite the videos")
    return EncodeSettings(Path(out), int(batch), str(dtype))


def launcher_rank() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment; (0, 1, 0) under plain python."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def pick_device(run_cfg, local_rank: int) -> torch.device:
    if run_cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but no CUDA device is available")
    if run_cfg.device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class ShardEncoder:
    """Turns one video shard into one latent shard with a loaded autoencoder and text encoder."""

    def __init__(self, autoencoder, text_encoder: TextEncoder, buckets: list[Bucket], stride: int,
                 settings: EncodeSettings, device):
        self.autoencoder, self.text_encoder = autoencoder, text_encoder
        self.buckets, self.stride, self.settings, self.device = buckets, stride, settings, device

    def encode_shard(self, src: str, dst: Path, bucket_of: dict[str, int]) -> dict:
        """Write `dst` (via dst.partial) and its skipped list; returns {"encoded": n, "skipped": [...]}.

        Args:
            bucket_of: key -> bucket index of this shard's samples (-1: fits none, skipped).
        """
        partial = dst.with_name(dst.name + ".partial")
        encoded, skipped = 0, []
        pending: dict[int, list] = {b: [] for b in range(len(self.buckets))}  # one autoencoder call = one shape
        with wds.TarWriter(str(partial), mtime=0) as sink:  # fixed mtime: same clips, same bytes
            for key, b, item in self._clips(src, skipped, bucket_of):
                pending[b].append((key, *item))
                if len(pending[b]) == self.settings.batch:
                    encoded += self._flush(pending[b], src, sink, self.buckets[b])
            for b, items in pending.items():
                encoded += self._flush(items, src, sink, self.buckets[b])
        report = {"source": src, "encoded": encoded, "skipped": skipped}
        # the list lands before the shard: an existing shard always has its list beside it
        _write_json(skipped_path(dst), report)
        os.replace(partial, dst)
        return report

    def _clips(self, src: str, skipped: list, bucket_of: dict[str, int]):
        """(key, bucket, (video, caption)) of each usable sample in file order; the others go to `skipped`."""
        samples, error = index_tar(src)
        with open(src, "rb") as handle:
            for key, entries in samples:
                b = bucket_of.get(key, -1)
                if b < 0:
                    skipped.append({"key": key, "reason": "no_bucket", "detail": "fits none of data.buckets"})
                    continue
                parts = {}
                for ext, (offset, size) in entries.items():
                    handle.seek(offset)
                    parts[ext] = handle.read(size)
                try:
                    yield key, b, decode_clip_sample(parts, bucket_clip(self.buckets[b], self.stride),
                                                     start=CLIP_START)
                except SampleError as e:
                    skipped.append({"key": key, "reason": e.reason, "detail": str(e)})
        if error:  # the samples after the damage are lost; say so once, with no key
            skipped.append({"key": None, "reason": "corrupt_tar", "detail": error})

    @torch.no_grad()
    def _flush(self, pending: list, src: str, sink, bucket: Bucket) -> int:
        """Encode the pending clips as one batch, write them, and empty the list."""
        if not pending:
            return 0
        keys, videos, captions = zip(*pending)
        latents = self.autoencoder.encode(torch.stack(videos).to(self.device)).float().cpu()  # (B, C, T', H', W')
        text, mask = self.text_encoder(list(captions))  # (B, L, dim), (B, L)
        for i, key in enumerate(keys):
            source = {"key": key, "shard": os.path.basename(src)}
            sample = pack_sample(key, latents[i], text[i], mask[i], captions[i], source, self.settings.dtype)
            info = json.loads(sample["json"])  # the bucket, for training with the same buckets
            sample["json"] = json.dumps({**info, "bucket": [bucket.frames, bucket.height, bucket.width]}, sort_keys=True)
            sink.write(sample)
        pending.clear()
        return len(keys)


def skipped_path(dst: Path) -> Path:
    return dst.with_name(dst.name.removesuffix(".tar") + ".skipped.json")


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def build_encoders(cfg, device) -> tuple:
    """(autoencoder, text encoder), frozen, on `device`."""
    if cfg.autoencoder.kind == "vae" and not cfg.autoencoder.get("weights"):
        warnings.warn("autoencoder.kind=vae without autoencoder.weights: encoding with random weights "
                      "(tests and demos only)", stacklevel=2)
    # random autoencoder weights (tests, demos) come from run.seed: one latent space on every rank
    text_encoder, autoencoder = build_frozen_encoders(cfg, device)
    return autoencoder, text_encoder


def prepare_output(cfg, settings: EncodeSettings, autoencoder, text_encoder) -> dict:
    """Create DST with its meta and null-text files (every rank may; the writes are atomic and equal)."""
    entries = []
    for b in buckets_from_config(cfg.data):
        try:
            shape = autoencoder.latent_shape(b.frames, b.height, b.width)
        except ValueError as e:
            what = (f"data.buckets {b.name}" if getattr(cfg.data, "buckets", None)
                    else f"data.num_frames/height/width={b.frames}/{b.height}/{b.width}")
            raise ConfigError(f"{what} do not suit autoencoder.kind={cfg.autoencoder.kind}: {e}") from e
        entries.append({"frames": b.frames, "height": b.height, "width": b.width,
                        "latent_shape": [int(s) for s in shape]})
    first = entries[0]  # "clip" and "latent_shape" keep the one-shape layout readable by older code
    clip = {"num_frames": first["frames"], "height": first["height"], "width": first["width"],
            "frame_stride": int(cfg.data.frame_stride), "start": CLIP_START}
    settings.out.mkdir(parents=True, exist_ok=True)
    meta = make_meta(cfg.autoencoder, cfg.text.encoder_path or default_encoder_path(), cfg.text.max_length,
                     text_encoder.dim, clip, first["latent_shape"], settings.dtype, cfg.data.path)
    meta["buckets"] = entries
    write_meta(settings.out, meta)
    if not (settings.out / NULL_TEXT_NAME).is_file():
        emb, mask = text_encoder([""])
        write_null_text(settings.out, emb[0], mask[0], settings.dtype)
    return meta


def _drop_stale_marker(out: Path, names: list[str]) -> None:
    """A _COMPLETE written for another list of source shards no longer tells the truth."""
    try:
        if json.loads((out / COMPLETE_NAME).read_text())["shards"] != names:
            (out / COMPLETE_NAME).unlink(missing_ok=True)
    except (OSError, ValueError, KeyError):
        pass


def _mark_complete_if_done(out: Path, names: list[str]) -> bool:
    """Write _COMPLETE (shard list and totals) when every source shard has its latent shard."""
    if not all((out / n).is_file() for n in names):
        return False
    reports = [json.loads(skipped_path(out / n).read_text()) for n in names]
    _write_json(out / COMPLETE_NAME, {"shards": names, "encoded": sum(r["encoded"] for r in reports),
                                      "skipped": sum(len(r["skipped"]) for r in reports)})
    return True


def run_encode(cfg, rank: int, world: int, device) -> dict:
    """Encode this rank's shards; returns {"encoded", "skipped", "shards_done", "shards_skipped", "seconds"}.

    Raises:
        DataError: data.path is missing or holds no shards, two shards share a name, or DST holds another
            encoding. ConfigError: bad data.encode_* settings or a clip size the autoencoder cannot take.
    """
    settings = encode_settings(cfg)
    make_demo_if_asked(cfg.data)
    shards = list_shards(cfg.data.path)
    names = [os.path.basename(s) for s in shards]
    if len(set(names)) != len(names):
        raise DataError(f"data.path={cfg.data.path}: shards in different directories share a name; latent "
                        "shards keep the source names, so they must be unique")
    _drop_stale_marker(settings.out, names)
    autoencoder, text_encoder = build_encoders(cfg, device)
    prepare_output(cfg, settings, autoencoder, text_encoder)
    buckets = buckets_from_config(cfg.data)
    encoder = ShardEncoder(autoencoder, text_encoder, buckets, int(cfg.data.frame_stride), settings, device)
    bucket_of = _bucket_of(shards, cfg.data, buckets)
    summary = {"encoded": 0, "skipped": 0, "shards_done": 0, "shards_skipped": 0}
    start = time.perf_counter()
    for src, name in list(zip(shards, names))[rank::world]:
        dst = settings.out / name
        if dst.is_file():
            summary["shards_skipped"] += 1
            _log(rank, world, f"skip {name}: already encoded")
            continue
        t0 = time.perf_counter()
        report = encoder.encode_shard(src, dst, bucket_of.get(src, {}))
        summary["shards_done"] += 1
        summary["encoded"] += report["encoded"]
        summary["skipped"] += len(report["skipped"])
        _log(rank, world, f"encoded {name}: {report['encoded']} clips, {len(report['skipped'])} skipped, "
                          f"{time.perf_counter() - t0:.2f} s")
    summary["seconds"] = time.perf_counter() - start
    if _mark_complete_if_done(settings.out, names):
        _log(rank, world, f"all {len(names)} shards of {cfg.data.path} are encoded in {settings.out}")
    return summary


def _bucket_of(shards: list[str], data_cfg, buckets: list[Bucket]) -> dict[str, dict[str, int]]:
    """shard -> key -> bucket index, from the set's metadata (the training loader's rule)."""
    index, default = build_index(shards, str(data_cfg.path)), default_meta(data_cfg)
    out: dict[str, dict[str, int]] = {}
    for s in index.samples:
        out.setdefault(shards[s.shard], {})[s.key] = assign(s.meta, buckets, int(data_cfg.frame_stride), default)
    return out


def _log(rank: int, world: int, msg: str) -> None:
    print(f"[encode {rank}/{world}] {msg}", flush=True)
