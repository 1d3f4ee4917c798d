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
        abs_pos=getattr(model_cfg, "abs_pos", None),
        cond_channels=1 if getattr(model_cfg, "i2v", False) else None,
        in_channels=in_channels,
        text_dim=text_dim,
    )
    return VideoDiT(cfg)


def build_frozen_encoders(cfg, device):
    """The text encoder and autoencoder a run names, frozen on `device`: (text_encoder, autoencoder).

    An autoencoder without `autoencoder.weights` (tests, demos) gets random weights drawn from `run.seed`
    in a forked RNG, so the trainer, the sampler and every rank of the encode job share one latent space.
    """
    import torch

    from vgen.models.autoencoder import build_autoencoder
    from vgen.models.text_encoder import TextEncoder

    text_encoder = TextEncoder(cfg.text.encoder_path, cfg.text.max_length, device=device,
                               layers=tuple(getattr(cfg.text, "layers", None) or (-1,)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        autoencoder = build_autoencoder(cfg.autoencoder)
    if isinstance(autoencoder, torch.nn.Module):
        autoencoder = autoencoder.to(device).eval().requires_grad_(False)
    return text_encoder, autoencoder


__all__ = ["VideoDiT", "DiTConfig", "PRESETS", "resolve_preset", "build_dit", "build_frozen_encoders"]
