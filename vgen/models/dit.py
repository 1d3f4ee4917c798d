"""The video DiT: Vchitect-2.0-style spatial/temporal/cross-attention blocks, adaLN timestep conditioning.

Each block runs, on the adaLN-modulated tokens, in parallel:
  spatial self-attention (tokens of one frame) and cross-attention (tokens -> text), fused by one linear
  layer over their concatenated heads, plus temporal self-attention (one position across frames);
then an MLP. This file knows nothing of distributed training: sequence parallelism replaces the attention
cores, the blocks' `temporal_seam` and the `seq_in` / `seq_out` seams from vgen/parallel.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from vgen.models.attention import CrossAttention, RMSNorm, SelfAttention
from vgen.models.lean_ops import modulate, norm_modulate
from vgen.models.pos_embed import sincos_pos_embed
from vgen.models.presets import DiTConfig
from vgen.models.rope import rope_tables


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):  # t: (B,) in [0, 1]
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * 1000.0)[:, None] * freqs[None]
        emb = torch.cat([args.cos(), args.sin()], dim=-1)  # (B, freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))  # (B, D)


class MLP(nn.Module):
    def __init__(self, hidden: int, ratio: float):
        super().__init__()
        inner = int(hidden * ratio)
        self.fc1, self.act, self.fc2 = nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class STBlock(nn.Module):
    """One spatial/temporal/cross-attention block. Parameters: 26 * hidden^2 (+ biases, norms)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D, h = cfg.hidden, cfg.heads
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.spatial = SelfAttention(D, h, "spatial", cfg.qk_norm, project=False, backend=cfg.attention)
        self.cross = CrossAttention(D, h, cfg.qk_norm, backend=cfg.attention)
        self.fuse = nn.Linear(2 * D, D)  # the output projection of spatial and cross attention together
        self.temporal = SelfAttention(D, h, "temporal", cfg.qk_norm, project=True, backend=cfg.attention)
        self.temporal_seam = TemporalSeam()  # switch SP moves h to the temporal layout here
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(D, cfg.mlp_ratio)
        # adaLN-Zero: shift/scale/gate for attention and MLP; zero init makes every block start as identity
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x, cond, ctx, ctx_mask, rope, grid):
        # x: (B, N, D); cond: (B, D); ctx: (B, L, D); ctx_mask: (B, L)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.ada(cond).chunk(6, dim=-1)  # each (B, D)
        h = norm_modulate(self.norm1, x, shift_a, scale_a)  # (B, N, D), keeps only x for backward
        sent = self.temporal_seam.send(h, rope, grid)  # switch SP: the exchange of h starts here...
        spatial = self.spatial(h, rope, grid)  # (B, N, D)
        cross = self.cross(h, ctx, ctx_mask, grid)  # (B, N, D)
        temporal = self.temporal_seam.run(self.temporal, sent)  # ...and is waited for here; (B, N, D)
        attn = self.fuse(torch.cat([spatial, cross], dim=-1)) + temporal  # (B, N, D)
        x = x + gate_a[:, None] * attn
        x = x + gate_m[:, None] * self.mlp(norm_modulate(self.norm2, x, shift_m, scale_m))
        return x  # (B, N, D)


class TemporalSeam(nn.Module):
    """Identity around a block's temporal attention: `run(layer, send(h, rope, grid))` is
    `layer(h, rope, grid)`. Switch sequence parallelism replaces it with a module that sends h to the
    "all frames, some positions" layout in `send` and brings the output back in `run`."""

    def send(self, h, rope, grid):
        return h, rope, grid

    def run(self, layer: nn.Module, sent):
        return layer(*sent)


class SequenceSeam(nn.Module):
    """Identity at the model's entry/exit. Sequence parallelism replaces `seq_in` with the cut of this
    rank's tokens (and `rows`: its RoPE rows), and `seq_out` with the matching gather of the final layer's
    output (or none: per-shard loss, `returns_shard`)."""

    def forward(self, x, grid=None):
        return x

    def rows(self, grid):
        return None  # every token

    def returns_shard(self) -> bool:
        return False


class FinalLayer(nn.Module):
    def __init__(self, D: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.linear = nn.Linear(D, out_dim)
        for layer in (self.ada[1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, cond):
        shift, scale = self.ada(cond).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class VideoDiT(nn.Module):
    """Predicts the flow-matching velocity of a latent video.

    forward(x (B, C, T, H, W), t (B,), text (B, L, text_dim), text_mask (B, L) bool) -> (B, C, T, H, W)
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        D, (pt, ph, pw) = cfg.hidden, cfg.patch
        patch_dim = cfg.in_channels * pt * ph * pw
        self.patch_embed = nn.Linear(patch_dim, D)
        # image-to-video: the given-frame mask, embedded per token; zero init starts as text-to-video
        self.cond_embed = nn.Linear(cfg.cond_channels * pt * ph * pw, D) if cfg.cond_channels else None
        if self.cond_embed is not None:
            nn.init.zeros_(self.cond_embed.weight)
            nn.init.zeros_(self.cond_embed.bias)
        self.t_embed = TimestepEmbedder(D)
        self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))
        self.text_norm = RMSNorm(D)
        self.pooled_proj = nn.Linear(D, D)  # mean text embedding joins the timestep in adaLN conditioning
        self.seq_in, self.seq_out = SequenceSeam(), SequenceSeam()
        self.blocks = nn.ModuleList(STBlock(cfg) for _ in range(cfg.depth))
        self.final = FinalLayer(D, patch_dim)

    def token_grid(self, shape) -> tuple[int, int, int]:
        T, H, W = shape[-3:]
        pt, ph, pw = self.cfg.patch
        if T % pt or H % ph or W % pw:
            raise ValueError(f"latent (T, H, W)={(T, H, W)} is not divisible by model.patch={self.cfg.patch}")
        return T // pt, H // ph, W // pw

    def embed_text(self, text, text_mask):
        ctx = self.text_norm(self.text_proj(text))  # (B, L, D)
        m = text_mask[..., None].to(ctx.dtype)
        pooled = (ctx * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, D)
        return ctx, self.pooled_proj(pooled)

    def patchify(self, x):
        """(B, C, T, H, W) latent -> (B, N, patch_dim) tokens in (t, h, w) order."""
        pt, ph, pw = self.cfg.patch
        return rearrange(x, "b c (t pt) (h ph) (w pw) -> b (t h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw)

    def forward(self, x, t, text, text_mask, frame_mask=None):
        # frame_mask: (B, cond_channels, T, H, W) image-to-video, 1 on given latent frames; None = text-to-video
        B = x.shape[0]
        grid = self.token_grid(x.shape)
        patches = self.seq_in(self.patchify(x), grid=grid)  # (B, N_local, patch_dim): SP embeds only its own
        tokens = self.patch_embed(patches)  # (B, N_local, D)
        if self.cond_embed is not None:  # no mask: nothing given, as training's text-to-video samples see it
            fm = x.new_zeros((B, self.cfg.cond_channels, *x.shape[2:])) if frame_mask is None else frame_mask.to(x.dtype)
            tokens = tokens + self.cond_embed(self.seq_in(self.patchify(fm), grid=grid))  # (B, N_local, D)
        if self.cfg.abs_pos:
            tokens = tokens + sincos_pos_embed(grid, self.cfg.hidden, x.device, tokens.dtype,
                                               rows=self.seq_in.rows(grid))  # (N_local, D)
        ctx, pooled = self.embed_text(text, text_mask)  # (B, L, D), (B, D)
        cond = self.t_embed(t) + pooled  # (B, D)
        rope = rope_tables(grid, self.cfg.head_dim, device=x.device, rows=self.seq_in.rows(grid))  # 2 x (N_local, head_dim / 2)
        for block in self.blocks:
            tokens = block(tokens, cond, ctx, text_mask, rope, grid)  # (B, N_local, D)
        out = self.final(tokens, cond)  # (B, N_local, patch_dim)
        # gather after the final layer, so every parameter's gradient is a partial sum over SP ranks
        out = self.seq_out(out, grid=grid)  # (B, N, patch_dim)
        if self.seq_out.returns_shard():
            return out  # (B, N_local, patch_dim): per-shard loss (vgen/parallel/sequence.py, shard_mse)
        T, H, W = grid
        pt, ph, pw = self.cfg.patch
        return rearrange(out, "b (t h w) (c pt ph pw) -> b c (t pt) (h ph) (w pw)", b=B, t=T, h=H, w=W, pt=pt, ph=ph, pw=pw)

    def flops_per_sample(self, latent_shape, text_len: int) -> float:
        """Forward + backward model FLOPs for one sample (3x the forward matmuls, attention included)."""
        T, H, W = self.token_grid(latent_shape)
        N, D, L = T * H * W, self.cfg.hidden, text_len
        block_params = sum(p.numel() for p in self.blocks[0].parameters() if p.dim() == 2)
        ada = self.blocks[0].ada[1].weight.numel()  # applied once per sample, not per token
        kv_text = self.blocks[0].cross.kv.weight.numel()  # applied to L text tokens, not N
        per_block = 2 * (N * (block_params - ada - kv_text) + ada + L * kv_text)
        attn = 2 * 2 * D * (N * H * W + N * T + N * L)  # QK^T and PV of spatial, temporal, cross
        other = 2 * N * (self.patch_embed.weight.numel() + self.final.linear.weight.numel())
        return 3.0 * (self.cfg.depth * (per_block + attn) + other)
