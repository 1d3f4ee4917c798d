"""Model presets: named DiT sizes. `tiny` runs the CPU tests and the demo; `2b` is the seed model's size."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Tuple


@dataclass(frozen=True)
class DiTConfig:
    hidden: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0
    patch: Tuple[int, int, int] = (1, 2, 2)  # (t, h, w) latent voxels per token
    in_channels: int = 12  # latent channels; set from the autoencoder at build time
    text_dim: int = 384  # text-encoder width; set from the text encoder at build time
    qk_norm: bool = True
    attention: str = "auto"  # "auto" | "sdpa" | "flash"
    abs_pos: bool = False  # add a sinusoidal absolute (t, h, w) position embedding (vgen/models/pos_embed.py)
    cond_channels: int = 0  # image-to-video: extra per-voxel condition channels (the given-frame mask)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


PRESETS: dict[str, DiTConfig] = {
    "tiny": DiTConfig(hidden=128, depth=4, heads=4),
    # 26 * hidden^2 per block (see vgen/models/dit.py) * 18 blocks + embeddings ~= 2.0B parameters
    "2b": DiTConfig(hidden=2048, depth=18, heads=16, in_channels=16, text_dim=4096),
}


def resolve_preset(name: str, **overrides) -> DiTConfig:
    """The preset `name` with the non-None `overrides` applied.

    Raises:
        KeyError: the preset does not exist (message lists the known ones).
    """
    if name not in PRESETS:
        raise KeyError(f"model.preset={name!r} does not exist; known presets: {sorted(PRESETS)}")
    given = {k: (tuple(v) if k == "patch" else v) for k, v in overrides.items() if v is not None}
    cfg = replace(PRESETS[name], **given)
    if cfg.hidden % cfg.heads:
        raise ValueError(f"model.hidden={cfg.hidden} must be divisible by model.heads={cfg.heads}")
    if cfg.head_dim % 2:
        raise ValueError(f"head dim {cfg.head_dim} must be even for RoPE")
    return cfg
