"""The training loader: shards -> decoded, batched clips for one data-parallel rank.

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
from vgen.data.shards import DataError, Sample, ShardStream, derive_seed, list_shards
from vgen.data.video import VideoDecodeError, decode_video

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi")


class _BatchMaker:
    """Pulls raw samples from the stream, decodes them, skips the bad ones, and collates batches.

    Kept apart from VideoLoader so a prefetch thread can hold it without keeping the loader alive.
    """

    def __init__(self, stream: ShardStream, num_frames: int, height: int, width: int, frame_stride: int,
                 micro_batch: int, seed: int):
        self.stream = stream
        self.clip = dict(num_frames=num_frames, height=height, width=width, frame_stride=frame_stride)
        self.micro_batch, self.seed = micro_batch, seed
        self._last_good_epoch = stream.epoch

    def _decode(self, sample: Sample) -> tuple[torch.Tensor, str] | None:
        video_ext = next((e for e in VIDEO_EXTENSIONS if e in sample.parts), None)
        if video_ext is None:
            return self._skip(sample, "missing_video", f"no {'/'.join(VIDEO_EXTENSIONS)} member")
        if "txt" not in sample.parts:
            return self._skip(sample, "missing_caption", "no .txt member")
        try:
            caption = sample.parts["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as e:
            return self._skip(sample, "bad_caption", str(e))
        rng = random.Random(derive_seed(self.seed, "clip", sample.epoch, os.path.basename(sample.shard),
                                        sample.key))
        try:
            video = decode_video(sample.parts[video_ext], rng=rng, **self.clip)
        except VideoDecodeError as e:
            return self._skip(sample, e.reason, str(e))
        except Exception as e:  # a decoder bug on one odd file must not end a week-long run
            return self._skip(sample, "decode_error", f"{type(e).__name__}: {e}")
        return video, caption

    def _skip(self, sample: Sample, reason: str, detail: str) -> None:
        self.stream.skip(reason, sample.shard, sample.key, detail)
        # A whole epoch without one usable sample would otherwise spin forever.
        if self.stream.epoch >= self._last_good_epoch + 2:
            raise DataError(f"data.path={self.stream.data_path}: no decodable sample in a whole epoch on rank "
                            f"{self.stream.dp_rank} (skipped: {self.stream.skipped_by_reason})")
        return None

    def next_batch(self) -> tuple[dict, dict]:
        """The next batch and the stream position after it."""
        videos, captions, keys = [], [], []
        while len(videos) < self.micro_batch:
            sample = next(self.stream)
            decoded = self._decode(sample)
            if decoded is None:
                continue
            self._last_good_epoch = sample.epoch
            videos.append(decoded[0])
            captions.append(decoded[1])
            keys.append(sample.key)
        batch = {"video": torch.stack(videos), "caption": captions, "key": keys}  # video: (B, 3, T, H, W)
        return batch, self.stream.state_dict()


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


class VideoLoader:
    """Endless iterator of batches {"video": (B, 3, T, H, W) in [-1, 1], "caption": [str], "key": [str]}.

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


def build_loader(data_cfg, dp_rank: int, dp_size: int, seed: int, prefetch: int = 2) -> VideoLoader:
    """The loader for one data-parallel rank.

    Args:
        data_cfg: `cfg.data` (kind, path, num_frames, height, width, frame_stride, micro_batch, make_demo,
            demo_clips, demo_clips_per_shard).
        seed: the run's seed; shard order, sample order and clip starts derive from it.
    """
    if data_cfg.kind == "latents":
        raise NotImplementedError("data.kind='latents' (pre-encoded latent shards) is not implemented yet; "
                                  "use data.kind='videos'")
    if data_cfg.kind != "videos":
        raise DataError(f"data.kind={data_cfg.kind!r} must be 'videos' or 'latents'")
    path = str(data_cfg.path)
    if getattr(data_cfg, "make_demo", False):
        # Every rank calls this; the writer's directory lock lets one build the set while the others wait.
        span = (data_cfg.num_frames - 1) * data_cfg.frame_stride + 1
        write_demo_shards(path, num_clips=data_cfg.demo_clips, clips_per_shard=data_cfg.demo_clips_per_shard,
                          num_frames=max(2, span), height=data_cfg.height, width=data_cfg.width)
    stream = ShardStream(list_shards(path), dp_rank, dp_size, seed, data_path=path)
    maker = _BatchMaker(stream, data_cfg.num_frames, data_cfg.height, data_cfg.width, data_cfg.frame_stride,
                        data_cfg.micro_batch, seed)
    return VideoLoader(maker, prefetch=prefetch)
