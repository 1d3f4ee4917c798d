"""Rectified flow: x_t = (1 - t) * x0 + t * noise, the model predicts the velocity noise - x0.

t = 0 is data, t = 1 is noise. Training draws t from a logit-normal distribution and shifts it towards
noise for larger videos (more tokens carry more redundant signal, so a given t destroys less of it).
"""

from __future__ import annotations

import math

import torch


def timestep_shift(num_tokens: int, base_tokens: int = 256, max_shift: float = 6.0) -> float:
    """Shift factor that grows with sqrt(tokens / base_tokens): 1.0 at or below the base size."""
    return float(min(max(math.sqrt(num_tokens / base_tokens), 1.0), max_shift))


def configured_shift(num_tokens: int, diffusion_cfg) -> float:
    """The timestep shift training and sampling use: `diffusion.shift` when set (checked positive when the
    config loads), else the token-count rule. A run directory saved before the key existed has no shift."""
    fixed = getattr(diffusion_cfg, "shift", None)
    if fixed is not None:
        return float(fixed)
    return timestep_shift(num_tokens, diffusion_cfg.shift_base_tokens, diffusion_cfg.shift_max)


def shift_t(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Map t in [0, 1] towards 1 (noise): shift * t / (1 + (shift - 1) * t); identity for shift 1."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def sample_timesteps(batch: int, generator: torch.Generator, shift: float, mean: float = 0.0, std: float = 1.0):
    """Logit-normal timesteps, shifted. Returns (batch,) float32 in (0, 1)."""
    u = torch.randn(batch, generator=generator) * std + mean
    return shift_t(torch.sigmoid(u), shift)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise, t broadcast over all but the batch dimension."""
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1.0 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / d t = noise - x0."""
    return noise - x0


def flow_matching_loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error to the velocity, averaged over every element (so over all tokens).

    Args:
        weight: optional 0/1 mask broadcastable to x0 (e.g. (B, 1, T, H, W)): the mean is then over the
            elements it keeps (image-to-video: only the generated frames).
    """
    err = (pred.float() - velocity_target(x0, noise).float()).pow(2)
    if weight is None:
        return err.mean()
    weight = weight.float().expand_as(err)
    return (err * weight).sum() / weight.sum().clamp(min=1.0)


def sampling_schedule(steps: int, shift: float) -> torch.Tensor:
    """steps + 1 times from 1 (noise) to 0 (data), shifted like training."""
    return shift_t(torch.linspace(1.0, 0.0, steps + 1), shift)


@torch.no_grad()
def euler_sample(velocity_fn, noise: torch.Tensor, steps: int, shift: float = 1.0) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from t = 1 to t = 0 with Euler steps.

    Args:
        velocity_fn: (x (B, ...), t (B,)) -> velocity of the same shape as x.
        noise: the starting point x_1.
    """
    x = noise
    times = sampling_schedule(steps, shift).to(noise.device)
    for t_now, t_next in zip(times[:-1], times[1:]):
        t = torch.full((x.shape[0],), float(t_now), device=x.device)
        x = x + (t_next - t_now) * velocity_fn(x, t)
    return x


def guided_velocity(model_fn, x, t, cond, uncond, scale: float):
    """Classifier-free guidance: v_u + scale * (v_c - v_u), both halves in one batch.

    Args:
        model_fn: (x, t, text, text_mask) -> velocity.
        cond, uncond: (text, text_mask) pairs for the prompt and the negative/empty prompt.
    """
    if scale == 1.0:
        return model_fn(x, t, *cond)
    text = torch.cat([cond[0], uncond[0]])
    mask = torch.cat([cond[1], uncond[1]])
    v_c, v_u = model_fn(torch.cat([x, x]), torch.cat([t, t]), text, mask).chunk(2)
    return v_u + scale * (v_c - v_u)
