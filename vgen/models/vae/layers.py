"""Causal 3D building blocks of the Wan-2.1 VAE and the cache that carries past frames between chunks.

Every temporal operation looks only at the past, so a clip can be processed in consecutive frame chunks:
each layer keeps, in a `CausalCache`, exactly the past frames its next chunk needs, and a fresh cache
stands for "this chunk starts at frame 0". Chunked and unchunked passes therefore share one code path and
agree to float rounding.

Submodule and parameter names (`norm1.gamma`, `resample.1.weight`, `time_conv.bias`, ...) mirror
diffusers' `AutoencoderKLWan` so its state dict loads without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class CausalCache:
    """Per-layer state carried from one temporal chunk to the next (one encoder or decoder pass).

    Keys are module identities, so one cache must not be shared by two passes running interleaved
    (e.g. two spatial tiles): give each tile its own cache.
    """

    def __init__(self):
        self._state: dict[int, object] = {}

    def get(self, module: nn.Module):
        return self._state.get(id(module))

    def put(self, module: nn.Module, value) -> None:
        self._state[id(module)] = value

    def nbytes(self) -> int:
        """Bytes held in cached frames (what chunking costs on top of one chunk's activations)."""
        return sum(v.numel() * v.element_size() for v in self._state.values() if torch.is_tensor(v))


class CausalConv3d(nn.Conv3d):
    """Conv3d zero-padded by `2 * padding[0]` frames on the past side only, symmetric in space.

    With a cache, the last `time_pad` input frames of a chunk replace the zero padding of the next one.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        self.time_pad = 2 * self.padding[0]
        if self.time_pad and self.stride[0] != 1:
            # a strided window would need its phase carried too; Wan only strides unpadded time convs
            raise ValueError("CausalConv3d: temporal padding with temporal stride > 1 is not supported")
        # time is padded by hand (past side only); space keeps Conv3d's own zero padding, saving a copy
        self.padding = (0, self.padding[1], self.padding[2])

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        if self.time_pad == 0:
            return super().forward(x)
        past = cache.get(self) if cache is not None else None
        if past is None:
            seq = F.pad(x, (0, 0, 0, 0, self.time_pad, 0))  # (B, C, pad + T, H, W)
        else:
            seq = torch.cat([past, x], dim=2)
        if cache is not None:
            # clone: a slice would keep the whole chunk's storage alive until the next chunk
            cache.put(self, seq[:, :, -self.time_pad :].clone())
        return super().forward(seq)


class RMSNorm(nn.Module):
    """L2-normalise over channels, times sqrt(dim) and a learnt per-channel gain `gamma`.

    Args:
        images: inputs are (N, C, H, W) frames rather than (B, C, T, H, W) clips; only changes
            gamma's shape, which must match the checkpoint's.
    """

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # half precision loses the sum of squares over hundreds of channels: normalise in fp32
        low = x.dtype in (torch.float16, torch.bfloat16)
        y = F.normalize(x.float() if low else x, dim=1).to(x.dtype)
        return y * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """norm -> SiLU -> causal 3x3x3 conv, twice, plus a (1x1x1 conv when widths differ) shortcut."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        h = self.conv_shortcut(x)
        x = self.conv1(F.silu(self.norm1(x)), cache)
        x = self.conv2(F.silu(self.norm2(x)), cache)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention among the pixels of each frame (no mixing across time)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = rearrange(x, "b c t h w -> (b t) c h w")
        qkv = self.to_qkv(self.norm(y))  # (BT, 3C, H, W)
        q, k, v = rearrange(qkv, "n c h w -> n 1 (h w) c").chunk(3, dim=-1)  # (BT, 1, HW, C) each
        y = F.scaled_dot_product_attention(q, k, v)
        y = self.proj(rearrange(y, "n 1 (h w) c -> n c h w", h=h, w=w))
        return x + rearrange(y, "(b t) c h w -> b c t h w", b=b, t=t)


class Resample(nn.Module):
    """2x spatial (and optionally 2x temporal) down- or upsampling.

    Temporal resampling is causal and keeps frame 0 on its own: downsampling maps 1 + 2k frames to 1 + k
    (frame 0 passes through, then windows of 3 frames with stride 2 starting at frame 0); upsampling maps
    1 + k frames to 1 + 2k (frame 0 passes through, every later frame becomes two via a causal time conv
    whose output channels hold the two frames).

    Args:
        mode: "downsample2d" | "downsample3d" | "upsample2d" | "upsample3d".
        out_dim: output channels of the upsampling conv (downsampling keeps `dim`); default dim // 2.
    """

    def __init__(self, dim: int, mode: str, out_dim: int | None = None):
        super().__init__()
        self.mode = mode
        out_dim = dim // 2 if out_dim is None else out_dim
        if mode.startswith("upsample"):
            up = nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact")
            self.resample = nn.Sequential(up, nn.Conv2d(dim, out_dim, 3, padding=1))
        elif mode.startswith("downsample"):
            # Wan pads right/bottom only, so output pixel (i, j) sees input pixels 2i..2i+2
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            raise ValueError(f"Resample mode {mode!r} must be down/upsample 2d/3d")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._time_up(x, cache)
        b = x.shape[0]
        y = self.resample(rearrange(x, "b c t h w -> (b t) c h w"))
        x = rearrange(y, "(b t) c h w -> b c t h w", b=b)
        if self.mode == "downsample3d":
            x = self._time_down(x, cache)
        return x

    def _time_up(self, x, cache):
        started = cache is not None and cache.get(self) is not None
        if cache is not None:
            cache.put(self, True)
        # before the first chunk the time conv's own cache is empty, i.e. frame 0 is not its context
        parts = [] if started else [x[:, :, :1]]
        rest = x if started else x[:, :, 1:]
        if rest.shape[2]:
            y = self.time_conv(rest, cache)  # (B, 2C, T, H, W)
            parts.append(rearrange(y, "b (two c) t h w -> b c (t two) h w", two=2))
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]

    def _time_down(self, x, cache):
        past = cache.get(self) if cache is not None else None
        if past is None:  # first chunk: 1 + 2k frames
            if x.shape[2] % 2 == 0:
                raise ValueError(f"temporal downsampling: first chunk has {x.shape[2]} frames, needs 1 + 2k")
            out = x[:, :, :1]
            if x.shape[2] > 1:
                out = torch.cat([out, self.time_conv(x)], dim=2)
        else:  # later chunks: 2k frames, the window straddling the boundary starts at `past`
            if x.shape[2] % 2:
                raise ValueError(f"temporal downsampling: a later chunk has {x.shape[2]} frames, needs 2k")
            out = self.time_conv(torch.cat([past, x], dim=2))
        if cache is not None:
            cache.put(self, x[:, :, -1:].clone())
        return out
