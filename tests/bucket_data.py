"""A tiny shard set of mixed shapes for the bucket tests: landscape, portrait and square videos of several
lengths, images, and one corrupt video, in the shard format launch/prepare.py writes (media + .txt + .json,
and an index.jsonl beside the shards)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from vgen.data.video import encode_video

# (name, height, width, frames) of the videos; each is written `copies` times with other colours
VIDEOS = [("land", 24, 32, 12), ("port", 32, 16, 12), ("square", 16, 16, 8), ("short", 24, 32, 3)]
IMAGES = [("img", 20, 30, "png"), ("pic", 30, 20, "jpeg")]
# three buckets: a landscape and a portrait video shape, and images (1 frame)
BUCKETS = "[{height: 12, width: 16, frames: 4, micro_batch: 2}, {height: 16, width: 8, frames: 4, micro_batch: 1}, " \
          "{height: 8, width: 8, frames: 1, micro_batch: 3}]"


def _frames(t: int, h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(30, 220, size=3)
    frames = np.empty((t, h, w, 3), np.uint8)
    for i in range(t):  # a bar moving right, so frames differ
        frames[i] = base // 3
        frames[i, :, (2 * i) % w:(2 * i) % w + 3] = base
    return frames


def _image(h: int, w: int, fmt: str, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_frames(1, h, w, seed)[0]).save(buf, format=fmt.upper())
    return buf.getvalue()


def write_bucket_set(out: Path, copies: int = 3, per_shard: int = 5, corrupt: bool = True,
                     index: bool = True) -> list[dict]:
    """Write the set into `out`; returns the index records (one per sample, corrupt one included)."""
    out.mkdir(parents=True, exist_ok=True)
    samples = []
    for c in range(copies):
        for name, h, w, t in VIDEOS:
            samples.append((f"{name}{c}", "mp4", encode_video(_frames(t, h, w, c), fps=8),
                            {"num_frames": t, "fps": 8, "width": w, "height": h, "duration": t / 8, "kind": "video"}))
        for name, h, w, fmt in IMAGES:
            ext = "jpg" if fmt == "jpeg" else fmt
            samples.append((f"{name}{c}", ext, _image(h, w, fmt, c),
                            {"num_frames": 1, "fps": 0, "width": w, "height": h, "duration": 0, "kind": "image"}))
    if corrupt:  # claims to be a fine landscape video; decoding it fails
        samples.append(("broken", "mp4", b"\x00not a video" * 40,
                        {"num_frames": 12, "fps": 8, "width": 32, "height": 24, "duration": 1.5, "kind": "video"}))
    records = []
    for s in range(0, len(samples), per_shard):
        shard = f"set-{s // per_shard:06d}.tar"
        with wds.TarWriter(str(out / shard), mtime=0) as sink:
            for key, ext, data, meta in samples[s:s + per_shard]:
                sink.write({"__key__": key, ext: data, "txt": f"caption of {key}",
                            "json": json.dumps({**meta, "source": f"{key}.{ext}"})})
                records.append({"key": key, "shard": shard, **meta})
    if index:
        (out / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records
