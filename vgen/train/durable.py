"""Durable files: fsync, checksums, verification, clear save errors, fault-injection points.

A checkpoint counts as complete only when `meta.json` exists; `meta.json` is written after every rank's
files were written, fsynced and checksummed, and after their directory was fsynced. So a power cut (not
only a process kill) can never leave `latest` naming a checkpoint whose bytes are not on disk, and a file
damaged later (a flipped byte, a truncation) is found at resume by its checksum.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
from pathlib import Path

CHUNK = 8 << 20


class SaveError(RuntimeError):
    """A checkpoint could not be written (full disk, permission, ...); the previous one is untouched."""


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a directory's entries (new names, renames) durable; file fsync alone does not."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)  # hashlib releases the GIL on large buffers: a writer thread barely blocks training
    return h.hexdigest()


def seal_file(path: str | Path, root: str | Path) -> tuple[str, dict]:
    """fsync `path` and describe it for meta.json: (path relative to root, {"sha256", "bytes"})."""
    path = Path(path)
    fsync_file(path)
    return str(path.relative_to(root)), {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def atomic_write_text(path: Path, text: str) -> None:
    """Write, fsync, rename over `path`, fsync the directory: readers see the old or the new text, whole."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def find_bad_file(root: Path, files: dict[str, dict], names: list[str] | None = None) -> str | None:
    """The first of `names` (default: all) in `files` that is missing, of the wrong size or checksum.

    Returns a message naming the file, or None when every file checks out.
    """
    for name in sorted(files) if names is None else names:
        want, path = files[name], root / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{path} has {size} bytes, {want['bytes']} were written (truncated or overwritten)"
        if sha256_file(path) != want["sha256"]:
            return f"{path} fails its sha256 checksum (corrupted)"
    return None


def describe_os_error(err: OSError, what: str) -> str:
    """One line a user can act on, for an OSError hit while saving `what`."""
    hints = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
             errno.EACCES: "permission denied", errno.EROFS: "the file system is read-only",
             errno.EPERM: "operation not permitted"}
    why = hints.get(err.errno, err.strerror or type(err).__name__)
    where = f" ({err.filename})" if err.filename else ""
    return (f"saving {what} failed: {why}{where}. The previous complete checkpoint is untouched; free space "
            "or fix permissions, then re-run the same command to resume from it")


def fault_point(name: str, step: int) -> None:
    """Fault injection for the kill tests and the fault campaign.

    VGEN_FAULT="<name>:<step>[:<rank>]" SIGKILLs rank <rank> (default 0) when it reaches point `name` at
    `step`; VGEN_FAULT_KILL_IN_CHECKPOINT=<step> is the older spelling of "ckpt_rank_files:<step>".
    VGEN_FAULT_ENOSPC="<name>:<step>[:<rank>]" raises ENOSPC there instead (a full disk, simulated).
    VGEN_FAULT_TERM="<name>:<step>[:<rank>|all]" sends SIGTERM (a preemption) to that rank, or to every rank
    with "all", at that exact point: the fault campaign's seeded SIGTERMs, which a wall-clock delay could not
    place (it often landed after the run's last checkpoint).
    """
    kill = os.environ.get("VGEN_FAULT", "")
    if os.environ.get("VGEN_FAULT_KILL_IN_CHECKPOINT") == str(step):
        kill = f"ckpt_rank_files:{step}"
    if _matches(kill, name, step):
        os.kill(os.getpid(), signal.SIGKILL)
    if _matches(os.environ.get("VGEN_FAULT_ENOSPC", ""), name, step):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"<injected at {name}>")
    if _matches(os.environ.get("VGEN_FAULT_TERM", ""), name, step):
        os.kill(os.getpid(), signal.SIGTERM)  # from the main thread its handler runs at once: an exact moment


def _matches(spec: str, name: str, step: int) -> bool:
    if not spec:
        return False
    parts = spec.split(":")
    rank = int(os.environ.get("RANK", "0"))
    want = parts[2] if len(parts) > 2 else "0"
    return parts[0] == name and int(parts[1]) == step and (want == "all" or rank == int(want))
