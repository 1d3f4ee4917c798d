"""Decode time of an 8-frame clip from a long video: seeking to the nearest keyframe vs decoding from frame 0.

    python benchmarks/data_seek.py                       # >= 60 s video built from the real countdown clip
    python benchmarks/data_seek.py --seconds 120 --keyint 60 --repeats 9

The long video is the real 7 s countdown clip (../shared/data, 320x240, 29.97 fps) looped to `--seconds` and
re-encoded with x264 at `--keyint` (250, x264's default, unless told; synthetic frames when the clip is
absent). Each repeat times `decode_video` on the same bytes with `seek=True` and `seek=False`, in
alternating order, for a clip at the very end and, as a control, one at frame 0 (where seeking can only
add its packet scan). The two paths' clips are checked to be bitwise equal. Writes
benchmarks/results/data_seek_cpu.json (command, device, commit, versions, raw times, median ratio).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vgen.data.video import _frame_table, decode_video, read_video_file  # noqa: E402

COUNTDOWN = ROOT.parent / "shared" / "data" / "countdown-320x240.mp4"


def source_frames() -> tuple[np.ndarray, Fraction, str]:
    """(uint8 frames (T, H, W, 3), fps, what they are)."""
    if COUNTDOWN.exists():
        return read_video_file(COUNTDOWN).numpy(), Fraction(30000, 1001), str(COUNTDOWN.name)
    rng = np.random.default_rng(0)
    frames = np.repeat(rng.integers(0, 256, (1, 240, 320, 3), dtype=np.uint8), 210, axis=0)
    for t in range(len(frames)):
        frames[t, (t * 7) % 240] = 255
    return frames, Fraction(30), "synthetic 320x240 frames (countdown clip absent)"


def build_long_video(frames: np.ndarray, fps: Fraction, seconds: float, keyint: int) -> tuple[bytes, int]:
    """H.264 mp4 of `frames` looped to at least `seconds`; returns (bytes, frame count)."""
    total = int(np.ceil(seconds * fps))
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.gop_size = keyint
        stream.options = {"preset": "veryfast"}
        for t in range(total):
            frame = av.VideoFrame.from_ndarray(frames[t % len(frames)], format="rgb24")
            frame.pts = t
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue(), total


def time_clip(data: bytes, start: int, repeats: int, num_frames: int, height: int, width: int) -> dict:
    """Alternately timed seek / from-0 decodes of one clip; raw seconds, medians, ratio."""
    times = {"seek": [], "from_frame_0": []}
    for r in range(repeats):
        order = ("seek", "from_frame_0") if r % 2 == 0 else ("from_frame_0", "seek")
        for variant in order:
            t0 = time.perf_counter()
            decode_video(data, num_frames, height, width, start=start, seek=variant == "seek")
            times[variant].append(time.perf_counter() - t0)
    seek = decode_video(data, num_frames, height, width, start=start, seek=True)
    full = decode_video(data, num_frames, height, width, start=start, seek=False)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"start": start, "num_frames": num_frames, "bitwise_equal": bool(torch.equal(seek, full)),
            "seconds": times, "median_s": medians, "speedup_from_frame_0_over_seek":
            medians["from_frame_0"] / medians["seek"]}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=64.0)
    parser.add_argument("--keyint", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_seek_cpu.json"))
    args = parser.parse_args(argv)

    frames, fps, what = source_frames()
    t0 = time.perf_counter()
    data, total = build_long_video(frames, fps, args.seconds, args.keyint)
    build_s = time.perf_counter() - t0
    height, width = frames.shape[1:3]
    t0 = time.perf_counter()
    table = _frame_table(data)
    scan_s = time.perf_counter() - t0
    clips = {"end": time_clip(data, total - args.frames, args.repeats, args.frames, height, width),
             "first": time_clip(data, 0, args.repeats, args.frames, height, width)}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    record = {
        "command": " ".join(["python", "benchmarks/data_seek.py", *(sys.argv[1:] if argv is None else argv)]),
        "device": device, "git_commit": _git_commit(), "python": sys.version.split()[0], "torch": torch.__version__,
        "av": av.__version__, "ffmpeg": {k: ".".join(map(str, v)) for k, v in av.library_versions.items()},
        "video": {"source": what, "frames": total, "fps": float(fps), "seconds": total / float(fps),
                  "width": width, "height": height, "codec": "h264 (libx264 veryfast, yuv420p)",
                  "keyint": args.keyint, "keyframes": len(table.keyframes), "bytes": len(data),
                  "build_s": build_s, "packet_scan_s": scan_s},
        "clips": clips,
        "ratio_end_clip": clips["end"]["speedup_from_frame_0_over_seek"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    for name, clip in clips.items():
        m = clip["median_s"]
        print(f"{name:5s} clip (start {clip['start']} of {total} frames): seek {m['seek'] * 1e3:.1f} ms, "
              f"from frame 0 {m['from_frame_0'] * 1e3:.1f} ms, ratio {clip['speedup_from_frame_0_over_seek']:.2f}x, "
              f"bitwise equal: {clip['bitwise_equal']}")
    print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()
