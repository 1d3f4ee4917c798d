"""Autoencoder interface: encode(video) -> latent, decode(latent) -> video.

video: (B, 3, T, H, W) float in [-1, 1]; latent: (B, C, T', H', W'). The demo uses `PatchAutoencoder`, a
pixel-space autoencoder that is the identity up to reshaping; the causal 3D VAE (vgen/models/vae) plugs in
behind the same interface with `autoencoder.kind=vae`.
"""

from __future__ import annotations

from typing import Protocol

import torch
from einops import rearrange


class Autoencoder(Protocol):
    latent_channels: int

    def encode(self, video: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latent: torch.Tensor) -> torch.Tensor: ...

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]: ...


class PatchAutoencoder(torch.nn.Module):
    """Folds (pt, ph, pw) pixel patches into channels: exact, lossless, no parameters."""

    def __init__(self, patch=(1, 2, 2), channels: int = 3):
        super().__init__()
        self.patch = tuple(int(p) for p in patch)
        self.latent_channels = channels * self.patch[0] * self.patch[1] * self.patch[2]

    def latent_shape(self, frames: int, height: int, width: int):
        pt, ph, pw = self.patch
        if frames % pt or height % ph or width % pw:
            raise ValueError(f"video (T, H, W)={(frames, height, width)} not divisible by autoencoder.patch={self.patch}")
        return self.latent_channels, frames // pt, height // ph, width // pw

    def encode(self, video):
        self.latent_shape(*video.shape[-3:])
        pt, ph, pw = self.patch
        return rearrange(video, "b c (t pt) (h ph) (w pw) -> b (c pt ph pw) t h w", pt=pt, ph=ph, pw=pw)

    def decode(self, latent):
        pt, ph, pw = self.patch
        return rearrange(latent, "b (c pt ph pw) t h w -> b c (t pt) (h ph) (w pw)", pt=pt, ph=ph, pw=pw)


def build_autoencoder(ae_cfg) -> Autoencoder:
    """The autoencoder named by the `autoencoder` config section."""
    if ae_cfg.kind == "patch":
        return PatchAutoencoder(ae_cfg.patch)
    if ae_cfg.kind == "vae":
        from vgen.models.vae import build_vae  # the causal 3D VAE (its own issue)

        return build_vae(ae_cfg)
    raise ValueError(f"autoencoder.kind={ae_cfg.kind!r} must be 'patch' or 'vae'")
