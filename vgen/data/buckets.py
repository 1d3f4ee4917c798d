"""Buckets: the clip shapes a run trains on, and which one each sample goes to.

`data.buckets` lists {height, width, frames, micro_batch}; empty means one bucket of today's single shape
(data.height, data.width, data.num_frames, data.micro_batch). A sample goes, from its metadata alone (no
decoding, so the choice is known before the order is drawn), to the bucket it fits best:
  1. it must be able to give the bucket's frames at data.frame_stride (images: only 1-frame buckets; a video
     goes to a 1-frame bucket only when no video bucket takes it);
  2. the closest aspect ratio (|log| of the ratio of ratios), then the most frames;
  3. then the largest bucket not larger than the sample (no upscaling), else the smallest.
It is then resized to cover the bucket and centre-cropped. A sample without metadata (old sets, demo shards)
is taken to be of the configured single shape. Latent samples fit only the bucket they were encoded at.

`micro_batch: auto` asks the memory simulator (vgen/parallel/memory_sim.py) for each bucket's largest
micro-batch whose simulated per-rank peak fits parallel.memory.budget_gb under the run's memory policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from vgen.config import ConfigError
from vgen.data.sample_index import SampleMeta


class BucketError(ConfigError):
    """A bad data.buckets setting; the message names it."""


@dataclass(frozen=True)
class Bucket:
    height: int
    width: int
    frames: int
    micro_batch: object = None  # int >= 1 or "auto"

    @property
    def name(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    def span(self, stride: int) -> int:
        """Source frames a clip of this bucket covers."""
        return (self.frames - 1) * stride + 1


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def buckets_from_config(data_cfg) -> list[Bucket]:
    """The run's buckets, checked. Raises BucketError naming the bad entry and field."""
    entries = list(getattr(data_cfg, "buckets", None) or [])
    if not entries:
        mb = data_cfg.micro_batch
        if not (_positive_int(mb) or mb == "auto"):
            raise BucketError(f"data.micro_batch={mb!r} must be a positive integer or 'auto'")
        return [Bucket(int(data_cfg.height), int(data_cfg.width), int(data_cfg.num_frames), mb)]
    buckets = []
    for i, e in enumerate(entries):
        where = f"data.buckets[{i}]"
        try:
            fields = {k: e[k] for k in e}
        except TypeError:
            raise BucketError(f"{where}={e!r} must be a mapping {{height, width, frames, micro_batch}}") from None
        unknown = set(fields) - {"height", "width", "frames", "micro_batch"}
        if unknown:
            raise BucketError(f"{where} has unknown keys {sorted(unknown)}; allowed: height, width, frames, micro_batch")
        for name in ("height", "width", "frames"):
            if not _positive_int(fields.get(name)):
                raise BucketError(f"{where}.{name}={fields.get(name)!r} must be a positive integer")
        mb = fields.get("micro_batch")
        mb = data_cfg.micro_batch if mb is None else mb
        if not (_positive_int(mb) or mb == "auto"):
            raise BucketError(f"{where}.micro_batch={mb!r} must be a positive integer or 'auto'")
        buckets.append(Bucket(fields["height"], fields["width"], fields["frames"], mb))
    names = [b.name for b in buckets]
    if len(set(names)) != len(names):
        raise BucketError(f"data.buckets lists a shape twice: {names}")
    return buckets


def assign(meta: SampleMeta, buckets: Sequence[Bucket], stride: int, default: SampleMeta) -> int:
    """The index of the bucket `meta` fits best, or -1 when it fits none.

    Args:
        default: the metadata assumed for fields the sample does not have (the configured single shape).
    """
    if meta.kind == "latent" or meta.shape is not None:
        shape = tuple(meta.shape or default.shape or (default.num_frames, default.height, default.width))
        return next((i for i, b in enumerate(buckets) if (b.frames, b.height, b.width) == shape), -1)
    image = meta.kind == "image"
    frames = 1 if image else (meta.num_frames if meta.num_frames is not None else default.num_frames)
    width = meta.width or default.width
    height = meta.height or default.height
    best, best_key = -1, None
    for i, b in enumerate(buckets):
        if b.span(stride) > frames:
            continue
        ar = round(abs(math.log((width / height) / (b.width / b.height))), 9)
        area, own = b.height * b.width, height * width
        key = (b.frames == 1 and not image, ar, -b.frames, area > own, -area if area <= own else area)
        if best_key is None or key < best_key:
            best, best_key = i, key
    return best


def default_meta(data_cfg) -> SampleMeta:
    """What a sample without metadata is taken to be: a clip of the configured single shape."""
    span = (int(data_cfg.num_frames) - 1) * int(data_cfg.frame_stride) + 1
    return SampleMeta(span, int(data_cfg.width), int(data_cfg.height), "video")


def histogram(buckets: Sequence[Bucket], counts: dict[int, int]) -> dict[str, int]:
    """{bucket name: samples} for one epoch, plus "none" for the samples that fit no bucket."""
    out = {b.name: counts.get(i, 0) for i, b in enumerate(buckets)}
    out["none"] = counts.get(-1, 0)
    return out


# ---- micro_batch: auto ----------------------------------------------------------------------------------------

def auto_micro_batch(cfg, bucket: Bucket, latent_shape, world_size: int, text_dim: Optional[int] = None,
                     log: Callable[[str], None] = print, limit: int = 1024) -> int:
    """The largest micro-batch of `bucket` whose simulated per-rank peak fits parallel.memory.budget_gb.

    The peak grows with the micro-batch, so we double until it no longer fits, then bisect.
    Args:
        latent_shape: (C, T, H, W) of one latent of this bucket.
    Raises:
        BucketError: no budget set, or not even a micro-batch of 1 fits (the bucket is named).
    """
    from vgen.models.presets import resolve_preset
    from vgen.parallel.memory_sim import simulate

    mem, budget = cfg.parallel.memory, cfg.parallel.memory.budget_gb
    if budget is None:
        raise BucketError(f"data.buckets {bucket.name}: micro_batch=auto needs parallel.memory.budget_gb (GB per GPU)")
    if mem.policy == "auto" or mem.checkpointing == "auto":
        # the policy planner picks a policy for a given micro-batch; choosing both at once is not supported
        raise BucketError(f"data.buckets {bucket.name}: micro_batch=auto needs a manual parallel.memory policy "
                          "(parallel.memory.policy=manual with checkpointing/offload set), not policy=auto")
    m = cfg.model
    dit = resolve_preset(m.preset, hidden=m.hidden, depth=m.depth, heads=m.heads, mlp_ratio=m.mlp_ratio,
                         patch=m.patch, in_channels=int(latent_shape[0]),
                         **({"text_dim": int(text_dim)} if text_dim else {}))
    sim = dict(world_size=world_size, sp=int(cfg.parallel.sp.degree), zero_stage=int(cfg.parallel.zero_stage),
               sp_mode=str(cfg.parallel.sp.mode), attention_kernel="flash")

    peaks: dict[int, float] = {}

    def peak(mb: int) -> float:
        if mb not in peaks:
            peaks[mb] = simulate(dit, mem, tuple(latent_shape), int(cfg.text.max_length), micro_batch=mb, **sim).peak_gb
        return peaks[mb]

    first = peak(1)
    if first > budget:
        raise BucketError(f"data.buckets {bucket.name}: micro_batch=auto, but even 1 sample needs {first:.3g} GB per "
                          f"rank > parallel.memory.budget_gb={budget:g}; raise the budget, shrink this bucket, or use "
                          "a more frugal parallel.memory policy")
    good, bad = 1, None
    while bad is None and good < limit:
        nxt = min(good * 2, limit)
        if peak(nxt) <= budget:
            good = nxt
        else:
            bad = nxt
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if peak(mid) <= budget else (good, mid)
    log(f"data: bucket {bucket.name} micro_batch=auto -> {good} (simulated peak {peak(good):.3g} GB <= "
        f"parallel.memory.budget_gb={budget:g})")
    return good
