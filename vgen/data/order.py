"""The global sample order: one sequence of global batches for the whole job, whatever its number of ranks.

Each epoch is a seeded permutation of every sample of the index (vgen/data/sample_index.py). We walk it and
drop each sample into the pending queue of its bucket; when a bucket holds a full global batch
(`global_batch[b]` = dp_size x grad_accum x that bucket's micro_batch) the queue is emitted as the next
global batch. Samples that fit no bucket (bucket -1) are passed over. A queue that is not full at the end of
an epoch carries over, so no sample is dropped and a small bucket fills across epochs.

Rank r of a step takes, for its accumulation micro-step m, the slots [(m * dp + r) * mb, ... + mb) of that
global batch (`rank_slots`). Every rank of a step therefore holds the same bucket (no rank waits on a larger
shape), ranks of one sequence-parallel group (same dp rank) hold the same samples, and the position --
(epoch, cursor, pending queues, batches emitted) -- says nothing about the number of ranks: a job resumed on
another data-parallel size with the same global batch sees exactly the samples of the uninterrupted one.
(MosaicML Streaming gets elasticity the same way: the order is global and a rank's share is a slice of it.)

Slots are numbered through the whole run (`GlobalBatch.first_slot`); a slot number is the stable identity of
one sample draw, so per-sample randomness (clip start, noise, timestep) can be keyed by it and not by the
(step, rank, micro-step) that depends on the layout.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from vgen.data.shards import DataError, derive_seed


@dataclass(frozen=True)
class GlobalBatch:
    bucket: int
    samples: tuple[int, ...]  # sample indices into the SampleIndex, one per slot
    first_slot: int  # run-wide number of the first slot (slots first_slot .. first_slot + len - 1)
    epoch: int  # the epoch in which the batch filled


def rank_slots(batch_size: int, dp_rank: int, dp_size: int, grad_accum: int, micro: int) -> range:
    """The slots of a global batch of `batch_size` that rank `dp_rank` trains on in micro-step `micro`."""
    if batch_size % (dp_size * grad_accum):
        raise ValueError(f"global batch {batch_size} is not a multiple of dp_size {dp_size} x grad_accum {grad_accum}")
    mb = batch_size // (dp_size * grad_accum)
    start = (micro * dp_size + dp_rank) * mb
    return range(start, start + mb)


class GlobalOrder:
    """The run's sequence of global batches, exactly resumable from `state_dict()`.

    Args:
        bucket_of: per sample of the index, its bucket (-1: fits none; never drawn).
        global_batch: per bucket, its global batch size (samples per optimizer step).
        seed: the run's seed; epoch e is permuted with a seed derived from (seed, e).
    """

    def __init__(self, bucket_of: Sequence[int], global_batch: Sequence[int], seed: int, data_path: str = ""):
        self.bucket_of, self.global_batch, self.seed = list(bucket_of), [int(g) for g in global_batch], seed
        self.members = [[] for _ in self.global_batch]
        for i, b in enumerate(self.bucket_of):
            if b >= 0:
                self.members[b].append(i)
        if not any(self.members):
            raise DataError(f"data.path={data_path}: no sample fits any bucket")
        self.epoch, self.cursor, self.slots = 0, 0, 0
        self.pending: list[list[int]] = [[] for _ in self.global_batch]
        self._perm_epoch, self._perm = None, []

    def permutation(self, epoch: int) -> list[int]:
        """Epoch `epoch`'s order of all samples (cached for the current epoch)."""
        if self._perm_epoch != epoch:
            self._perm = list(range(len(self.bucket_of)))
            random.Random(derive_seed(self.seed, "order", epoch)).shuffle(self._perm)
            self._perm_epoch = epoch
        return self._perm

    def next_batch(self) -> GlobalBatch:
        while True:
            perm = self.permutation(self.epoch)
            if self.cursor >= len(perm):
                self.epoch, self.cursor = self.epoch + 1, 0
                continue
            i = perm[self.cursor]
            self.cursor += 1
            b = self.bucket_of[i]
            if b < 0:
                continue
            self.pending[b].append(i)
            size = self.global_batch[b]
            if len(self.pending[b]) >= size:  # > only after a resume with a smaller global batch
                batch = GlobalBatch(b, tuple(self.pending[b][:size]), self.slots, self.epoch)
                self.pending[b], self.slots = self.pending[b][size:], self.slots + size
                return batch

    def substitute(self, bucket: int, slot: int, attempt: int) -> int:
        """A stand-in, from the same bucket, for the sample of `slot` that could not be used: chosen from
        (seed, slot, attempt) alone, so it does not depend on which rank holds the slot."""
        members = self.members[bucket]
        return members[random.Random(derive_seed(self.seed, "substitute", slot, attempt)).randrange(len(members))]

    def epoch_histogram(self) -> dict[int, int]:
        """Samples per bucket in one epoch (-1: fitting none)."""
        counts: dict[int, int] = {}
        for b in self.bucket_of:
            counts[b] = counts.get(b, 0) + 1
        return dict(sorted(counts.items()))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "slots": self.slots,
                "pending": [list(q) for q in self.pending]}

    def load_state_dict(self, state: dict) -> None:
        pending = [list(q) for q in state["pending"]]
        if len(pending) != len(self.pending) or any(self.bucket_of[i] != b for b, q in enumerate(pending) for i in q):
            raise ValueError("the saved pending queues do not match this bucket assignment")
        self.epoch, self.cursor, self.slots = int(state["epoch"]), int(state["cursor"]), int(state["slots"])
        # a changed global batch (train.allow_batch_change) keeps the queues: an over-full one is emitted at
        # its bucket's next sample, so no sample is lost or drawn twice
        self.pending = pending
