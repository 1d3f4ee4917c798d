"""Architecture, normalisation and tiling settings of the causal 3D VAE (`autoencoder.vae` in the config).

Defaults are Wan-2.1's VAE. A diffusers `AutoencoderKLWan` config.json can be given as is: its spelling
`temperal_downsample` is accepted, `_`-prefixed bookkeeping keys are ignored, and the keys describing
variants this implementation does not build (Wan-2.2's residual blocks, patchified input) are checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

from vgen.models.vae.tiling import Tiling

# Per-channel statistics of Wan-2.1 latents (from its diffusers config): normalised = (mu - mean) / std
WAN21_LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
WAN21_LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]  # fmt: skip

# diffusers config keys kept aside: checked against what we build (dropout: inert in a frozen VAE)
_DIFFUSERS_KEYS = ("is_residual", "patch_size", "dropout", "scale_factor_temporal", "scale_factor_spatial")


@dataclass
class VAEConfig:
    """Settings of `WanVAE`; every field may be set from `autoencoder.vae` in the run config.

    Architecture (must match the checkpoint): base_dim, decoder_base_dim (None: base_dim), z_dim,
    dim_mult (one entry per resolution level; len - 1 spatial 2x downsamplings), num_res_blocks,
    attn_scales (encoder attention after the residual blocks of levels whose scale 1/2^i is listed;
    diffusers builds none in the decoder), temporal_downsample (one flag per downsampling: also halve time).
    Normalisation: latents_mean / latents_std (None: Wan-2.1's when z_dim == 16, else 0 / 1).
    Memory: tile_size (pixels, int or [h, w]; None: no spatial tiling), tile_overlap (pixels),
    chunk_frames (latent frames per temporal chunk; None: the whole clip at once).
    """

    base_dim: int = 96
    decoder_base_dim: Optional[int] = None
    z_dim: int = 16
    dim_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple = ()
    temporal_downsample: tuple = (False, True, True)
    in_channels: int = 3
    out_channels: int = 3
    latents_mean: Optional[list] = None
    latents_std: Optional[list] = None
    tile_size: object = None
    tile_overlap: int = 64
    chunk_frames: Optional[int] = 1
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d: dict | None) -> "VAEConfig":
        """Build from a plain or OmegaConf dict; unknown keys raise, naming the known ones."""
        d = dict(d or {})
        if "temperal_downsample" in d:  # diffusers' spelling
            d["temporal_downsample"] = d.pop("temperal_downsample")
        known = {f.name for f in fields(cls)} - {"extra"}
        extra = {k: d.pop(k) for k in list(d) if k.startswith("_") or k in _DIFFUSERS_KEYS}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"autoencoder.vae: unknown keys {unknown}; known keys: {sorted(known)}")
        for k in ("dim_mult", "attn_scales", "temporal_downsample"):
            if k in d:
                d[k] = tuple(d[k])
        for k in ("latents_mean", "latents_std"):
            if d.get(k) is not None:
                d[k] = [float(v) for v in d[k]]
        cfg = cls(**d, extra=extra)
        cfg.validate()
        return cfg

    @property
    def spatial_ratio(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_ratio(self) -> int:
        return 2 ** sum(bool(f) for f in self.temporal_downsample)

    def validate(self) -> None:
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"autoencoder.vae.temporal_downsample has {len(self.temporal_downsample)} flags; "
                f"dim_mult={list(self.dim_mult)} needs one per downsampling: {len(self.dim_mult) - 1}"
            )
        for k, bad in self.extra.items():
            if k in ("is_residual", "patch_size") and bad not in (None, False):
                raise ValueError(f"autoencoder.vae.{k}={bad!r}: only the Wan-2.1 VAE (no {k}) is implemented")
        ratios = {"scale_factor_temporal": self.temporal_ratio, "scale_factor_spatial": self.spatial_ratio}
        for k, derived in ratios.items():
            if self.extra.get(k) not in (None, derived):
                raise ValueError(f"autoencoder.vae.{k}={self.extra[k]} but the architecture gives {derived}")
        for k in ("latents_mean", "latents_std"):
            v = getattr(self, k)
            if v is not None and len(v) != self.z_dim:
                raise ValueError(f"autoencoder.vae.{k} has {len(v)} values, z_dim={self.z_dim}")
        self.tiling()  # checks tile sizes

    def latent_stats(self) -> tuple[list, list]:
        """(mean, std) per latent channel used by `encode`/`decode` normalisation."""
        if self.z_dim == 16:
            mean, std = WAN21_LATENTS_MEAN, WAN21_LATENTS_STD
        else:
            mean, std = [0.0] * self.z_dim, [1.0] * self.z_dim
        return list(self.latents_mean or mean), list(self.latents_std or std)

    def tiling(self) -> Tiling:
        size = self.tile_size
        if size is not None and not isinstance(size, int):
            size = tuple(int(s) for s in size)
        return Tiling(tile=size, overlap=int(self.tile_overlap), chunk=self.chunk_frames).checked(
            self.spatial_ratio
        )
