"""The training loader: shards -> decoded, batched clips (or pre-encoded latents) for one data-parallel rank.

`build_loader(cfg.data, dp_rank, dp_size, seed)` is all the trainer calls. The loader knows its rank and the
number of ranks and nothing else about the job (no torch.distributed here). Its `state_dict()` is the exact
position after the last batch handed out, so a resumed job sees exactly the batches an uninterrupted one
would have; clip start frames are drawn from (seed, epoch, shard, key) for the same reason.
"""

from __future__ import annotations

import os
import queue
import random
import threading

import torch

from vgen.data.demo import write_demo_shards
from vgen.data.latents import LatentFormatError, read_meta, read_null_text, unpack_sample
from vgen.data.shards import DataError, Sample, ShardStream, derive_seed, list_shards
from vgen.data.video import VideoDecodeError, decode_video

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi")


class SampleError(ValueError):
    """A sample that cannot be used; `reason` is the tag its skip is counted (or listed) under."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def decode_clip_sample(parts: dict[str, bytes], clip: dict, rng: random.Random | None = None,
                       start: int | None = None) -> tuple[torch.Tensor, str]:
    """The clip (3, T, H, W) in [-1, 1] and caption of a raw video sample.

    Args:
        clip: num_frames, height, width, frame_stride.
        rng, start: how the first frame is picked (see `decode_video`).
    Raises:
        SampleError: no video or caption member, an undecodable caption, or a video that cannot give the clip.
    """
    video_ext = next((e for e in VIDEO_EXTENSIONS if e in parts), None)
    if video_ext is None:
        raise SampleError(f"no {'/'.join(VIDEO_EXTENSIONS)} member", "missing_video")
    if "txt" not in parts:
        raise SampleError("no .txt member", "missing_caption")
    try:
        caption = parts["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise SampleError(str(e), "bad_caption") from e
    try:
        video = decode_video(parts[video_ext], rng=rng, start=start, **clip)
    except VideoDecodeError as e:
        raise SampleError(str(e), e.reason) from e
    except Exception as e:  # a decoder bug on one odd file must not end a week-long run
        raise SampleError(f"{type(e).__name__}: {e}", "decode_error") from e
    return video, caption


class _BatchMaker:
    """Pulls raw samples from the stream, decodes them (`decode`, per kind), skips the bad ones, and
    collates batches.

    Kept apart from the loader so a prefetch thread can hold it without keeping the loader alive.
    """

    def __init__(self, stream: ShardStream, micro_batch: int):
        self.stream, self.micro_batch = stream, micro_batch
        self._last_good_epoch = stream.epoch

    def decode(self, sample: Sample) -> dict:
        """One sample's fields; raises SampleError for a sample to skip."""
        raise NotImplementedError

    def collate(self, items: list[dict]) -> dict:
        raise NotImplementedError

    def _skip(self, sample: Sample, reason: str, detail: str) -> None:
        self.stream.skip(reason, sample.shard, sample.key, detail)
        # A whole epoch without one usable sample would otherwise spin forever.
        if self.stream.epoch >= self._last_good_epoch + 2:
            raise DataError(f"data.path={self.stream.data_path}: no decodable sample in a whole epoch on rank "
                            f"{self.stream.dp_rank} (skipped: {self.stream.skipped_by_reason})")

    def next_batch(self) -> tuple[dict, dict]:
        """The next batch and the stream position after it."""
        items = []
        while len(items) < self.micro_batch:
            sample = next(self.stream)
            try:
                item = self.decode(sample)
            except SampleError as e:
                self._skip(sample, e.reason, str(e))
                continue
            self._last_good_epoch = sample.epoch
            items.append({**item, "key": sample.key})
        return self.collate(items), self.stream.state_dict()


class _VideoBatchMaker(_BatchMaker):
    def __init__(self, stream: ShardStream, clip: dict, micro_batch: int, seed: int):
        super().__init__(stream, micro_batch)
        self.clip, self.seed = clip, seed

    def decode(self, sample: Sample) -> dict:
        # the clip start comes from the sample's identity, so a resumed run draws the same one
        rng = random.Random(derive_seed(self.seed, "clip", sample.epoch, os.path.basename(sample.shard),
                                        sample.key))
        video, caption = decode_clip_sample(sample.parts, self.clip, rng=rng)
        return {"video": video, "caption": caption}

    def collate(self, items: list[dict]) -> dict:
        return {"video": torch.stack([i["video"] for i in items]),  # (B, 3, T, H, W)
                "caption": [i["caption"] for i in items], "key": [i["key"] for i in items]}


class _LatentBatchMaker(_BatchMaker):
    def __init__(self, stream: ShardStream, meta: dict, micro_batch: int):
        super().__init__(stream, micro_batch)
        self.meta = meta

    def decode(self, sample: Sample) -> dict:
        try:
            return unpack_sample(sample.parts, self.meta)
        except LatentFormatError as e:
            raise SampleError(str(e), e.reason) from e

    def collate(self, items: list[dict]) -> dict:
        return {"latent": torch.stack([i["latent"] for i in items]),  # (B, C, T', H', W') float32
                "text": torch.stack([i["text"] for i in items]),  # (B, L, dim) float32
                "text_mask": torch.stack([i["text_mask"] for i in items]),  # (B, L) bool
                "caption": [i["caption"] for i in items], "key": [i["key"] for i in items]}


def _produce(maker: _BatchMaker, out: queue.Queue, stop: threading.Event) -> None:
    """Prefetch thread body: batches (or the exception that ended them) go to `out`, in order."""
    def put(item) -> None:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    try:
        while not stop.is_set():
            put(maker.next_batch())
    except BaseException as e:  # handed to the consumer, which raises it on its thread
        put(e)


class ShardLoader:
    """Endless iterator of batches for one data-parallel rank, exactly resumable from `state_dict()`.

    Video batches: {"video": (B, 3, T, H, W) in [-1, 1], "caption": [str], "key": [str]}.

    Args:
        prefetch: batches decoded ahead on a background thread (0: decode on the caller's thread).
    """

    def __init__(self, maker: _BatchMaker, prefetch: int = 2):
        self._maker, self._prefetch = maker, prefetch
        self._state = maker.stream.state_dict()
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._prefetch <= 0:
            batch, self._state = self._maker.next_batch()
            return batch
        if self._thread is None:
            self._queue, self._stop = queue.Queue(maxsize=self._prefetch), threading.Event()
            self._thread = threading.Thread(target=_produce, args=(self._maker, self._queue, self._stop),
                                            name="vgen-data-prefetch", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        batch, self._state = item
        return batch

    def state_dict(self) -> dict:
        """Position after the last batch returned (JSON-able); prefetched batches are not counted."""
        return {**self._state, "skipped_by_reason": dict(self._state["skipped_by_reason"])}

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self._maker.stream.load_state_dict(state)
        self._maker._last_good_epoch = self._maker.stream.epoch
        self._state = self._maker.stream.state_dict()

    def stats(self) -> dict:
        """Skip counts and epoch as of the last batch returned."""
        by_reason = dict(self._state["skipped_by_reason"])
        return {"skipped": sum(by_reason.values()), "skipped_by_reason": by_reason, "epoch": self._state["epoch"]}

    def close(self) -> None:
        """Stop the prefetch thread and close the open shard; the next batch resumes from the consumed
        position."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        # The thread read ahead of what was consumed; put the stream back where the consumer is.
        self._maker.stream.load_state_dict(self._state)

    def __del__(self):
        self._stop.set()


class LatentLoader(ShardLoader):
    """Batches of pre-encoded latents: {"latent": (B, C, T', H', W') float32, "text": (B, L, dim) float32,
    "text_mask": (B, L) bool, "caption": [str], "key": [str]}.

    `meta` is the set's latents_meta.json (check it with `vgen.data.latents.check_compatible`).
    """

    def __init__(self, maker: _LatentBatchMaker, null_text: tuple[torch.Tensor, torch.Tensor], prefetch: int = 2):
        super().__init__(maker, prefetch)
        self.meta = maker.meta
        self._null_text = null_text

    def null_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(emb (L, dim) float32, mask (L,) bool) of the empty prompt, for caption dropout."""
        emb, mask = self._null_text
        return emb.clone(), mask.clone()


VideoLoader = ShardLoader  # the video kind adds nothing to the shared loader


def make_demo_if_asked(data_cfg) -> None:
    """Build the demo video shards in `data.path` when `data.make_demo` is set (no-op when complete).

    Every rank calls this; the writer's directory lock lets one build the set while the others wait.
    """
    if getattr(data_cfg, "make_demo", False):
        span = (data_cfg.num_frames - 1) * data_cfg.frame_stride + 1
        write_demo_shards(str(data_cfg.path), num_clips=data_cfg.demo_clips,
                          clips_per_shard=data_cfg.demo_clips_per_shard, num_frames=max(2, span),
                          height=data_cfg.height, width=data_cfg.width)


def clip_settings(data_cfg) -> dict:
    return {"num_frames": int(data_cfg.num_frames), "height": int(data_cfg.height), "width": int(data_cfg.width),
            "frame_stride": int(data_cfg.frame_stride)}


def build_loader(data_cfg, dp_rank: int, dp_size: int, seed: int, prefetch: int = 2) -> ShardLoader:
    """The loader for one data-parallel rank.

    Args:
        data_cfg: `cfg.data` (kind, path, num_frames, height, width, frame_stride, micro_batch, make_demo,
            demo_clips, demo_clips_per_shard). For kind=latents only path and micro_batch count: the clip
            size is what the set was encoded with, and make_demo is ignored (it builds videos).
        seed: the run's seed; shard order, sample order and clip starts derive from it.
    Returns:
        a ShardLoader for videos, a LatentLoader (with `null_text()` and `meta`) for latents.
    """
    if data_cfg.kind not in ("videos", "latents"):
        raise DataError(f"data.kind={data_cfg.kind!r} must be 'videos' or 'latents'")
    path = str(data_cfg.path)
    if data_cfg.kind == "latents":
        shards = list_shards(path)  # first: a missing path is named as such, not as a missing meta file
        meta = read_meta(path)
        stream = ShardStream(shards, dp_rank, dp_size, seed, data_path=path)
        maker = _LatentBatchMaker(stream, meta, data_cfg.micro_batch)
        return LatentLoader(maker, read_null_text(path), prefetch=prefetch)
    make_demo_if_asked(data_cfg)
    stream = ShardStream(list_shards(path), dp_rank, dp_size, seed, data_path=path)
    maker = _VideoBatchMaker(stream, clip_settings(data_cfg), data_cfg.micro_batch, seed)
    return ShardLoader(maker, prefetch=prefetch)
