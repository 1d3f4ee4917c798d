"""One sample, read and decoded: a video clip, an image (a 1-frame clip) or a pre-encoded latent.

`load_item(task)` is the unit of work the loader hands out, inline or to a decoding worker process
(vgen/data/workers.py): it holds everything needed (where the bytes are, the bucket's shape, the clip's seed),
so the result does not depend on which process runs it.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import torch

from vgen.data.latents import LatentFormatError, unpack_sample
from vgen.data.sample_index import IMAGE_EXTENSIONS, read_members
from vgen.data.video import VideoDecodeError, decode_video, resize_center_crop

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi")


class SampleError(ValueError):
    """A sample that cannot be used; `reason` is the tag its skip is counted (or listed) under."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ItemTask:
    """Everything needed to produce one sample's tensors, picklable for a worker process.

    Args:
        kind: "videos" or "latents"; key: the sample's key (for messages).
        path, members: the shard and the sample's {ext: (offset, size)} in it.
        clip: videos: num_frames, height, width, frame_stride; latents: the latents meta of its bucket.
        seed: the clip-start seed (videos).
    """

    kind: str
    key: str
    path: str
    members: dict
    clip: dict
    seed: int


def _caption(parts: dict[str, bytes]) -> str:
    if "txt" not in parts:
        raise SampleError("no .txt member", "missing_caption")
    try:
        return parts["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise SampleError(str(e), "bad_caption") from e


def decode_image(data: bytes, height: int, width: int) -> torch.Tensor:
    """An image file's bytes -> float32 (3, 1, height, width) in [-1, 1], resized and centre-cropped."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8)
            w, h = img.size
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise SampleError(f"not an image: {e}", "not_an_image") from e
    frame = rgb.view(h, w, 3).permute(2, 0, 1)[None].float()  # (1, 3, h, w)
    frame = resize_center_crop(frame, height, width)
    return (frame / 127.5 - 1.0).clamp_(-1.0, 1.0).permute(1, 0, 2, 3).contiguous()  # (3, 1, H, W)


def decode_clip_sample(parts: dict[str, bytes], clip: dict, rng: random.Random | None = None,
                       start: int | None = None) -> tuple[torch.Tensor, str]:
    """The clip (3, T, H, W) in [-1, 1] and caption of a raw video or image sample.

    Args:
        clip: num_frames, height, width, frame_stride.
        rng, start: how the first frame is picked (see `decode_video`).
    Raises:
        SampleError: no media or caption member, an undecodable caption, or media that cannot give the clip.
    """
    video_ext = next((e for e in VIDEO_EXTENSIONS if e in parts), None)
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in parts), None)
    if video_ext is None and image_ext is None:
        raise SampleError(f"no {'/'.join(VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)} member", "missing_video")
    caption = _caption(parts)
    if video_ext is None:
        if clip["num_frames"] != 1:
            raise SampleError(f"an image cannot give {clip['num_frames']} frames", "too_few_frames")
        return decode_image(parts[image_ext], clip["height"], clip["width"]), caption
    try:
        video = decode_video(parts[video_ext], rng=rng, start=start, **clip)
    except VideoDecodeError as e:
        raise SampleError(str(e), e.reason) from e
    except Exception as e:  # a decoder bug on one odd file must not end a week-long run
        raise SampleError(f"{type(e).__name__}: {e}", "decode_error") from e
    return video, caption


def load_item(task: ItemTask) -> dict:
    """Read and decode one sample. Raises SampleError for a sample to skip."""
    if not task.members:
        raise SampleError(f"{task.path} no longer holds this sample", "missing_sample")
    try:
        parts = read_members(task.path, task.members)
    except OSError as e:
        raise SampleError(str(e), "corrupt_tar") from e
    if task.kind == "latents":
        try:
            return unpack_sample(parts, task.clip)
        except LatentFormatError as e:
            raise SampleError(str(e), e.reason) from e
    video, caption = decode_clip_sample(parts, task.clip, rng=random.Random(task.seed))
    return {"video": video, "caption": caption}


def collate(kind: str, items: list[dict]) -> dict:
    """Stack one micro-batch (all of one bucket, so of one shape)."""
    if kind == "latents":
        return {"latent": torch.stack([i["latent"] for i in items]),  # (B, C, T', H', W') float32
                "text": torch.stack([i["text"] for i in items]),  # (B, L, dim) float32
                "text_mask": torch.stack([i["text_mask"] for i in items]),  # (B, L) bool
                "caption": [i["caption"] for i in items]}
    return {"video": torch.stack([i["video"] for i in items]),  # (B, 3, T, H, W)
            "caption": [i["caption"] for i in items]}
