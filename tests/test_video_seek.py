"""Seeking in decode_video: a clip decoded from the nearest keyframe equals, bitwise, the clip decoded from
frame 0, in every container we ingest, and the seek path (not the fallback) is what produced it."""

from __future__ import annotations

import io
import random
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import vgen.data.video as video_mod
from vgen.data.video import decode_video

COUNTDOWN = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "countdown-320x240.mp4"


def encode(fmt: str, codec: str, n: int = 96, width: int = 48, height: int = 32, gop: int = 16,
           options: dict | None = None) -> bytes:
    """Synthetic frames (noise plus a moving bar, so a wrong frame shows) with a keyframe every `gop`."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.options = dict(options or {})
        for t in range(n):
            rgb = base.copy()
            rgb[(t * 5) % height] = 255
            rgb[:, (t * 3) % width, 2] = t % 256
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = t
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


@pytest.fixture
def spy(monkeypatch):
    """Records whether each seek succeeded and whether the decode-from-0 path ran."""
    calls = {"seek": [], "from_zero": 0}
    seek, from_zero = video_mod._decode_after_seek, video_mod._decode_frames

    def seek_spy(*args):
        out = seek(*args)
        calls["seek"].append(out is not None)
        return out

    def from_zero_spy(*args, **kwargs):
        calls["from_zero"] += 1
        return from_zero(*args, **kwargs)

    monkeypatch.setattr(video_mod, "_decode_after_seek", seek_spy)
    monkeypatch.setattr(video_mod, "_decode_frames", from_zero_spy)
    return calls


def _check_clips(data: bytes, total: int, height: int, width: int, spy, starts, strides=(1, 2, 3)) -> set:
    """Every clip: seek == from frame 0. Returns the (start, stride) of the clips that took the seek path."""
    seeked = set()
    for stride in strides:
        for start in starts:
            num = 8 if stride == 1 else 4
            if start + (num - 1) * stride >= total:
                continue
            spy["seek"].clear()
            spy["from_zero"] = 0
            got = decode_video(data, num, height, width, stride, start=start)
            assert spy["seek"] in ([], [True]) and spy["from_zero"] == (0 if spy["seek"] else 1), (start, stride)
            if spy["seek"]:
                seeked.add((start, stride))
            want = decode_video(data, num, height, width, stride, start=start, seek=False)
            assert torch.equal(got, want), (start, stride)
    return seeked


@pytest.mark.skipif(not COUNTDOWN.exists(), reason="../shared/data/countdown-320x240.mp4 is absent")
def test_real_clip_seeks_to_the_keyframe_and_gives_the_same_frames(spy):
    data = COUNTDOWN.read_bytes()
    table = video_mod._frame_table(data)
    assert len(table.pts) == 209 and len(table.keyframes) >= 3
    key_index = [table.pts.index(k) for k in table.keyframes]
    # around every keyframe (just before, on, just after), the middle of GOPs and the very end
    starts = sorted({max(0, k + d) for k in key_index for d in (-1, 0)} | {40, 201})
    seeked = _check_clips(data, 209, 120, 160, spy, starts, strides=(1, 3))
    # every clip that starts at or after the second keyframe took the seek path
    assert {s for s, _ in seeked} == {s for s in starts if s >= key_index[1]}


@pytest.mark.parametrize("fmt,codec,options", [
    ("mp4", "libx264", {"bf": "3"}),  # B-frames: decode order differs from presentation order
    ("matroska", "libx264", {}),
    ("webm", "libvpx-vp9", {}),
    ("mov", "mpeg4", {"bf": "2"}),
    ("avi", "mpeg4", {}),
])
def test_seeking_matches_decoding_from_frame_0(fmt, codec, options, spy):
    data = encode(fmt, codec, options=options)
    full = video_mod._frame_table(data)
    for need in (1, 17, 40):  # a clip early in the file reads only the packets it needs, with the same map
        part = video_mod._frame_table(data, need=need)
        assert part.pts == full.pts[:need] and part.keyframes == [k for k in full.keyframes if k <= part.pts[-1]]
    seeked = _check_clips(data, 96, 32, 48, spy, starts=range(0, 96, 7))
    assert len(seeked) >= 20, f"{fmt}/{codec}: only {len(seeked)} clips took the seek path"


def test_a_wrong_timestamp_map_falls_back_to_frame_0(monkeypatch, spy):
    data = encode("mp4", "libx264")
    real = video_mod._frame_table

    def shifted(data, need=None):
        table = real(data, need)
        return video_mod._FrameTable([p + 1 for p in table.pts], table.keyframes)  # no frame has these pts

    monkeypatch.setattr(video_mod, "_frame_table", shifted)
    got = decode_video(data, 8, 32, 48, start=60)
    assert spy["seek"] == [False] and spy["from_zero"] == 1
    assert torch.equal(got, decode_video(data, 8, 32, 48, start=60, seek=False))


def test_random_starts_and_frame_counts_without_a_header():
    webm = encode("webm", "libvpx-vp9", n=40)  # Matroska carries no frame count; the packets do
    assert video_mod._frame_count_hint(webm) == 0
    for seed in range(4):
        got = decode_video(webm, 5, 32, 48, 2, rng=random.Random(seed))
        assert torch.equal(got, decode_video(webm, 5, 32, 48, 2, rng=random.Random(seed), seek=False))
    with pytest.raises(video_mod.VideoDecodeError, match="40 frames"):
        decode_video(webm, 41, 32, 48)


@pytest.mark.parametrize("codec,pix_fmt", [("mjpeg", "yuvj420p"), ("png", "rgb24"), ("libwebp", "yuv420p")])
def test_images_decode_as_one_frame(codec, pix_fmt):
    rgb = np.random.default_rng(1).integers(0, 256, (40, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="image2pipe") as container:
        stream = container.add_stream(codec, rate=1)
        stream.width, stream.height, stream.pix_fmt = 24, 40, pix_fmt
        for packet in list(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format=pix_fmt))) \
                + list(stream.encode()):
            container.mux(packet)
    clip = decode_video(buf.getvalue(), 1, 40, 24)
    assert clip.shape == (3, 1, 40, 24)
    if codec == "png":  # lossless: the pixels come back exactly
        assert torch.equal(((clip[:, 0].permute(1, 2, 0) + 1) * 127.5).round().byte(), torch.from_numpy(rgb))
