"""The Wan-2.1 causal video VAE: 4x temporal, 8x spatial compression, 16 latent channels (by default).

Frame 0 is encoded on its own and every following group of 4 frames becomes one latent frame, so a clip
of 1 + 4k frames gives 1 + k latent frames and a single image is a 1-frame clip. All temporal
convolutions are causal, which makes the encoder and decoder streamable in frame chunks (layers.py) and
tileable in space (tiling.py). Module names follow diffusers' `AutoencoderKLWan` state dict exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vgen.models.vae.config import VAEConfig
from vgen.models.vae.layers import AttentionBlock, CausalCache, CausalConv3d, Resample, ResidualBlock, RMSNorm
from vgen.models.vae.tiling import Tiling, temporal_chunks, tiled_apply


class MidBlock(nn.Module):
    """Residual block, then (attention, residual block) pairs, at the lowest resolution."""

    def __init__(self, dim: int, num_layers: int = 1):
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(dim) for _ in range(num_layers)])
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim) for _ in range(num_layers + 1)])

    def forward(self, x, cache=None):
        x = self.resnets[0](x, cache)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x), cache)
        return x


class Encoder(nn.Module):
    """Video (B, 3, T, H, W) -> (B, 2 * z_dim, T', H', W'): posterior mean and log-variance."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], 3, padding=1)
        # one flat list, in diffusers' order: per level, residual (+ attention) blocks then a downsampler
        blocks, scale, last = [], 1.0, len(cfg.dim_mult) - 1
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(d_in, d_out))
                if scale in cfg.attn_scales:
                    blocks.append(AttentionBlock(d_out))
                d_in = d_out
            if i != last:
                blocks.append(Resample(d_out, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"))
                scale /= 2.0
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.z_dim * 2, 3, padding=1)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        x = self.conv_in(x, cache)  # (B, base_dim, T, H, W)
        for block in self.down_blocks:
            x = block(x, cache)  # ... (B, base_dim * dim_mult[-1], T', H', W')
        x = self.mid_block(x, cache)
        return self.conv_out(F.silu(self.norm_out(x)), cache)  # (B, 2 z_dim, T', H', W')


class UpBlock(nn.Module):
    """num_res_blocks + 1 residual blocks, then an optional upsampler that halves the width."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample_mode: str | None):
        super().__init__()
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nn.ModuleList([ResidualBlock(a, b) for a, b in zip(dims[:-1], dims[1:])])
        self.upsamplers = nn.ModuleList([Resample(out_dim, upsample_mode)]) if upsample_mode else None

    def forward(self, x, cache=None):
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, cache)
        return x


class Decoder(nn.Module):
    """Latent (B, z_dim, T', H', W') -> video (B, 3, 1 + 4 (T' - 1), 8 H', 8 W'), before clamping."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        base = cfg.decoder_base_dim or cfg.base_dim
        dims = [base * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal_up = list(reversed(cfg.temporal_downsample))
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        blocks, last = [], len(cfg.dim_mult) - 1
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            # every upsampler halves the width (Wan-2.1), so later levels start at half of dims[i]
            d_in = d_in // 2 if i > 0 else d_in
            mode = None if i == last else ("upsample3d" if temporal_up[i] else "upsample2d")
            blocks.append(UpBlock(d_in, d_out, cfg.num_res_blocks, mode))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        x = self.conv_in(z, cache)  # (B, base * dim_mult[-1], T', H', W')
        x = self.mid_block(x, cache)
        for block in self.up_blocks:
            x = block(x, cache)  # ... (B, base, T, H, W)
        return self.conv_out(F.silu(self.norm_out(x)), cache)  # (B, 3, T, H, W)


class WanVAE(nn.Module):
    """Causal 3D VAE with Wan-2.1's layout; `encode`/`decode` run chunked in time and optionally tiled.

    `encode` returns the *normalised posterior mean*, (mu - latents_mean) / latents_std per channel (what
    the diffusion model trains on); `decode` takes that and returns a video clamped to [-1, 1]. Pass
    normalize=False for raw latents (diffusers' `latent_dist.mean`). Inputs are cast to the VAE's dtype, and
    outputs come in it. Both run under no_grad: vgen's VAE is frozen; call `encoder`/`decoder` directly for
    gradients.
    """

    def __init__(self, cfg: VAEConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or VAEConfig()
        cfg.validate()
        self.latent_channels = cfg.z_dim
        self.spatial_ratio, self.temporal_ratio = cfg.spatial_ratio, cfg.temporal_ratio
        self.encoder = Encoder(cfg)
        self.quant_conv = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder(cfg)
        mean, std = cfg.latent_stats()
        # not persistent: the checkpoint (diffusers layout) keeps them in its config, not its weights
        self.register_buffer("latents_mean", torch.tensor(mean).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("latents_std", torch.tensor(std).view(1, -1, 1, 1, 1), persistent=False)
        self.tiling = cfg.tiling()

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T', H', W') of the latent of a (frames, height, width) video; raises on invalid sizes."""
        tr, sr = self.temporal_ratio, self.spatial_ratio
        if frames < 1:
            raise ValueError(f"video has {frames} frames; the VAE needs at least 1 (1 + {tr}k frames)")
        if (frames - 1) % tr:
            raise ValueError(
                f"video has {frames} frames; the causal VAE needs 1 + {tr}k frames (e.g. "
                f"{1 + tr * ((frames - 1) // tr)} or {1 + tr * ((frames - 1) // tr + 1)})"
            )
        if height % sr or width % sr or height < 1 or width < 1:
            raise ValueError(f"video size {height}x{width} must be positive multiples of {sr}")
        return self.latent_channels, 1 + (frames - 1) // tr, height // sr, width // sr

    @torch.no_grad()
    def encode_moments(self, video: torch.Tensor, tiling: Tiling | None = None):
        """(mean, logvar) of the posterior, raw (not normalised), each (B, z_dim, T', H', W').

        Args:
            video: (B, in_channels, 1 + 4k, H, W) in [-1, 1].
            tiling: overrides `self.tiling` (from the config) for this call.
        """
        if video.ndim != 5 or video.shape[1] != self.cfg.in_channels:
            raise ValueError(f"video must be (B, {self.cfg.in_channels}, T, H, W); got {tuple(video.shape)}")
        c, t, h, w = self.latent_shape(*video.shape[-3:])
        tiling = (tiling or self.tiling).checked(self.spatial_ratio)
        video = video.to(self.quant_conv.weight.dtype)  # e.g. fp32 clips into a bf16 VAE

        def stream(tile):
            cache = CausalCache()  # one per tile: each tile is its own causal pass over time
            for (l0, _), (p0, p1) in temporal_chunks(t, tiling.chunk, self.temporal_ratio):
                yield l0, self.quant_conv(self.encoder(tile[:, :, p0:p1], cache))

        shape = (video.shape[0], 2 * c, t, h, w)
        moments = tiled_apply(stream, video, shape, (h, w), self.spatial_ratio, 1, tiling, self.spatial_ratio)
        return moments.chunk(2, dim=1)

    def encode(self, video: torch.Tensor, normalize: bool = True, tiling: Tiling | None = None) -> torch.Tensor:
        """Posterior mean (B, z_dim, 1 + (T - 1) // 4, H / 8, W / 8); normalised unless normalize=False."""
        mean, _ = self.encode_moments(video, tiling)
        return (mean - self.latents_mean) / self.latents_std if normalize else mean

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, normalize: bool = True, tiling: Tiling | None = None) -> torch.Tensor:
        """Video (B, out_channels, 1 + 4 (T' - 1), 8 H', 8 W') in [-1, 1] from a latent (B, z_dim, T', H', W').

        Args:
            normalize: the latent is normalised (as `encode` returns it); False for raw latents.
            tiling: overrides `self.tiling` (from the config) for this call.
        """
        if latent.ndim != 5 or latent.shape[1] != self.latent_channels or min(latent.shape[2:]) < 1:
            raise ValueError(
                f"latent must be (B, {self.latent_channels}, T', H', W') with T', H', W' >= 1; "
                f"got {tuple(latent.shape)}"
            )
        latent = latent.to(self.post_quant_conv.weight.dtype)
        if normalize:
            latent = latent * self.latents_std + self.latents_mean
        b, _, t, h, w = latent.shape
        tiling = (tiling or self.tiling).checked(self.spatial_ratio)
        tr, sr = self.temporal_ratio, self.spatial_ratio

        def stream(tile):
            cache = CausalCache()
            for (l0, l1), (p0, _) in temporal_chunks(t, tiling.chunk, tr):
                yield p0, self.decoder(self.post_quant_conv(tile[:, :, l0:l1]), cache)

        shape = (b, self.cfg.out_channels, 1 + tr * (t - 1), h * sr, w * sr)
        return tiled_apply(stream, latent, shape, (h, w), 1, sr, tiling, sr).clamp_(-1.0, 1.0)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Reconstruction: decode(encode(video)) through the posterior mean."""
        return self.decode(self.encode(video))
