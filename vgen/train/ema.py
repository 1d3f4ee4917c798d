"""EMA of the model weights, sharded across ranks so no rank holds a second full copy.

Under ZeRO-3 each rank tracks its own partition of every parameter (`param.ds_tensor`); under ZeRO 0-2,
where every rank holds full parameters, rank r tracks the parameters with index % world == r. The EMA is
fp32 and lives on the parameters' device. `gather_full` reassembles it on rank 0 for export.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn


def _is_zero3(param) -> bool:
    return hasattr(param, "ds_tensor")


class ShardedEMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.named = list(model.named_parameters())
        self.zero3 = any(_is_zero3(p) for _, p in self.named)
        self.shadow: dict[str, torch.Tensor] = {
            name: self._source(i, p).detach().float().clone() for i, (name, p) in enumerate(self.named) if self._owns(i)
        }

    def _owns(self, index: int) -> bool:
        return self.zero3 or index % self.world == self.rank

    def _source(self, index: int, param) -> torch.Tensor:
        return param.ds_tensor if self.zero3 else param.data

    @torch.no_grad()
    def update(self) -> None:
        for i, (name, p) in enumerate(self.named):
            if name in self.shadow:
                self.shadow[name].lerp_(self._source(i, p).float(), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "world": self.world, "zero3": self.zero3, "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> bool:
        """Restore this rank's shards; False (EMA restarted from the weights) if the sharding changed."""
        if state["world"] != self.world or state["zero3"] != self.zero3 or state["shadow"].keys() != self.shadow.keys():
            return False
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
        return True

    @torch.no_grad()
    def load_resharded(self, states: list[dict]) -> None:
        """Restore from the EMA shards of every rank of a run with another world size or ZeRO stage.

        Args:
            states: the old ranks' `state_dict()`s, in rank order.
        """
        for i, (name, p) in enumerate(self.named):
            if name in self.shadow:
                full = _full_from_shards(name, states, tuple(p.ds_shape if self.zero3 else p.shape))
                self.shadow[name].copy_(self._own_part(p, full) if self.zero3 else full)

    def _own_part(self, param, full: torch.Tensor) -> torch.Tensor:
        # ZeRO-3 gives rank r the r-th equal slice of the flattened parameter, zero-padded at the end
        size = param.ds_tensor.numel()
        flat = torch.zeros(size * self.world, dtype=full.dtype)
        flat[: full.numel()] = full.flatten()
        return flat[self.rank * size:(self.rank + 1) * size].to(param.ds_tensor.device)

    @torch.no_grad()
    def gather_full(self) -> dict[str, torch.Tensor] | None:
        """Full EMA weights on rank 0 (None elsewhere). A collective: every rank must call it."""
        out = {}
        for i, (name, p) in enumerate(self.named):
            if self.zero3:
                full = self._gather_zero3(p, self.shadow[name])
            else:
                full = self.shadow[name].clone() if name in self.shadow else torch.empty(p.shape, dtype=torch.float32, device=p.device)
                dist.broadcast(full, src=i % self.world)
            if self.rank == 0:
                out[name] = full.cpu()
        return out if self.rank == 0 else None

    @staticmethod
    def _gather_zero3(param, shard: torch.Tensor) -> torch.Tensor:
        # all-gather the flat fp32 partitions, then drop ZeRO's padding and reshape
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, shard.contiguous())
        return torch.cat([t.flatten() for t in parts])[: param.ds_numel].view(param.ds_shape)


def _full_from_shards(name: str, states: list[dict], shape: tuple) -> torch.Tensor:
    """One parameter's full fp32 EMA from old ranks' shards (ZeRO-3: concatenated partitions; else: the
    one rank that owned it)."""
    if states[0]["zero3"]:
        flat = torch.cat([s["shadow"][name].flatten() for s in states])
        return flat[: math.prod(shape)].view(shape).float()
    owner = next(s for s in states if name in s["shadow"])
    return owner["shadow"][name].float().view(shape)
