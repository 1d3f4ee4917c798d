"""Image-to-video conditioning by frame replacement and a mask channel (the scheme of Open-Sora 2.0).

A sample conditioned on its first `k` latent frames sees them clean in the noisy input, and a mask
channel (1 on given frames) tells the model which frames those are, since the timestep embedding says
"noisy" for the whole clip. The loss covers only the frames it generates. The sampler keeps the given
frames fixed (their velocity is zeroed), so the output starts exactly with the given frame.
"""

from __future__ import annotations

import torch


def given_mask(shape, given: torch.Tensor, device=None, dtype=torch.float32) -> torch.Tensor:
    """(B, 1, T, H, W) mask, 1 on the first given[b] latent frames of sample b.

    Args:
        shape: (B, C, T, H, W) of the latent.
        given: (B,) int, the number of leading latent frames given per sample (0: text-to-video).
    """
    B, _, T, H, W = shape
    frames = torch.arange(T, device=device)
    mask = (frames[None] < given.to(device)[:, None]).to(dtype)  # (B, T)
    return mask[:, None, :, None, None].expand(B, 1, T, H, W).contiguous()


def condition_batch(xt: torch.Tensor, x0: torch.Tensor, given: torch.Tensor):
    """Replace the given frames of the noisy latent xt by the clean x0; returns (xt, mask (B, 1, T, H, W))."""
    mask = given_mask(xt.shape, given, xt.device, xt.dtype)
    return torch.where(mask.bool(), x0.to(xt.dtype), xt), mask


def draw_given(batch: int, generators, prob: float, frames: int) -> torch.Tensor:
    """(B,) given-frame counts: `frames` with probability `prob`, else 0. Draws nothing when prob is 0, so
    text-to-video runs keep their random stream.

    Args:
        generators: one generator for the batch, or one per sample (the trainer's per-sample streams, so a
            sample is conditioned alike whatever the micro-batch or number of ranks).
    """
    if prob <= 0:
        return torch.zeros(batch, dtype=torch.long)
    if isinstance(generators, torch.Generator):
        draws = torch.rand(batch, generator=generators)
    else:
        draws = torch.cat([torch.rand(1, generator=g) for g in generators])
    return (draws < prob).long() * frames
