"""WebDataset shards: listing them (`data.path`), reading a tar's sample index from its headers, and the
errors and warnings of damaged data.

The reading order of samples is not decided here but globally, over every shard's samples
(vgen/data/sample_index.py, vgen/data/order.py), so that it does not depend on the number of ranks.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tarfile
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
