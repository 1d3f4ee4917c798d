"""WebDataset shards read as an endless, exactly resumable stream for one data-parallel rank.

Each epoch the shard list is permuted with a seed from (seed, epoch) and rank r takes shards[r::dp_size], so
the ranks read disjoint shards whose union is the whole set. Inside a shard we index the tar headers (no
payload is read), group members into samples by key, and permute the samples with a seed from
(seed, epoch, shard). The position is three integers, (epoch, shard cursor, sample cursor), so a restarted
job seeks straight to its next sample: skipped samples are neither read nor decoded.

Damaged data never stops training: a corrupt tar loses the rest of that shard, a bad sample is skipped, and
both are counted and warned about once per shard.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand


class DataError(ValueError):
    """Data that cannot be used at all (missing path, no shards, too few shards for the ranks)."""


class DataWarning(UserWarning):
    """Data that was skipped: a corrupt shard or sample."""


# webdataset's rule: the key is the path up to the first dot of the file name; the rest is the extension
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


def list_shards(path: str | os.PathLike) -> list[str]:
    """The shard files named by `data.path`.

    Args:
        path: a directory (every `*.tar` in it, sorted), one `.tar` file, or a brace/glob pattern such as
            `dir/demo-{000000..000007}.tar`.
    Raises:
        DataError: the path (or a file of the pattern) does not exist, or holds no .tar shards.
    """
    path = str(path)
    if os.path.isdir(path):
        shards = sorted(str(p) for p in Path(path).glob("*.tar"))
        if not shards:
            raise DataError(f"data.path={path} holds no .tar shards")
        return shards
    if os.path.isfile(path):
        return [path]
    if "{" in path or any(c in path for c in "*?["):
        names = [n for pattern in braceexpand.braceexpand(path) for n in (sorted(glob.glob(pattern)) or [pattern])]
        missing = [n for n in names if not os.path.isfile(n)]
        if missing:
            raise DataError(f"data.path={path}: {len(missing)} of its {len(names)} shards do not exist, "
                            f"e.g. {missing[0]}")
        return names
    raise DataError(f"data.path={path} does not exist")


def derive_seed(*parts) -> int:
    """A 63-bit seed from any JSON-able parts; stable across processes (unlike hash() of a str)."""
    digest = hashlib.blake2b(json.dumps(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class Sample:
    key: str
    parts: dict[str, bytes]  # extension -> payload, e.g. {"mp4": ..., "txt": ...}
    shard: str
    epoch: int


@dataclass
class _OpenShard:
    path: str
    samples: list[tuple[str, dict[str, tuple[int, int]]]]  # key -> extension -> (offset, size)
    order: list[int]
    handle: object = None
    error: str | None = None


def index_tar(path: str) -> tuple[list[tuple[str, dict[str, tuple[int, int]]]], str | None]:
    """Samples of a tar file from its headers alone: [(key, {ext: (offset, size)})], in file order.

    Returns:
        (samples, error): on a damaged file, the samples wholly before the damage and why it stopped.
    """
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    error = None
    try:
        file_size = os.path.getsize(path)
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if member.offset_data + member.size > file_size:
                    raise tarfile.ReadError(f"{member.name} is cut off: the file ends inside it")
                match = _KEY_EXT.match(member.name)
                if member.isfile() and match:
                    samples.setdefault(match.group(1), {})[match.group(2)] = (member.offset_data, member.size)
            _check_end_of_archive(tar)
    except (tarfile.TarError, OSError, EOFError) as e:
        error = f"{type(e).__name__}: {e}"
        # the sample being read when the damage hit may have lost some of its members
        samples.pop(next(reversed(samples), None), None)
    return list(samples.items()), error


def _check_end_of_archive(tar: tarfile.TarFile) -> None:
    """tarfile ends quietly at a damaged header or a cut between members; a sound archive ends with a
    zero block, so anything else there means we lost the rest of the file."""
    tar.fileobj.seek(tar.offset)
    if tar.fileobj.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
        raise tarfile.ReadError(f"no valid tar header at byte {tar.offset}: the file is truncated or corrupt")


@dataclass
class ShardStream:
    """Endless stream of raw samples for one data-parallel rank.

    Args:
        shards: every shard of the data set (the same list, in the same order, on every rank).
        data_path: `data.path` as the user wrote it, for messages.
    """

    shards: list[str]
    dp_rank: int
    dp_size: int
    seed: int
    data_path: str
    epoch: int = 0
    shard_cursor: int = 0
    sample_cursor: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    _open: _OpenShard | None = None
    _warned: set = field(default_factory=set)
    _yielded_in_epoch: int = 0
    _empty_epochs: int = 0

    def __post_init__(self):
        if not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"dp_rank={self.dp_rank} must be in [0, dp_size={self.dp_size})")
        if len(self.shards) < self.dp_size:
            raise DataError(f"data.path={self.data_path} has {len(self.shards)} shards but dp_size="
                            f"{self.dp_size}: every data-parallel rank needs at least one shard; "
                            "write smaller shards (more of them)")

    def epoch_shards(self, epoch: int) -> list[str]:
        """This rank's shards for `epoch`, in reading order."""
        order = list(range(len(self.shards)))
        random.Random(derive_seed(self.seed, "shards", epoch)).shuffle(order)
        return [self.shards[i] for i in order[self.dp_rank::self.dp_size]]

    def _open_shard(self) -> _OpenShard:
        path = self.epoch_shards(self.epoch)[self.shard_cursor]
        samples, error = index_tar(path)
        order = list(range(len(samples)))
        random.Random(derive_seed(self.seed, "samples", self.epoch, os.path.basename(path))).shuffle(order)
        shard = _OpenShard(path, samples, order, error=error)
        # Counted on entering the shard only: a resumed position inside it was counted before the save.
        if error and self.sample_cursor == 0:
            self.skip("corrupt_tar", path, None, f"reading only the {len(samples)} samples before the damage "
                      f"({error})")
        return shard

    def _close(self) -> None:
        if self._open is not None and self._open.handle is not None:
            self._open.handle.close()
        self._open = None

    def _advance_shard(self) -> None:
        self._close()
        self.shard_cursor, self.sample_cursor = self.shard_cursor + 1, 0
        if self.shard_cursor < len(self.epoch_shards(self.epoch)):
            return
        self.epoch, self.shard_cursor = self.epoch + 1, 0
        # Two epochs in a row with nothing readable (one may have been a resumed tail) means none ever will.
        self._empty_epochs = self._empty_epochs + 1 if self._yielded_in_epoch == 0 else 0
        self._yielded_in_epoch = 0
        if self._empty_epochs >= 2:
            raise DataError(f"data.path={self.data_path}: rank {self.dp_rank}'s shards hold no readable "
                            f"samples (skipped so far: {self.skipped_by_reason})")

    def __del__(self):
        self._close()

    def __iter__(self):
        return self

    def __next__(self) -> Sample:
        while True:
            if self._open is None:
                self._open = self._open_shard()
            shard = self._open
            if self.sample_cursor >= len(shard.order):
                self._advance_shard()
                continue
            key, entries = shard.samples[shard.order[self.sample_cursor]]
            self.sample_cursor += 1
            try:
                if shard.handle is None:
                    shard.handle = open(shard.path, "rb")
                parts = {}
                for ext, (offset, size) in entries.items():
                    shard.handle.seek(offset)
                    parts[ext] = shard.handle.read(size)
                    if len(parts[ext]) != size:
                        raise OSError(f"{key}.{ext}: short read")
            except OSError as e:
                self.skip("corrupt_tar", shard.path, key, f"skipping the rest of the shard ({e})")
                self.sample_cursor = len(shard.order)
                continue
            self._yielded_in_epoch += 1
            return Sample(key, parts, shard.path, self.epoch)

    def skip(self, reason: str, shard: str, key: str | None, detail: str) -> None:
        """Count a skipped sample (or shard remainder) and warn, once per shard."""
        self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + 1
        if shard in self._warned:
            return
        self._warned.add(shard)
        where = f"sample {key!r} of " if key else ""
        warnings.warn(f"data.path={self.data_path}: {reason} in {where}shard {shard}: {detail}. Later skips in "
                      "this shard are counted in stats(), not warned about.", DataWarning, stacklevel=2)

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_reason.values())

    def state_dict(self) -> dict:
        """The position of the next sample, plus what is needed to check it still means the same thing."""
        return {"epoch": self.epoch, "shard_cursor": self.shard_cursor, "sample_cursor": self.sample_cursor,
                "seed": self.seed, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                "num_shards": len(self.shards), "skipped_by_reason": dict(self.skipped_by_reason)}

    def load_state_dict(self, state: dict) -> None:
        """Seek to a saved position. A position saved under another layout (dp_size, shard count, seed)
        does not transfer; we then restart its epoch from the beginning, with a warning."""
        self._close()
        self.skipped_by_reason = dict(state.get("skipped_by_reason", {}))
        self.epoch, self.shard_cursor, self.sample_cursor = int(state["epoch"]), 0, 0
        layout = {"seed": self.seed, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                  "num_shards": len(self.shards)}
        changed = {k: (state.get(k), v) for k, v in layout.items() if state.get(k) != v}
        if changed:
            warnings.warn(f"data.path={self.data_path}: the saved data position was for another layout "
                          f"(saved, now: {changed}); restarting epoch {self.epoch} from its start", DataWarning)
            return
        self.shard_cursor, self.sample_cursor = int(state["shard_cursor"]), int(state["sample_cursor"])
