"""What the trainer trains: a task builds the model and turns one micro-batch into a loss.

`DiffusionTask` trains the DiT with flow matching, from videos (encoded on the fly by the frozen
autoencoder and text encoder) or from latent shards written by launch/encode.py. `VAETask` trains the
causal 3D VAE itself (L1 reconstruction + KL), with the same DeepSpeed machinery. Neither knows DeepSpeed:
they see the engine only as a callable module.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from vgen.diffusion.flow import add_noise, flow_matching_loss, sample_timesteps, timestep_shift
from vgen.models import build_dit, build_frozen_encoders
from vgen.train.i2v import condition_batch, draw_given


def step_generator(seed: int, step: int, dp_rank: int, micro: int) -> torch.Generator:
    """A generator for one micro-batch's timesteps, noise and caption dropout. Derived from its
    position, not carried state, so a resumed run draws exactly what an uninterrupted one would, and
    the ranks of one sequence-parallel group (same dp_rank) draw the same."""
    digest = hashlib.sha256(f"{seed}:{step}:{dp_rank}:{micro}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


class DiffusionTask:
    def __init__(self, cfg, device, loader):
        self.cfg, self.device, self.loader = cfg, device, loader
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.text_encoder, self.autoencoder = build_frozen_encoders(cfg, device)

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.cfg.run.seed)  # every rank starts from the same weights
        return build_dit(self.cfg.model, in_channels=self.autoencoder.latent_channels, text_dim=self.text_encoder.dim)

    def config_latent_shape(self) -> tuple[int, ...]:
        """(C, T, H, W) of one training latent, known before any batch is read."""
        if self.cfg.data.kind == "latents":
            return tuple(self.loader.meta["latent_shape"])
        d = self.cfg.data
        return tuple(self.autoencoder.latent_shape(d.num_frames, d.height, d.width))

    def signature(self, model) -> dict:
        """The settings a checkpoint must share with the config to be loaded into this model."""
        sig = {f"model.{k}": (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(model.cfg).items() if k != "attention"}
        sig.update({"train.task": "diffusion", "autoencoder.kind": self.cfg.autoencoder.kind, "text.max_length": self.cfg.text.max_length})
        return sig

    def _latents_and_text(self, batch, drop: list[bool]):
        if "latent" in batch:  # latent shards: everything was encoded offline
            null_emb, null_mask = self.loader.null_text()
            keep = torch.tensor([not d for d in drop])[:, None, None]
            text = torch.where(keep, batch["text"], null_emb[None].to(batch["text"].dtype))
            mask = torch.where(keep[..., 0], batch["text_mask"], null_mask[None])
            return batch["latent"].to(self.device).float(), text.to(self.device), mask.to(self.device)
        captions = ["" if d else c for c, d in zip(batch["caption"], drop)]
        x0 = self.autoencoder.encode(batch["video"].to(self.device)).float()  # (B, C, T, H, W)
        text, mask = self.text_encoder(captions)  # (B, L, dim), (B, L)
        return x0, text, mask

    def loss(self, engine, batch, step: int, dp_rank: int, micro: int):
        """Flow-matching loss of one micro-batch; returns (loss, tokens per sample)."""
        gen = step_generator(self.cfg.run.seed, step, dp_rank, micro)
        drop = (torch.rand(len(batch["caption"]), generator=gen) < self.cfg.text.dropout).tolist()
        with torch.no_grad():
            x0, text, mask = self._latents_and_text(batch, drop)
        model = engine.module
        T, H, W = model.token_grid(x0.shape)
        self.latent_shape = tuple(x0.shape[1:])
        d = self.cfg.diffusion
        shift = timestep_shift(T * H * W, d.shift_base_tokens, d.shift_max)
        t = sample_timesteps(x0.shape[0], gen, shift, d.logit_mean, d.logit_std).to(self.device)
        noise = torch.randn(x0.shape, generator=gen).to(self.device)
        xt = add_noise(x0, noise, t)
        frame_mask = None
        if model.cfg.cond_channels:  # image-to-video: some samples get their first frame(s), scored on the rest
            given = draw_given(x0.shape[0], gen, self.cfg.train.i2v_prob, self.cfg.train.i2v_frames)
            xt, frame_mask = condition_batch(xt, x0, given)
        pred = engine(xt.to(self.dtype), t, text.to(self.dtype), mask.to(self.device), frame_mask=frame_mask)
        weight = None if frame_mask is None else 1.0 - frame_mask
        return flow_matching_loss(pred, x0, noise, weight=weight), T * H * W

    def flops_per_sample(self, model) -> float:
        return model.flops_per_sample(self.latent_shape, self.cfg.text.max_length)

    def sample(self, model, out_dir, write: bool) -> None:
        from vgen.sample import generate_to_dir

        generate_to_dir(model, self.text_encoder, self.autoencoder, self.cfg, out_dir, write=write)

    def export_weights(self, state: dict) -> dict:
        return state


class VAETrainModule(nn.Module):
    """The VAE with a differentiable, sampled encode -> decode pass for training."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, video, eps):
        from vgen.models.vae import CausalCache

        h = self.vae.quant_conv(self.vae.encoder(video, CausalCache()))  # (B, 2z, T', H', W')
        mean, logvar = h.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        z = mean + (0.5 * logvar).exp() * eps
        recon = self.vae.decoder(self.vae.post_quant_conv(z), CausalCache())  # (B, 3, T, H, W)
        return recon, mean, logvar


class VAETask:
    def __init__(self, cfg, device, loader):
        if cfg.autoencoder.kind != "vae":
            raise ValueError("train.task=vae needs autoencoder.kind=vae (the VAE to train)")
        self.cfg, self.device, self.loader = cfg, device, loader

    def build_model(self) -> nn.Module:
        from vgen.models.vae import build_vae

        torch.manual_seed(self.cfg.run.seed)
        return VAETrainModule(build_vae(self.cfg.autoencoder).train().requires_grad_(True))

    def signature(self, model) -> dict:
        return {"train.task": "vae", "autoencoder.vae": str(dataclasses.asdict(model.vae.cfg))}

    def loss(self, engine, batch, step: int, dp_rank: int, micro: int):
        video = batch["video"].to(self.device)
        self._last_video = video[:4]  # reconstructed by sample(), without drawing from the loader
        C, T, H, W = engine.module.vae.latent_shape(*video.shape[-3:])
        gen = step_generator(self.cfg.run.seed, step, dp_rank, micro)
        eps = torch.randn((video.shape[0], C, T, H, W), generator=gen).to(self.device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        recon, mean, logvar = engine(video.to(dtype), eps.to(dtype))
        kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float()).mean()
        self.latent_shape = (C, T, H, W)
        return F.l1_loss(recon.float(), video) + self.cfg.train.kl_weight * kl, T * H * W

    def flops_per_sample(self, model) -> float:
        return float("nan")

    def sample(self, model, out_dir, write: bool) -> None:
        """Reconstructions of the next batch, side by side with the input."""
        from vgen.data.video import write_mp4

        video = self._last_video
        with torch.no_grad():
            recon = model.vae.decode(model.vae.encode(video))
        if write:
            for i, (a, b) in enumerate(zip(video, recon)):
                write_mp4(f"{out_dir}/recon{i:02d}.mp4", torch.cat([a, b.float()], dim=-1).cpu(), fps=self.cfg.sample.fps)

    def export_weights(self, state: dict) -> dict:
        """diffusers-layout keys, loadable by autoencoder.weights."""
        return {k.removeprefix("vae."): v for k, v in state.items()}


def build_task(cfg, device, loader):
    return {"diffusion": DiffusionTask, "vae": VAETask}[cfg.train.task](cfg, device, loader)
