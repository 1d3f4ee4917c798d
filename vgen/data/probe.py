"""Probe a video or image file with PyAV: frames, fps, width, height, duration, kind.

`prepare` (vgen/data/ingest.py) calls `probe_media` on every source file; what it returns is the metadata
stored beside the media in the shards and in `index.jsonl`, which the bucketing reads. Sizes are those of
the decoded frames, i.e. what `vgen.data.video.decode_video` gives training (rotation metadata of phone
videos is not applied there, so it is not applied here either).
"""

from __future__ import annotations

import os

import av

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
PROBE_MODES = ("decode", "packets")


class ProbeError(ValueError):
    """A file that cannot be a sample; the message is the reason listed in the prepare report."""


def media_extension(path: str | os.PathLike) -> str | None:
    """The member extension a file is stored under (jpeg -> jpg), or None when it is not a supported kind."""
    ext = os.path.splitext(str(path))[1].lower().lstrip(".")
    if ext in VIDEO_EXTENSIONS:
        return ext
    if ext in IMAGE_EXTENSIONS:
        return "jpg" if ext == "jpeg" else ext
    return None


def media_kind(ext: str) -> str:
    return "image" if ext in IMAGE_EXTENSIONS else "video"


def probe_media(path: str | os.PathLike, mode: str = "decode") -> dict:
    """Metadata of one file: {"num_frames", "fps", "width", "height", "duration", "kind"}.

    Args:
        mode: "decode" decodes every frame (exact frame count; finds damage anywhere in the file);
            "packets" demuxes every packet (counts frames, finds a cut-off file) but decodes only the first.
    Raises:
        ProbeError: unsupported extension, unreadable or corrupt file, no video stream, no frames.
    """
    ext = media_extension(path)
    if ext is None:
        raise ProbeError(f"unsupported extension {os.path.splitext(str(path))[1]!r} "
                         f"(videos: {', '.join(VIDEO_EXTENSIONS)}; images: {', '.join(IMAGE_EXTENSIONS)})")
    try:
        container = av.open(str(path), mode="r")
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise ProbeError(f"unreadable: {_why(e)}") from e
    try:
        if not container.streams.video:
            raise ProbeError("unreadable: the file has no video stream")
        stream = container.streams.video[0]
        if media_kind(ext) == "image":
            return _probe_image(container, stream)
        return _probe_video(container, stream, mode)
    finally:
        container.close()


def _probe_image(container, stream) -> dict:
    width, height, count = _decode_count(container, stream, limit=1)
    if count == 0:
        raise ProbeError("corrupt: the image decodes to no picture")
    return {"num_frames": 1, "fps": 0.0, "width": width, "height": height, "duration": 0.0, "kind": "image"}


def _probe_video(container, stream, mode: str) -> dict:
    header_frames = max(int(stream.frames or 0), 0)
    if mode == "decode":
        width, height, count = _decode_count(container, stream, limit=None)
    else:
        count = _packet_count(container, stream)
        container.seek(0, stream=stream)
        width, height, first = _decode_count(container, stream, limit=1)
        count = count if first else 0
    if count == 0:
        raise ProbeError("corrupt: no frame decodes")
    if header_frames and count < header_frames:
        raise ProbeError(f"truncated: the header promises {header_frames} frames, {count} are there")
    fps = float(stream.average_rate or stream.guessed_rate or 0)
    duration = float(stream.duration * stream.time_base) if stream.duration else (count / fps if fps else 0.0)
    return {"num_frames": count, "fps": round(fps, 6), "width": width, "height": height,
            "duration": round(duration, 6), "kind": "video"}


def _decode_count(container, stream, limit: int | None) -> tuple[int, int, int]:
    """(width, height, frames decoded), decoding at most `limit` frames; damage raises ProbeError."""
    width = height = count = 0
    try:
        for frame in container.decode(stream):
            if count == 0:
                width, height = frame.width, frame.height
            count += 1
            if limit is not None and count >= limit:
                break
    except av.error.FFmpegError as e:
        raise ProbeError(f"corrupt: decoding failed after {count} frames: {_why(e)}") from e
    return width, height, count


def _packet_count(container, stream) -> int:
    count = 0
    try:
        for packet in container.demux(stream):
            if packet.size and not packet.is_discard:  # skip the end-of-stream flush and edit-list drops
                count += 1
    except av.error.FFmpegError as e:
        raise ProbeError(f"corrupt: demuxing failed after {count} packets: {_why(e)}") from e
    return count


def _why(error: Exception) -> str:
    """FFmpeg's own words ("Invalid data found when processing input"), without errno and path."""
    return getattr(error, "strerror", None) or str(error)
