"""The causal 3D VAE (Wan-2.1 layout) behind `autoencoder.kind=vae`.

    vae = build_vae(ae_cfg)                 # ae_cfg.vae: VAEConfig fields; ae_cfg.weights: safetensors
    z = vae.encode(video)                   # (B, 3, 1 + 4k, H, W) in [-1, 1] -> normalised (B, 16, 1 + k, H/8, W/8)
    video = vae.decode(z)                   # -> (B, 3, 1 + 4k, H, W) in [-1, 1]
"""

from __future__ import annotations

from vgen.models.vae.config import VAEConfig
from vgen.models.vae.layers import CausalCache
from vgen.models.vae.loading import load_vae_weights, state_dict_problems
from vgen.models.vae.tiling import Tiling
from vgen.models.vae.wan import WanVAE

__all__ = ["VAEConfig", "WanVAE", "Tiling", "CausalCache", "build_vae", "load_vae_weights", "state_dict_problems"]


def build_vae(ae_cfg) -> WanVAE:
    """The frozen VAE described by the `autoencoder` config section, in eval mode.

    Args:
        ae_cfg: has `vae` (dict of `VAEConfig` fields, or None for Wan-2.1's defaults) and `weights`
            (a diffusers-layout safetensors path, or None for random weights: tests and demos only).
    """
    cfg = VAEConfig.from_dict(getattr(ae_cfg, "vae", None))
    model = WanVAE(cfg)
    weights = getattr(ae_cfg, "weights", None)
    if weights:
        load_vae_weights(model, weights)
    return model.eval().requires_grad_(False)
