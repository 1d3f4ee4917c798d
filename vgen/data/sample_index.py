"""The index of every sample of a shard set: which shard holds it, its key, and its metadata.

The global sample order (vgen/data/order.py) permutes this list, so it must be the same on every rank and
whatever the number of ranks. It comes from the set's `index.jsonl` when launch/prepare.py wrote one (no tar is
read at start-up), else from the tar headers of every shard plus each sample's small `.json` member (the
demo shards and older sets). Member offsets inside a tar are looked up when a shard is first read.

A damaged tar keeps the samples wholly before the damage; that is decided here, once, so it is the same on
every rank (the order never depends on what one rank happened to read).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from vgen.data.shards import DataError, DataWarning, index_tar

INDEX_NAME = "index.jsonl"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class SampleMeta:
    """What bucketing needs to know of a sample; None where the set does not say."""

    num_frames: int | None = None
    width: int | None = None
    height: int | None = None
    kind: str | None = None  # "video" | "image" | "latent"
    shape: tuple | None = None  # latents: the (frames, height, width) clip they were encoded from


@dataclass(frozen=True)
class IndexedSample:
    shard: int  # position in SampleIndex.shards
    key: str
    meta: SampleMeta


def _meta_from(record: dict) -> SampleMeta:
    def num(name):
        value = record.get(name)
        return int(value) if isinstance(value, (int, float)) and value == value else None

    shape = record.get("bucket") or record.get("clip_shape")
    return SampleMeta(num("num_frames"), num("width"), num("height"), record.get("kind"),
                      tuple(int(s) for s in shape) if shape else None)


class SampleIndex:
    """Every sample of a set, in a fixed order (shards sorted as given, samples in file or index order).

    Args:
        shards: the shard paths (`list_shards(data.path)`), the same list on every rank.
        samples: the samples, each naming its shard by position.
        members: per shard already indexed, key -> {ext: (offset, size)}.
        skipped: samples (or shard remainders) lost at indexing time, by reason.
    """

    def __init__(self, shards: list[str], samples: list[IndexedSample], members: dict | None = None,
                 skipped: dict | None = None):
        self.shards, self.samples = shards, samples
        self._members = dict(members or {})
        self.skipped_by_reason = dict(skipped or {})

    def __len__(self) -> int:
        return len(self.samples)

    def fingerprint(self) -> str:
        """Identifies the list of samples; a saved position is only valid for the same list."""
        h = hashlib.blake2b(digest_size=8)
        for s in self.samples:
            h.update(f"{os.path.basename(self.shards[s.shard])}/{s.key}\n".encode())
        return h.hexdigest()

    def locate(self, i: int) -> tuple[str, dict[str, tuple[int, int]]]:
        """(shard path, {ext: (offset, size)}) of sample i; {} when its shard no longer holds it."""
        sample = self.samples[i]
        if sample.shard not in self._members:
            found, _ = index_tar(self.shards[sample.shard])
            self._members[sample.shard] = dict(found)
        return self.shards[sample.shard], self._members[sample.shard].get(sample.key, {})


def read_members(path: str, members: dict[str, tuple[int, int]]) -> dict[str, bytes]:
    """The payloads of one sample's members. Raises OSError on a short read."""
    parts = {}
    with open(path, "rb") as f:
        for ext, (offset, size) in members.items():
            f.seek(offset)
            parts[ext] = f.read(size)
            if len(parts[ext]) != size:
                raise OSError(f"{path}: member .{ext} is cut off")
    return parts


def build_index(shards: list[str], data_path: str) -> SampleIndex:
    """The index of `shards`: from `index.jsonl` beside them when there is one, else from the tars."""
    index_file = _index_file(shards, data_path)
    if index_file is not None:
        return _from_index_file(shards, index_file, data_path)
    return _from_tars(shards, data_path)


def _index_file(shards: list[str], data_path: str) -> Path | None:
    folder = Path(data_path) if os.path.isdir(data_path) else Path(shards[0]).parent
    path = folder / INDEX_NAME
    return path if path.is_file() else None


def _from_index_file(shards: list[str], index_file: Path, data_path: str) -> SampleIndex:
    position = {os.path.relpath(s, index_file.parent): i for i, s in enumerate(shards)}
    position.update({os.path.basename(s): i for i, s in enumerate(shards)})
    samples = []
    for line_no, line in enumerate(index_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            shard = position.get(record["shard"])
            key = str(record["key"])
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"data.path={data_path}: {index_file} line {line_no} is not a sample record "
                            f"({type(e).__name__}: {e})") from e
        if shard is not None:  # a pattern in data.path may select some of the set's shards
            samples.append(IndexedSample(shard, key, _meta_from(record)))
    samples.sort(key=lambda s: s.shard)  # stable: index order inside a shard
    return SampleIndex(shards, samples)


def _from_tars(shards: list[str], data_path: str) -> SampleIndex:
    samples, members, skipped = [], {}, {}
    for i, path in enumerate(shards):
        found, error = index_tar(path)
        members[i] = dict(found)
        if error:
            skipped["corrupt_tar"] = skipped.get("corrupt_tar", 0) + 1
            warnings.warn(f"data.path={data_path}: corrupt_tar in shard {path}: reading only the {len(found)} "
                          f"samples before the damage ({error})", DataWarning, stacklevel=3)
        for key, entries in found:
            samples.append(IndexedSample(i, key, _read_meta(path, entries)))
    return SampleIndex(shards, samples, members, skipped)


def _read_meta(path: str, entries: dict[str, tuple[int, int]]) -> SampleMeta:
    """A sample's metadata from its `.json` member (small); the kind from its media member."""
    kind = "image" if any(e in entries for e in IMAGE_EXTENSIONS) else None
    record = {}
    if "json" in entries and entries["json"][1] < 1 << 16:
        try:
            record = json.loads(read_members(path, {"json": entries["json"]})["json"])
        except (OSError, ValueError):
            record = {}
    if not isinstance(record, dict):
        record = {}
    if "safetensors" in entries:
        record.setdefault("kind", "latent")
    meta = _meta_from(record)
    if kind and not meta.kind:
        meta = SampleMeta(1, meta.width, meta.height, kind, meta.shape)
    return meta
