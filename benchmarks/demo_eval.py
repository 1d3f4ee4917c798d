"""Prompt-following of the demo model, measured from pixels.

For each generated clip we find the moving shape (pixels far from the near-black background), classify its
mean colour to the nearest demo colour and its motion to the dominant direction of its centroid track, and
compare with what the prompt asked for. No learned judge: the figures mean exactly what they say. On the
ground-truth demo clips the classifier scores 100% (tests/test_demo_data.py).

    python benchmarks/demo_eval.py runs/demo/samples                     # a sampler's output directory
    python benchmarks/demo_eval.py runs/demo/samples/manifest.jsonl --out benchmarks/results/demo_eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import torch

# this checkout's vgen, also when another copy is installed (as launch/*.py do)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vgen.data.demo import COLOURS, SHAPES, _shape_mask, default_shape_size, parse_prompt  # noqa: E402
from vgen.data.video import read_video_file  # noqa: E402

# A pixel is foreground when some channel is this far from the background. Demo colours differ from it by
# ~200; 60 leaves room for a model's washed-out colours while staying above compression and sampling noise.
FOREGROUND_THRESHOLD = 60
# Below this the centroid has not moved: "no direction" rather than a coin toss.
MIN_DISPLACEMENT = 1.0
# Fewer foreground pixels than this fraction is noise, not a shape (a demo shape covers 9-14% of the frame).
MIN_FOREGROUND = 0.005


def _chroma(rgb: np.ndarray) -> np.ndarray:
    """Unit vector of the colour with its grey part removed, so brightness and haze do not matter."""
    rgb = np.asarray(rgb, dtype=np.float64)
    rgb = rgb - rgb.min(axis=-1, keepdims=True)
    return rgb / np.maximum(np.linalg.norm(rgb, axis=-1, keepdims=True), 1e-6)


_COLOUR_NAMES = list(COLOURS)
_COLOUR_CHROMA = _chroma(np.array([COLOURS[c] for c in _COLOUR_NAMES]))


def _direction(centroids: list[tuple[int, float, float]]) -> tuple[str | None, float, float]:
    """Dominant direction of a centroid track [(t, x, y)] from a least-squares line through it (steadier
    than first-vs-last when a frame is blurred), as (name, dx, dy) over the track's length."""
    if len(centroids) < 2:
        return None, 0.0, 0.0
    t, x, y = (np.array(v, dtype=np.float64) for v in zip(*centroids))
    span = t[-1] - t[0]
    dx, dy = np.polyfit(t, x, 1)[0] * span, np.polyfit(t, y, 1)[0] * span
    if max(abs(dx), abs(dy)) < MIN_DISPLACEMENT:
        return None, float(dx), float(dy)
    if abs(dx) >= abs(dy):
        return ("right" if dx > 0 else "left"), float(dx), float(dy)
    return ("down" if dy > 0 else "up"), float(dx), float(dy)


def _shape_box_fill(mask: np.ndarray) -> str:
    """The classifier before: circle or square from how much of its bounding box the blob fills (pi/4 vs 1).
    One stray or blurred pixel beside the blob widens the box, so ragged generated squares read as circles;
    kept beside the area classifier for comparison (`shape_box_fill` in the rows)."""
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    return SHAPES[0] if len(ys) / box < (np.pi / 4 + 1) / 2 else SHAPES[1]


def _touches_border(mask: np.ndarray) -> bool:
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def _shape(distance: np.ndarray, mask: np.ndarray, size: int) -> str:
    """Circle or square from the shape's area, against the two demo shapes' pixel counts at its size.

    Both shapes fill the same size x size box; the circle lacks the corners (24 of 36 pixels at 6 px), so the
    area is what tells them apart. A pixel counts when it is more shape than background (over half the
    blob's contrast: a generated shape's soft halo does not), in the frames where the shape lies wholly
    inside the picture (median over them; the frame with the most foreground if none does).
    """
    contrast = np.percentile(distance[mask], 90)
    half = distance > contrast / 2  # (T, H, W)
    inside = [f for f in range(len(half)) if mask[f].any() and not _touches_border(half[f])]
    frames = inside or [int(mask.sum(axis=(1, 2)).argmax())]
    area = float(np.median([half[f].sum() for f in frames]))
    cut = (_shape_mask("circle", size).sum() + size * size) / 2
    return SHAPES[1] if area > cut else SHAPES[0]


def classify_clip(frames, shape_size: int | None = None) -> dict:
    """Colour, direction and shape of the moving shape in uint8 (T, H, W, 3) frames.

    shape_size: the demo shapes' side in pixels (default: the demo's, 3/8 of the frame's smaller side).

    Returns:
        {"found": bool, "colour": name or None, "colour_score": cosine to that colour, "direction": name or
        None, "dx", "dy": centroid displacement in pixels, "shape": name or None, "shape_box_fill": the classifier
        before (`_shape_box_fill`), "foreground": fraction}
    """
    frames = np.asarray(frames)
    pixels = frames.reshape(-1, 3).astype(np.float64)
    background = np.median(pixels, axis=0)  # the shape covers at most 14% of the frame: the median is background
    distance = np.abs(frames.astype(np.float64) - background).max(axis=-1)  # (T, H, W)
    mask = distance > FOREGROUND_THRESHOLD
    result = {"found": bool(mask.mean() >= MIN_FOREGROUND), "colour": None, "colour_score": 0.0,
              "direction": None, "dx": 0.0, "dy": 0.0, "shape": None, "shape_box_fill": None,
              "foreground": float(mask.mean())}
    if not result["found"]:
        return result
    mean = frames[mask].astype(np.float64).mean(axis=0)
    scores = _COLOUR_CHROMA @ _chroma(mean - background)
    result["colour"] = _COLOUR_NAMES[int(scores.argmax())]
    result["colour_score"] = float(scores.max())
    centroids = [(t, float(np.nonzero(m)[1].mean()), float(np.nonzero(m)[0].mean()))
                 for t, m in enumerate(mask) if m.any()]
    result["direction"], result["dx"], result["dy"] = _direction(centroids)
    result["shape"] = _shape(distance, mask, shape_size or default_shape_size(*frames.shape[1:3]))
    result["shape_box_fill"] = _shape_box_fill(mask[int(mask.sum(axis=(1, 2)).argmax())])
    return result


def _read_manifest(manifest_path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(manifest_path.read_text().splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if "prompt" not in row or "path" not in row:
                raise ValueError(f"{manifest_path}:{number}: a row needs 'prompt' and 'path', got {row}")
            rows.append(row)
    return rows


def evaluate(manifest_path) -> dict:
    """Score the clips listed in a sampler's manifest.jsonl (lines {"prompt": str, "path": str}).

    Args:
        manifest_path: the manifest, or the directory holding `manifest.jsonl`. Relative clip paths are
            taken from the manifest's directory.
    Returns:
        {"n", "colour_accuracy", "direction_accuracy", "shape_accuracy", "shape_accuracy_box_fill" (the
        classifier before), "both_accuracy" (colour and direction right), "colours_covered",
        "directions_covered", "rows"}
    """
    manifest_path = Path(manifest_path)
    if manifest_path.is_dir():
        manifest_path = manifest_path / "manifest.jsonl"
    rows = []
    for entry in _read_manifest(manifest_path):
        want = parse_prompt(entry["prompt"])
        path = Path(entry["path"])
        path = path if path.is_absolute() else manifest_path.parent / path
        got = classify_clip(read_video_file(path).numpy())
        rows.append({"prompt": entry["prompt"], "path": str(path), "want": want, "got": got,
                     "colour_ok": got["colour"] == want["colour"],
                     "direction_ok": got["direction"] == want["direction"],
                     "shape_ok": got["shape"] == want["shape"], "shape_box_fill_ok": got["shape_box_fill"] == want["shape"]})
    n = len(rows)

    def accuracy(*keys: str) -> float:
        return sum(all(r[k] for k in keys) for r in rows) / n if n else 0.0

    return {"n": n, "colour_accuracy": accuracy("colour_ok"), "direction_accuracy": accuracy("direction_ok"),
            "shape_accuracy": accuracy("shape_ok"), "shape_accuracy_box_fill": accuracy("shape_box_fill_ok"),
            "both_accuracy": accuracy("colour_ok", "direction_ok"),
            "colours_covered": sorted({r["want"]["colour"] for r in rows}),
            "directions_covered": sorted({r["want"]["direction"] for r in rows}), "rows": rows}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", help="the sampler's output directory or its manifest.jsonl")
    parser.add_argument("--out", help="write the figures and per-clip rows to this JSON file")
    args = parser.parse_args(argv)
    result = evaluate(args.samples)
    print(f"demo prompt-following over {result['n']} clips ({len(result['colours_covered'])} colours, "
          f"{len(result['directions_covered'])} directions)")
    for key in ("colour_accuracy", "direction_accuracy", "both_accuracy", "shape_accuracy", "shape_accuracy_box_fill"):
        print(f"  {key.replace('_', ' '):30s} {result[key]:.3f}")
    if args.out:
        write_record(args.out, "benchmarks/demo_eval.py", argv, {"samples": str(args.samples), **result})
    return result


def write_record(out, script: str, argv: list[str] | None, result: dict) -> None:
    """`result` as JSON at `out`, with the command, device, commit and versions it came from."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    record = {"command": " ".join(["python", script, *(sys.argv[1:] if argv is None else argv)]), "device": device,
              "git_commit": _git_commit(), "python": sys.version.split()[0], "torch": torch.__version__,
              "av": av.__version__, **result}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
