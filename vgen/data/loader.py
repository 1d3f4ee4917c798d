"""The training loader: the global sample order -> decoded, bucketed micro-batches for one data-parallel rank.

`build_loader(cfg.data, dp_rank, dp_size, seed, grad_accum=...)` is all the trainer calls. The loader knows
its rank and the number of ranks and nothing else about the job (no torch.distributed here).

The order of samples is global (vgen/data/order.py): a seeded permutation of every sample of the set, cut into
global batches of one bucket each; rank r trains on its slice of each. A micro-batch therefore holds one bucket,
and every rank of a step holds the same one. `state_dict()` is the global position after the last micro-batch
handed out -- the same on every rank and independent of the number of ranks -- so a resumed job, on the same
or another data-parallel size with the same global batch, sees exactly the samples an uninterrupted one would.

A sample that cannot be used (corrupt, too short, a worker crash) is replaced by a stand-in from its bucket
chosen from its slot number alone (`GlobalOrder.substitute`), so damage never makes the order depend on the
layout. Each batch carries `sample_id`: the run-wide slot number of each sample, the key for per-sample
randomness that must not depend on (step, rank, micro-step).
"""

from __future__ import annotations

import json
import queue
import threading
import warnings
from pathlib import Path

from vgen.data.buckets import Bucket, BucketError, assign, buckets_from_config, default_meta, histogram
from vgen.data.demo import write_demo_shards
from vgen.data.items import ItemTask, SampleError, collate, decode_clip_sample  # noqa: F401 (re-exported)
from vgen.data.latents import read_meta, read_null_text
from vgen.data.order import GlobalBatch, GlobalOrder, rank_slots
from vgen.data.sample_index import SampleIndex, SampleMeta, build_index
from vgen.data.shards import DataError, DataWarning, derive_seed, list_shards
from vgen.data.workers import make_decoder

MAX_SUBSTITUTES = 32  # stand-ins tried for one slot before we conclude the bucket holds nothing usable


class _BatchMaker:
    """Draws global batches from the order, decodes this rank's slots (inline or in worker processes),
    replaces bad samples, and collates micro-batches."""

    def __init__(self, index: SampleIndex, order: GlobalOrder, buckets: list[Bucket], clips: list[dict],
                 kind: str, dp_rank: int, dp_size: int, grad_accum: int, seed: int, data_path: str, decoder):
        self.index, self.order, self.buckets, self.clips, self.kind = index, order, buckets, clips, kind
        self.dp_rank, self.dp_size, self.grad_accum = dp_rank, dp_size, grad_accum
        self.seed, self.data_path, self.decoder = seed, data_path, decoder
        self.current: GlobalBatch | None = None
        self.micro = 0
        self.skipped_by_reason = dict(index.skipped_by_reason)
        self._warned: set = set()
        self._epoch_of_last = order.epoch

    # ---- one micro-batch ----------------------------------------------------------------------------------
    def _task(self, bucket: int, sample: int, slot: int) -> ItemTask:
        path, members = self.index.locate(sample)
        return ItemTask(self.kind, self.index.samples[sample].key, path, members, self.clips[bucket],
                        derive_seed(self.seed, "clip", slot, sample))

    def next_batch(self) -> tuple[dict, dict]:
        """This rank's next micro-batch and the global position after it."""
        if self.current is None:
            self.current, self.micro = self.order.next_batch(), 0
        gb = self.current
        slots = list(rank_slots(len(gb.samples), self.dp_rank, self.dp_size, self.grad_accum, self.micro))
        samples = [gb.samples[j] for j in slots]
        results = self.decoder.map([self._task(gb.bucket, s, gb.first_slot + j) for s, j in zip(samples, slots)])
        for n, j in enumerate(slots):
            attempt = 0
            while isinstance(results[n], SampleError):
                self._skip(results[n], samples[n], gb.bucket, attempt)
                samples[n] = self.order.substitute(gb.bucket, gb.first_slot + j, attempt)
                results[n] = self.decoder.map([self._task(gb.bucket, samples[n], gb.first_slot + j)])[0]
                attempt += 1
        batch = collate(self.kind, results)
        batch.update(key=[self.index.samples[s].key for s in samples], sample_index=samples,
                     sample_id=[gb.first_slot + j for j in slots], bucket=self.buckets[gb.bucket].name,
                     epoch=gb.epoch)
        self._epoch_of_last = gb.epoch
        self.micro += 1
        if self.micro == self.grad_accum:
            self.current = None
        return batch, self.state_dict()

    def _skip(self, error: SampleError, sample: int, bucket: int, attempt: int) -> None:
        self.skipped_by_reason[error.reason] = self.skipped_by_reason.get(error.reason, 0) + 1
        shard = self.index.shards[self.index.samples[sample].shard]
        if attempt + 1 >= MAX_SUBSTITUTES:
            raise DataError(f"data.path={self.data_path}: no decodable sample in bucket {self.buckets[bucket].name} "
                            f"after {MAX_SUBSTITUTES} tries (skipped: {self.skipped_by_reason})")
        if shard not in self._warned:  # once per shard: a bad shard must not flood the log
            self._warned.add(shard)
            warnings.warn(f"data.path={self.data_path}: {error.reason} in sample {self.index.samples[sample].key!r} "
                          f"of shard {shard}: {error}. Replaced by another sample of its bucket; later skips in this "
                          "shard are counted in stats(), not warned about.", DataWarning, stacklevel=2)

    # ---- position -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        cur = self.current
        return {"order": self.order.state_dict(), "micro": self.micro,
                "current": None if cur is None else {"bucket": cur.bucket, "samples": list(cur.samples),
                                                     "first_slot": cur.first_slot, "epoch": cur.epoch},
                "epoch": self._epoch_of_last,
                "seed": self.seed, "fingerprint": self.index.fingerprint(), "buckets": [b.name for b in self.buckets],
                "global_batch": list(self.order.global_batch), "dp_size": self.dp_size, "grad_accum": self.grad_accum,
                "skipped_by_reason": dict(self.skipped_by_reason)}

    def load_state_dict(self, state: dict) -> None:
        """Seek to a saved global position. The position transfers to any dp_size; it does not to another
        sample list, seed or bucket list (then we restart the saved epoch from its start, with a warning)."""
        self.skipped_by_reason = dict(state.get("skipped_by_reason", {}))
        self.current, self.micro = None, 0
        same = {"seed": self.seed, "fingerprint": self.index.fingerprint(), "buckets": [b.name for b in self.buckets]}
        changed = {k: (state.get(k), v) for k, v in same.items() if state.get(k) != v}
        if "order" not in state or changed:
            epoch = int(state.get("epoch", 0))
            warnings.warn(f"data.path={self.data_path}: the saved data position was for another data set or bucket "
                          f"list (saved, now: {changed or 'an older format'}); restarting epoch {epoch} from its "
                          "start", DataWarning, stacklevel=2)
            self.order.load_state_dict({"epoch": epoch, "cursor": 0, "slots": 0,
                                        "pending": [[] for _ in self.buckets]})
            return
        self.order.load_state_dict(state["order"])
        cur = state.get("current")
        if cur is not None:
            if (state.get("dp_size"), state.get("grad_accum")) != (self.dp_size, self.grad_accum):
                warnings.warn(f"data.path={self.data_path}: saved inside a step under dp_size={state.get('dp_size')}, "
                              f"grad_accum={state.get('grad_accum')}; that step's remaining samples are not "
                              "replayed under the new layout", DataWarning, stacklevel=2)
            else:
                self.current = GlobalBatch(cur["bucket"], tuple(cur["samples"]), cur["first_slot"], cur["epoch"])
                self.micro = int(state["micro"])
        self._epoch_of_last = int(state.get("epoch", self.order.epoch))


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
    """Endless iterator of micro-batches for one data-parallel rank, exactly resumable from `state_dict()`.

    Video batches: {"video": (B, 3, T, H, W) in [-1, 1], "caption": [str], "key": [str], "sample_id": [int],
    "sample_index": [int], "bucket": "TxHxW", "epoch": int}; T, H, W are the batch's bucket.

    Args:
        prefetch: micro-batches prepared ahead on a background thread (0: on the caller's thread).
    """

    def __init__(self, maker: _BatchMaker, prefetch: int = 2, histogram: dict | None = None):
        self._maker, self._prefetch = maker, prefetch
        self.histogram = histogram or {}
        self.buckets = maker.buckets
        self._state = maker.state_dict()
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
        self._maker.load_state_dict(state)
        self._state = self._maker.state_dict()

    def stats(self) -> dict:
        """Skip counts and epoch as of the last batch returned."""
        by_reason = dict(self._state["skipped_by_reason"])
        return {"skipped": sum(by_reason.values()), "skipped_by_reason": by_reason, "epoch": self._state["epoch"]}

    def close(self, workers: bool = False) -> None:
        """Stop the prefetch thread; the next batch resumes from the consumed position. `workers=True` also
        ends the decoding worker processes (the loader is done)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        # The thread read ahead of what was consumed; put the maker back where the consumer is.
        self._maker.load_state_dict(self._state)
        if workers:
            self._maker.decoder.close()

    def __del__(self):
        self._stop.set()


class LatentLoader(ShardLoader):
    """Batches of pre-encoded latents: {"latent": (B, C, T', H', W') float32, "text": (B, L, dim) float32,
    "text_mask": (B, L) bool, "caption": [str], "key": [str], ...} (the rest as video batches).

    `meta` is the set's latents_meta.json (check it with `vgen.data.latents.check_compatible`).
    """

    def __init__(self, maker: _BatchMaker, meta: dict, null_text, prefetch: int = 2, histogram: dict | None = None):
        super().__init__(maker, prefetch, histogram)
        self.meta, self._null_text = meta, null_text

    def null_text(self):
        """(emb (L, dim) float32, mask (L,) bool) of the empty prompt, for caption dropout."""
        emb, mask = self._null_text
        return emb.clone(), mask.clone()


VideoLoader = ShardLoader  # the video kind adds nothing to the shared loader


def write_bucket_histogram(run_dir, loader: ShardLoader) -> dict:
    """RUN/bucket_histogram.json: samples per bucket in one epoch ("none": fitting no bucket) and each bucket's
    micro-batch as resolved (micro_batch=auto included)."""
    out = {"per_epoch": loader.histogram,
           "buckets": [{"name": b.name, "height": b.height, "width": b.width, "frames": b.frames,
                        "micro_batch": b.micro_batch} for b in loader.buckets]}
    Path(run_dir, "bucket_histogram.json").write_text(json.dumps(out, indent=1))
    return out


def record_keys(run_dir, rank: int, step: int, micro: int, batch: dict) -> None:
    """Append one micro-batch's sample keys to RUN/data_keys/rank<R>.jsonl (data.record_keys=true)."""
    folder = Path(run_dir, "data_keys")
    folder.mkdir(parents=True, exist_ok=True)
    row = {"step": step, "micro": micro, "bucket": batch["bucket"], "key": batch["key"], "sample_id": batch["sample_id"]}
    with open(folder / f"rank{rank}.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


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


def bucket_clip(bucket: Bucket, stride: int) -> dict:
    return {"num_frames": bucket.frames, "height": bucket.height, "width": bucket.width, "frame_stride": stride}


def latent_buckets(data_cfg, meta: dict) -> tuple[list[Bucket], list[dict], SampleMeta]:
    """The buckets of a latent set (those it was encoded at, or data.buckets), each with its meta."""
    encoded = meta.get("buckets") or [{**{k: meta["clip"][k] for k in ("height", "width")},
                                      "frames": meta["clip"]["num_frames"], "latent_shape": meta["latent_shape"]}]
    shapes = {(e["frames"], e["height"], e["width"]): e["latent_shape"] for e in encoded}
    if getattr(data_cfg, "buckets", None):
        buckets = buckets_from_config(data_cfg)
    else:
        buckets = [Bucket(e["height"], e["width"], e["frames"], data_cfg.micro_batch) for e in encoded]
    clips = [{**meta, "latent_shape": shapes.get((b.frames, b.height, b.width), [])} for b in buckets]
    clip = meta["clip"]
    return buckets, clips, SampleMeta(None, None, None, "latent", (clip["num_frames"], clip["height"], clip["width"]))


def build_loader(data_cfg, dp_rank: int, dp_size: int, seed: int, prefetch: int = 2, grad_accum: int = 1,
                 micro_batch_for=None, log=print) -> ShardLoader:
    """The loader for one data-parallel rank.

    Args:
        data_cfg: `cfg.data` (kind, path, num_frames, height, width, frame_stride, micro_batch, buckets, workers,
            make_demo, demo_clips, demo_clips_per_shard). For kind=latents the clip shapes are those the set was
            encoded at, and make_demo is ignored (it builds videos).
        seed: the run's seed; the sample order and clip starts derive from it.
        grad_accum: micro-batches per rank per optimizer step (a global batch is dp_size x grad_accum x micro_batch).
        micro_batch_for: (bucket, latent shape or None) -> int, for buckets with micro_batch=auto.
    Returns:
        a ShardLoader for videos, a LatentLoader (with `null_text()` and `meta`) for latents.
    """
    if data_cfg.kind not in ("videos", "latents"):
        raise DataError(f"data.kind={data_cfg.kind!r} must be 'videos' or 'latents'")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    path = str(data_cfg.path)
    meta = None
    if data_cfg.kind == "latents":
        shards = list_shards(path)  # first: a missing path is named as such, not as a missing meta file
        meta = read_meta(path)
        buckets, clips, default = latent_buckets(data_cfg, meta)
    else:
        make_demo_if_asked(data_cfg)
        shards = list_shards(path)
        buckets = buckets_from_config(data_cfg)
        clips = [bucket_clip(b, int(data_cfg.frame_stride)) for b in buckets]
        default = default_meta(data_cfg)
    buckets = _resolve_micro_batches(buckets, clips, micro_batch_for)
    index = build_index(shards, path)
    bucket_of = [assign(s.meta, buckets, int(data_cfg.frame_stride), default) for s in index.samples]
    global_batch = [dp_size * grad_accum * int(b.micro_batch) for b in buckets]
    try:
        order = GlobalOrder(bucket_of, global_batch, seed, data_path=path)
    except DataError:
        names = ", ".join(b.name for b in buckets)
        raise DataError(f"data.buckets: none of the {len(index)} samples of data.path={path} fits any bucket "
                        f"({names}; frames x height x width at data.frame_stride={data_cfg.frame_stride})") from None
    hist = histogram(buckets, order.epoch_histogram())
    if dp_rank == 0:
        log(f"data: {len(index)} samples, buckets per epoch {hist}, global batch per bucket "
            f"{dict(zip((b.name for b in buckets), global_batch))}")
    maker = _BatchMaker(index, order, buckets, clips, data_cfg.kind, dp_rank, dp_size, grad_accum, seed, path,
                        make_decoder(int(getattr(data_cfg, "workers", 0) or 0)))
    if meta is not None:
        return LatentLoader(maker, meta, read_null_text(path), prefetch=prefetch, histogram=hist)
    return ShardLoader(maker, prefetch=prefetch, histogram=hist)


def _resolve_micro_batches(buckets: list[Bucket], clips: list[dict], micro_batch_for) -> list[Bucket]:
    out = []
    for b, clip in zip(buckets, clips):
        if b.micro_batch == "auto":
            if micro_batch_for is None:
                raise BucketError(f"data.buckets {b.name}: micro_batch=auto needs the trainer's memory simulator")
            b = Bucket(b.height, b.width, b.frames, int(micro_batch_for(b, clip.get("latent_shape"))))
        out.append(b)
    return out

