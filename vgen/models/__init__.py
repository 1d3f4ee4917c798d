"""Models: the video DiT, its attention core, RoPE, autoencoders and text encoders."""

from vgen.models.dit import VideoDiT
from vgen.models.presets import PRESETS, DiTConfig, resolve_preset


def build_dit(model_cfg, in_channels: int, text_dim: int) -> VideoDiT:
    """Build the DiT from the `model` config section, with widths taken from the autoencoder and text encoder."""
    cfg = resolve_preset(
        model_cfg.preset,
        hidden=model_cfg.hidden,
        depth=model_cfg.depth,
        heads=model_cfg.heads,
        mlp_ratio=model_cfg.mlp_ratio,
        patch=model_cfg.patch,
        attention=model_cfg.attention,
        in_channels=in_channels,
        text_dim=text_dim,
    )
    return VideoDiT(cfg)


__all__ = ["VideoDiT", "DiTConfig", "PRESETS", "resolve_preset", "build_dit"]
