"""Video decoding and encoding with PyAV.

Training reads clips from mp4 bytes held in WebDataset shards (`decode_video`); the sampler saves its outputs
with `write_mp4`; the demo evaluator reads them back with `read_video_file`.

A clip that starts late in a long video is decoded from the nearest keyframe before it (PyAV's seek), not
from frame 0: frame index i means the i-th frame in presentation order, which we map to a timestamp by
demuxing the packets (no decoding, a small cost next to decoding a frame). Seeking gives bitwise the frames
of decoding from frame 0; any doubt on the way (no timestamps, a seek that lands after the clip, a timestamp
that is not the expected one) falls back to decoding from frame 0.

We encode H.264 with 4:4:4 chroma by default: at the demo's 32x32, 4:2:0 subsampling smears an 8-pixel shape's
colour into the background, and the demo's evaluation reads colours from pixels. Some players (browsers,
QuickTime) cannot play 4:4:4; pass `pix_fmt="yuv420p"` (even sizes only) for files meant for people.
"""

from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F


class VideoDecodeError(ValueError):
    """A video that cannot give the clip asked for. `reason` is a short tag used for skip counts."""

    def __init__(self, message: str, reason: str = "decode_error"):
        super().__init__(message)
        self.reason = reason


def _open(data: bytes):
    """Open an in-memory container that has a video stream, or raise VideoDecodeError."""
    if not data:
        raise VideoDecodeError("not a video: empty bytes", "not_a_video")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.error.FFmpegError, ValueError, OSError) as e:
        raise VideoDecodeError(f"not a video: {e}", "not_a_video") from e
    if not container.streams.video:
        container.close()
        raise VideoDecodeError("not a video: the container has no video stream", "not_a_video")
    return container


def _decode_frames(data: bytes, wanted: set[int] | None, stop: int | None) -> tuple[dict[int, np.ndarray], int]:
    """Decode frames in order, converting only those in `wanted` (all when None) to RGB.

    Args:
        stop: stop after this frame index (exclusive); None decodes to the end.
    Returns:
        (index -> uint8 (H, W, 3) frames, number of frames decoded)
    """
    frames: dict[int, np.ndarray] = {}
    count = 0
    container = _open(data)
    try:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            if wanted is None or count in wanted:
                frames[count] = frame.to_ndarray(format="rgb24")
            count += 1
            if stop is not None and count >= stop:
                break
    except av.error.FFmpegError as e:
        # A stream that breaks part-way still gives the frames decoded so far; callers check the count.
        if count == 0:
            raise VideoDecodeError(f"not a video: {e}", "not_a_video") from e
    finally:
        container.close()
    return frames, count


@dataclass
class _FrameTable:
    """Presentation timestamps of a video stream, from its packets (stream time base, ascending)."""

    pts: list[int]  # pts[i] is the timestamp of frame i
    keyframes: list[int]  # timestamps of the keyframes

    def keyframes_before(self, index: int) -> list[int]:
        """Keyframe timestamps at or before frame `index`, nearest first."""
        return sorted((k for k in self.keyframes if k <= self.pts[index]), reverse=True)


# Presentation order differs from decode order by at most the codec's reordering depth (16 frames in H.264
# and HEVC, fewer elsewhere), so the first n timestamps are known once n + this many packets are read.
_REORDER_MARGIN = 64


def _frame_table(data: bytes, need: int | None = None) -> _FrameTable | None:
    """Frame timestamps from demuxing alone; None when a packet has none (e.g. some AVIs).

    Args:
        need: the table must be right for frames [0, need) only; None reads every packet (frame count).

    We scan packets rather than read the container's index: mp4's index holds decode timestamps and
    Matroska's only keyframes, while the packets give every frame's presentation timestamp in any container.
    The scan costs ~16 us a packet here, a few percent of decoding the frames it spares.
    """
    container = _open(data)
    pts, keyframes = [], []
    try:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            if packet.size == 0 or packet.is_discard:  # the end-of-stream flush; frames an edit list drops
                continue
            if packet.pts is None:
                return None
            pts.append(packet.pts)
            if packet.is_keyframe:
                keyframes.append(packet.pts)
            if need is not None and len(pts) >= need + _REORDER_MARGIN:
                break
    except av.error.FFmpegError:
        return None
    finally:
        container.close()
    pts.sort()
    if need is not None:
        pts = pts[:need]
        keyframes = [k for k in keyframes if pts and k <= pts[-1]]
    return _FrameTable(pts, keyframes) if pts else None


def _keyframe_after_start(table: _FrameTable, index: int) -> bool:
    """Whether a keyframe later than frame 0 precedes frame `index`: only then does seeking save work."""
    nearest = table.keyframes_before(index)
    return bool(nearest) and nearest[0] > table.pts[0]


def _decode_after_seek(data: bytes, table: _FrameTable, wanted: list[int]) -> dict[int, np.ndarray] | None:
    """Frames `wanted` (ascending indices), decoded from the nearest keyframe before the first of them.

    Returns None when seeking cannot be trusted for this file; the caller then decodes from frame 0.
    """
    container = _open(data)
    try:
        stream = container.streams.video[0]
        # Some demuxers seek on decode timestamps, which can land one keyframe late: then try the one before.
        for keyframe in table.keyframes_before(wanted[0])[:2]:
            container.seek(keyframe, backward=True, any_frame=False, stream=stream)
            frames = _decode_from_position(container, stream, table, wanted)
            if frames is not None:
                return frames
        return None
    except av.error.FFmpegError:
        return None
    finally:
        container.close()


def _decode_from_position(container, stream, table: _FrameTable, wanted: list[int]) -> dict[int, np.ndarray] | None:
    """Decode forward from where the container stands; None if frame wanted[0] is not met where expected."""
    want, frames, index = set(wanted), {}, None
    target = table.pts[wanted[0]]
    for frame in container.decode(stream):
        if frame.pts is None:
            return None
        if index is None:
            if frame.pts > target:
                return None  # the seek landed after the clip's first frame
            if frame.pts < target:
                continue
            index = wanted[0]
        if frame.pts != table.pts[index]:
            return None  # a frame missing or extra: the index -> timestamp map does not hold
        if index in want:
            frames[index] = frame.to_ndarray(format="rgb24")
        if index == wanted[-1]:
            return frames
        index += 1
    return None


def _frame_count_hint(data: bytes) -> int:
    """Frame count from the container header (0 when unknown). Headers can be wrong; callers verify."""
    container = _open(data)
    try:
        return max(int(container.streams.video[0].frames or 0), 0)
    finally:
        container.close()


def _pick_start(total: int, num_frames: int, stride: int, start: int | None, rng: random.Random | None) -> int:
    span = (num_frames - 1) * stride + 1
    if total == 0:
        raise VideoDecodeError("video has no frames", "no_frames")
    if total < span:
        raise VideoDecodeError(
            f"video has {total} frames, needs {num_frames} with stride {stride}", "too_few_frames")
    if start is None:
        return rng.randint(0, total - span) if rng is not None else 0
    if start < 0 or start + span > total:
        raise VideoDecodeError(
            f"start={start} with {num_frames} frames at stride {stride} runs past the video's {total} frames",
            "too_few_frames")
    return start


def resize_center_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale (T, C, h, w) float frames so they cover (height, width), then crop the centre."""
    h, w = frames.shape[-2:]
    if (h, w) != (height, width):
        scale = max(height / h, width / w)
        # ceil-ish rounding so the scaled frame never falls a pixel short of the target
        new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
        frames = F.interpolate(frames, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        top, left = (new_h - height) // 2, (new_w - width) // 2
        frames = frames[..., top:top + height, left:left + width]
    return frames


def decode_video(data: bytes, num_frames: int, height: int, width: int, frame_stride: int = 1,
                 start: int | None = None, rng: random.Random | None = None, seek: bool = True) -> torch.Tensor:
    """Decode a clip of `num_frames` frames from encoded video bytes.

    Args:
        data: the encoded file (mp4, webm, ..., or a jpg/png/webp image: one frame).
        frame_stride: take every `frame_stride`-th source frame.
        start: index of the first source frame; None picks one at random from `rng` (0 without rng).
        seek: start decoding at the nearest keyframe before the clip (the same frames, bitwise); False
            decodes from frame 0.
    Returns:
        float32 (3, num_frames, height, width) in [-1, 1].
    Raises:
        VideoDecodeError: not a video, no frames, or too few frames for the clip.
    """
    if num_frames < 1 or frame_stride < 1:
        raise ValueError(f"num_frames={num_frames} and frame_stride={frame_stride} must be >= 1")
    total = _frame_count_hint(data)
    table = None
    if total == 0 and seek:
        table = _frame_table(data)  # Matroska/WebM headers carry no frame count; the packets do
        total = len(table.pts) if table is not None else 0
    frames: dict[int, np.ndarray] | None = None
    if total > 0:
        first = _pick_start(total, num_frames, frame_stride, start, rng)
        wanted = [first + i * frame_stride for i in range(num_frames)]
        if seek and table is None:
            table = _frame_table(data, need=wanted[-1] + 1)
        if table is not None and wanted[-1] < len(table.pts) and _keyframe_after_start(table, first):
            frames = _decode_after_seek(data, table, wanted)
        if frames is None:
            frames, decoded = _decode_frames(data, set(wanted), stop=wanted[-1] + 1)
            if decoded <= wanted[-1]:
                total = 0  # the header lied: count the frames for real below
    if total == 0:
        frames, total = _decode_frames(data, None, stop=None)
        first = _pick_start(total, num_frames, frame_stride, start, rng)
        wanted = [first + i * frame_stride for i in range(num_frames)]
    clip = torch.from_numpy(np.stack([frames[i] for i in wanted]))  # (T, h, w, 3) uint8
    clip = clip.permute(0, 3, 1, 2).float()  # (T, 3, h, w)
    clip = resize_center_crop(clip, height, width)
    clip = (clip / 127.5 - 1.0).clamp_(-1.0, 1.0)
    return clip.permute(1, 0, 2, 3).contiguous()  # (3, T, H, W)


def _as_uint8_frames(frames) -> np.ndarray:
    """uint8 (T, H, W, 3) numpy from a numpy array or tensor of that layout."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (T, H, W, 3), got {frames.dtype} {frames.shape}")
    return np.ascontiguousarray(frames)


def encode_video(frames, fps: float, qp: int = 10, pix_fmt: str = "yuv444p") -> bytes:
    """Encode uint8 (T, H, W, 3) frames as H.264 in mp4; returns the file's bytes, the same on every call.

    Args:
        qp: x264 constant quantizer (0 lossless .. 51); 10 keeps tiny shapes' colours and edges. We use a
            constant quantizer, not crf: crf's macroblock-tree lookahead gave different bytes for the same
            frames in about 1 encode in 100 here, and the demo set must be reproducible byte for byte.
        pix_fmt: "yuv444p" keeps full chroma; "yuv420p" plays everywhere but needs even sizes.
    """
    frames = _as_uint8_frames(frames)
    _, height, width, _ = frames.shape
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = {"qp": str(qp), "preset": "medium"}
        # one thread: the machine's cores belong to training, and threaded x264 is not bit-reproducible
        stream.codec_context.thread_count, stream.codec_context.thread_type = 1, "NONE"
        for index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """float (3, T, H, W) in [-1, 1] -> uint8 (T, H, W, 3); uint8 (T, H, W, 3) passes through."""
    if video.dtype == torch.uint8:
        return video
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected float video (3, T, H, W), got {tuple(video.shape)}")
    pixels = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).cpu()


def write_mp4(path: str | os.PathLike, video, fps: float, pix_fmt: str = "yuv444p") -> Path:
    """Save a video to `path` (written to a temp name, then renamed, so readers never see half a file).

    Args:
        video: float (3, T, H, W) in [-1, 1], or uint8 (T, H, W, 3) tensor / numpy array.
    """
    if isinstance(video, torch.Tensor):
        video = to_uint8_frames(video)
    data = encode_video(video, fps, pix_fmt=pix_fmt)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def read_video_file(path: str | os.PathLike) -> torch.Tensor:
    """All frames of a video file as uint8 (T, H, W, 3)."""
    data = Path(path).read_bytes()
    frames, count = _decode_frames(data, None, stop=None)
    if count == 0:
        raise VideoDecodeError(f"{path}: video has no frames", "no_frames")
    return torch.from_numpy(np.stack([frames[i] for i in range(count)]))
