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

from vgen.diffusion.flow import add_noise, configured_shift, flow_matching_loss, sample_timesteps, velocity_target
from vgen.models import build_dit, build_frozen_encoders
from vgen.train.i2v import condition_batch, draw_given


def sample_generator(seed: int, step: int, sample_id) -> torch.Generator:
    """A generator for one sample's timestep, noise and caption dropout, keyed by the sample's stable id
    and the step, not by (rank, micro-step): a run resumed on another number of ranks, or with another
    micro-batch, draws for each sample exactly what the uninterrupted run drew, and the ranks of one
    sequence-parallel group (same samples) draw the same."""
    digest = hashlib.sha256(f"{seed}:{step}:{sample_id}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def sample_ids(batch: dict) -> list:
    """Stable per-sample ids of a batch: the loader's `sample_id` (a slot of the global order) when it
    gives one, else the shard key."""
    return list(batch["sample_id"] if "sample_id" in batch else batch["key"])


def per_sample_generators(seed: int, step: int, batch: dict) -> list[torch.Generator]:
    return [sample_generator(seed, step, i) for i in sample_ids(batch)]


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
        buckets = getattr(self.loader, "buckets", None) or []  # with data.buckets: the one of most tokens
        shapes = [self.autoencoder.latent_shape(b.frames, b.height, b.width) for b in buckets]
        return tuple(max(shapes, key=lambda s: s[1] * s[2] * s[3], default=None)
                     or self.autoencoder.latent_shape(d.num_frames, d.height, d.width))

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
        gens = per_sample_generators(self.cfg.run.seed, step, batch)
        drop = [bool(torch.rand(1, generator=g) < self.cfg.text.dropout) for g in gens]
        with torch.no_grad():
            x0, text, mask = self._latents_and_text(batch, drop)
        model = engine.module
        T, H, W = model.token_grid(x0.shape)
        self.latent_shape = tuple(x0.shape[1:])
        d = self.cfg.diffusion
        shift = configured_shift(T * H * W, d)
        t = torch.cat([sample_timesteps(1, g, shift, d.logit_mean, d.logit_std) for g in gens]).to(self.device)
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(self.device)
        xt = add_noise(x0, noise, t)
        frame_mask = None
        # image-to-video: some samples get their first frame(s), scored on the rest (an image bucket has no rest)
        if model.cfg.cond_channels and x0.shape[2] > self.cfg.train.i2v_frames:
            given = draw_given(x0.shape[0], gens, self.cfg.train.i2v_prob, self.cfg.train.i2v_frames)
            xt, frame_mask = condition_batch(xt, x0, given)
        pred = engine(xt.to(self.dtype), t, text.to(self.dtype), mask.to(self.device), frame_mask=frame_mask)
        weight = None if frame_mask is None else 1.0 - frame_mask
        if pred.dim() == 3:  # this rank's tokens only (parallel.sp.shard_loss): loss summed over the SP group
            from vgen.parallel.sequence import shard_mse

            return shard_mse(model, pred, velocity_target(x0, noise), weight=weight), T * H * W
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
        gens = per_sample_generators(self.cfg.run.seed, step, batch)
        eps = torch.stack([torch.randn((C, T, H, W), generator=g) for g in gens]).to(self.device)
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
