"""The built-in demo dataset: coloured shapes moving in named directions.

Each clip shows one saturated circle or square (3/8 of the frame's side) on a near-black background,
starting near the centre and moving a pixel or more per frame in one of four directions, captioned e.g.
"a red circle moving left". The vocabulary is small enough that a tiny DiT learns it on a CPU in minutes,
and its prompt-following can be measured from pixels alone (`benchmarks/demo_eval.py`), with no learned judge.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import random
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import webdataset as wds

from vgen.data.shards import DataError
from vgen.data.video import encode_video

# Off-pure values: full 0/255 channels clip in the YUV round trip and nothing is gained by them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (25, 230, 25),
    "blue": (25, 25, 230),
    "yellow": (230, 230, 25),
    "magenta": (230, 25, 230),
    "cyan": (25, 230, 230),
}
SHAPES: tuple[str, ...] = ("circle", "square")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
# (dx, dy) per unit of motion; image rows grow downwards, so "up" is negative y
MOTION: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MARKER = "_COMPLETE"
SHARD_PATTERN = "demo-{:06d}.tar"


def caption(colour: str, shape: str, direction: str) -> str:
    return f"a {colour} {shape} moving {direction}"


def parse_prompt(text: str) -> dict[str, str]:
    """Read (colour, shape, direction) from a demo prompt; raises ValueError when one is missing."""
    words = re.findall(r"[a-z]+", text.lower())
    found = {}
    for field, vocab in (("colour", COLOURS), ("shape", SHAPES), ("direction", DIRECTIONS)):
        hits = [w for w in words if w in vocab]
        if not hits:
            raise ValueError(f"prompt {text!r} names no demo {field} (one of {list(vocab)})")
        found[field] = hits[0]
    return found


def eval_prompts(n: int = 24) -> list[str]:
    """A fixed list of demo prompts; the first 24 hold every (colour, direction) pair once, both shapes
    for every colour, and the first 48 hold every (colour, shape, direction) once."""
    if n < len(COLOURS):
        raise ValueError(f"n={n}: need at least {len(COLOURS)} prompts to cover every colour")
    prompts = []
    for i in range(n):
        k = i // len(COLOURS)  # round of colours; stepping direction by 7 (3 mod 4) per round visits all 4
        colour = list(COLOURS)[i % len(COLOURS)]
        direction = DIRECTIONS[(k + i) % len(DIRECTIONS)]
        shape = SHAPES[(k + i + i // 24) % len(SHAPES)]
        prompts.append(caption(colour, shape, direction))
    return prompts


def _shape_mask(shape: str, size: int) -> np.ndarray:
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    # pixels whose centres lie within size/2 - 1/4 of the middle: at 6 px an octagon of 24 pixels (a disc
    # that touches the edges keeps all but the 4 corner pixels, too close to the square to tell apart)
    centre = (size - 1) / 2
    yy, xx = np.mgrid[:size, :size]
    return (yy - centre) ** 2 + (xx - centre) ** 2 <= (size / 2 - 0.25) ** 2


def default_shape_size(height: int, width: int) -> int:
    """A demo shape's side: 3/8 of the frame's smaller side (6 px in the 16x16 demo)."""
    return max(2, round(min(height, width) * 3 / 8))


def render_clip(colour: str, shape: str, direction: str, num_frames: int, height: int, width: int,
                rng: random.Random, size: int | None = None, layout: str = "centre") -> tuple[np.ndarray, dict]:
    """Draw one clip; returns uint8 (T, H, W, 3) frames and its metadata.

    layout "centre" (the demo's): the shape starts within a pixel or two of the frame's centre and moves
    outwards, sliding partly out of the frame by the end, so the first frame says nothing about the direction
    and the words fix the path (README, "The demo"). layout "inside" (the demo before; kept to reproduce the
    ablation records): the start is drawn anywhere the shape stays wholly inside for the whole clip, so it
    must start on the side it moves away from.
    """
    if num_frames < 2:
        raise ValueError(f"num_frames={num_frames}: a moving shape needs at least 2 frames")
    if layout not in ("centre", "inside"):
        raise ValueError(f"layout={layout!r} must be 'centre' or 'inside'")
    size = size or default_shape_size(height, width)
    dx, dy = MOTION[direction]
    axis_len, across_len = (width, height) if dx else (height, width)
    if layout == "inside":
        max_speed = (axis_len - size) // (num_frames - 1)
    else:  # half the shape may leave the frame by the last frame
        max_speed = ((axis_len - size) // 2 + size // 2) // (num_frames - 1)
    if max_speed < 1:
        raise ValueError(f"{num_frames} frames of {height}x{width}: a {size}-pixel shape cannot move "
                         "one pixel per frame and stay inside; use fewer frames or larger ones")
    speed = rng.randint((max_speed + 1) // 2, max_speed)
    travel = speed * (num_frames - 1)
    if layout == "inside":
        along = rng.randint(0, axis_len - size - travel) + (travel if dx + dy < 0 else 0)
        across = rng.randint(0, across_len - size)
    else:
        jitter = max(1, (min(height, width) - size) // 8)
        along = (axis_len - size) // 2 + rng.randint(-jitter, jitter)
        across = (across_len - size) // 2 + rng.randint(-jitter, jitter)
    x0, y0 = (along, across) if dx else (across, along)
    background = rng.randint(0, 16)
    frames = paint_track(colour, shape, size, (x0, y0), (dx * speed, dy * speed), num_frames, height, width, background)
    meta = {"colour": colour, "shape": shape, "direction": direction, "speed": speed,
            "x0": x0, "y0": y0, "size": size, "background": background}
    return frames, meta


def paint_track(colour: str, shape: str, size: int, start: tuple[int, int], step: tuple[int, int], num_frames: int,
                height: int, width: int, background: int) -> np.ndarray:
    """uint8 (T, H, W, 3) frames of one shape moving `step` (dx, dy) pixels per frame from `start` (x, y)."""
    frames = np.full((num_frames, height, width, 3), background, dtype=np.uint8)
    mask = _shape_mask(shape, size)
    for t in range(num_frames):
        x, y = start[0] + step[0] * t, start[1] + step[1] * t
        # the part of the shape inside the frame (it may have slid partly out)
        top, left = max(y, 0), max(x, 0)
        bottom, right = min(y + size, height), min(x + size, width)
        if bottom > top and right > left:
            frames[t, top:bottom, left:right][mask[top - y:bottom - y, left - x:right - x]] = COLOURS[colour]
    return frames


@contextmanager
def _dir_lock(out_dir: Path):
    """An exclusive lock on `out_dir`, so ranks sharing a machine build the set once.

    flock is per open file and released when the process dies, so a crashed writer never wedges the others.
    """
    with open(out_dir / ".demo.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_complete(out_dir: Path, params: dict) -> list[Path] | None:
    marker = out_dir / MARKER
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    shards = [out_dir / name for name in recorded.get("shards", [])]
    if recorded.get("params") != params or not all(p.is_file() for p in shards):
        return None
    return shards


def _clip_identity(meta: dict) -> tuple:
    """What makes two demo clips the same video."""
    return tuple(meta[k] for k in ("colour", "shape", "direction", "speed", "x0", "y0", "size", "background"))


def _render_indexed(i: int, combo: tuple, params: dict, exclude: frozenset = frozenset()):
    """Clip i of a set; redrawn (with a new RNG stream) while it equals a clip in `exclude`."""
    for attempt in range(1000):
        suffix = f"-{attempt}" if attempt else ""  # attempt 0 keeps the stream older sets were made with
        rng = random.Random(f"{params['seed']}-clip-{i}{suffix}")
        frames, meta = render_clip(*combo, params["num_frames"], params["height"], params["width"], rng)
        if _clip_identity(meta) not in exclude:
            return frames, meta
    raise RuntimeError(f"no demo clip {combo} outside the excluded set after 1000 draws")


def _combos(num_clips: int, seed: int) -> list[tuple]:
    # Every (colour, shape, direction) once per round of 48 clips, in a seeded order, so small sets stay balanced.
    every = list(itertools.product(COLOURS, SHAPES, DIRECTIONS))
    order_rng = random.Random(f"{seed}-combos")
    combos = []
    while len(combos) < num_clips:
        order_rng.shuffle(every)
        combos += every
    return combos


def _write_shard(path: Path, start: int, stop: int, combos: list[tuple], params: dict,
                 exclude: frozenset = frozenset()) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with wds.TarWriter(str(tmp), mtime=0) as sink:  # fixed mtime: same seed, same bytes
        for i in range(start, stop):
            frames, meta = _render_indexed(i, combos[i], params, exclude)
            sink.write({"__key__": f"{i:06d}", "mp4": encode_video(frames, params["fps"]),
                        "txt": caption(*combos[i]), "json": json.dumps(meta, sort_keys=True)})
    os.replace(tmp, path)


def demo_clip_identities(num_clips: int, num_frames: int, height: int, width: int, seed: int = 0) -> frozenset:
    """The identities of the clips `write_demo_shards` draws with these settings (rendered, not encoded)."""
    params = {"num_frames": num_frames, "height": height, "width": width, "seed": seed}
    return frozenset(_clip_identity(_render_indexed(i, combo, params)[1])
                     for i, combo in enumerate(_combos(num_clips, seed)))


def write_demo_shards(out_dir, num_clips: int = 512, clips_per_shard: int = 64, num_frames: int = 8,
                      height: int = 32, width: int = 32, fps: int = 8, seed: int = 0,
                      exclude: frozenset = frozenset()) -> list[Path]:
    """Write the demo dataset as WebDataset shards `demo-000000.tar`, ... in `out_dir`.

    Each sample holds `{key}.mp4`, `{key}.txt` (caption) and `{key}.json` (colour, shape, direction, ...).
    A complete set with the same parameters (its `_COMPLETE` marker is written last) is left as it is;
    anything else there is rewritten. Safe to call from several processes at once.

    Args:
        exclude: clip identities never to write (a validation set excludes the training clips).
    Returns:
        the shard paths, sorted.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {"num_clips": num_clips, "clips_per_shard": clips_per_shard, "num_frames": num_frames,
              "height": height, "width": width, "fps": fps, "seed": seed}
    if exclude:  # the marker must tell a validation set from a training set of the same seed
        params["excluded"] = hashlib.sha256(repr(sorted(exclude)).encode()).hexdigest()[:16]
    with _dir_lock(out_dir):
        shards = _is_complete(out_dir, params)
        if shards is not None:
            return shards
        _refuse_foreign_data(out_dir)
        (out_dir / MARKER).unlink(missing_ok=True)
        for stale in out_dir.glob("demo-*.tar"):
            stale.unlink()
        combos = _combos(num_clips, seed)
        shards = []
        for index, start in enumerate(range(0, num_clips, clips_per_shard)):
            shards.append(out_dir / SHARD_PATTERN.format(index))
            _write_shard(shards[-1], start, min(start + clips_per_shard, num_clips), combos, params, exclude)
        marker = {"params": params, "shards": [p.name for p in shards]}
        tmp = out_dir / f".{MARKER}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(marker, indent=1))
        os.replace(tmp, out_dir / MARKER)
    return shards


def _refuse_foreign_data(out_dir: Path) -> None:
    """The demo must never write into (and then train on) a user's own shard folder: with the default
    `experiment=demo`, `data.path=MY_SHARDS` alone would otherwise mix the demo clips into the user's set."""
    foreign = [p.name for p in out_dir.iterdir() if p.name == "index.jsonl" or
               (p.suffix == ".tar" and not p.name.startswith("demo-"))]
    if foreign:
        raise DataError(f"data.path={out_dir} holds other data ({foreign[0]}, ...): set data.make_demo=false "
                        "to train on it (data.make_demo=true would write the demo shards there)")


VAL_SEED = 1_000_003  # the demo validation set's seed; its clips are redrawn where they equal a training clip


def write_demo_val_shards(data_cfg) -> list[Path]:
    """The demo's held-out set at `data.val_path`: `data.val_clips` clips that the training set at
    `data.path` (built by `make_demo_if_asked` from the same settings) does not contain."""
    span = max(2, (data_cfg.num_frames - 1) * data_cfg.frame_stride + 1)
    train = demo_clip_identities(data_cfg.demo_clips, span, data_cfg.height, data_cfg.width)
    return write_demo_shards(str(data_cfg.val_path), num_clips=data_cfg.val_clips,
                             clips_per_shard=data_cfg.demo_clips_per_shard, num_frames=span,
                             height=data_cfg.height, width=data_cfg.width, seed=VAL_SEED, exclude=train)
