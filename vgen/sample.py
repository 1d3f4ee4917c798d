"""Sampling: Euler integration of the flow with classifier-free guidance, from a run directory's exported
safetensors (never pickles), writing one mp4 per prompt and a manifest.jsonl beside them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from vgen.diffusion.flow import euler_sample, guided_velocity, timestep_shift


def prompt_noise(shape, seed: int, index: int) -> torch.Tensor:
    """Noise for prompt `index`: depends on (seed, index) only, not on batch composition or rank."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 100_003 + index))


@torch.no_grad()
def generate(model, text_encoder, autoencoder, prompts: list[str], latent_shape, *, steps: int, guidance: float,
             negative_prompt: str = "", seed: int = 0, shift: float = 1.0, device="cpu", first_index: int = 0):
    """Videos (B, 3, T, H, W) in [-1, 1] for `prompts`.

    Args:
        latent_shape: (C, T, H, W) of one latent.
        first_index: index of prompts[0] in the whole prompt list (for its noise seed).
    """
    model.eval()
    dtype = next(model.parameters()).dtype
    cond = [x.to(device) for x in text_encoder(prompts)]
    uncond = [x.to(device) for x in text_encoder([negative_prompt] * len(prompts))]
    cond[0], uncond[0] = cond[0].to(dtype), uncond[0].to(dtype)
    noise = torch.stack([prompt_noise(tuple(latent_shape), seed, first_index + i) for i in range(len(prompts))])

    def velocity(x, t):
        return guided_velocity(model, x.to(dtype), t, cond, uncond, guidance).float()

    latents = euler_sample(velocity, noise.to(device), steps, shift)
    return autoencoder.decode(latents).clamp(-1, 1)


def default_prompts(cfg) -> list[str]:
    if cfg.sample.prompts:
        return list(cfg.sample.prompts)
    from vgen.data.demo import eval_prompts

    return eval_prompts()


def latent_shape_for(cfg, autoencoder) -> tuple[int, ...]:
    return tuple(autoencoder.latent_shape(cfg.data.num_frames, cfg.data.height, cfg.data.width))


def generate_to_dir(model, text_encoder, autoencoder, cfg, out_dir, prompts=None, write=True, batch: int = 8) -> Path:
    """Generate every prompt, write `out_dir/NNN.mp4` and `out_dir/manifest.jsonl` (when `write`)."""
    from vgen.data.video import write_mp4

    prompts = list(prompts) if prompts else default_prompts(cfg)
    out_dir = Path(out_dir)
    device = next(model.parameters()).device
    shape = latent_shape_for(cfg, autoencoder)
    s = cfg.sample
    shift = timestep_shift(_tokens(model, shape), cfg.diffusion.shift_base_tokens, cfg.diffusion.shift_max)
    rows = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        videos = generate(model, text_encoder, autoencoder, chunk, shape, steps=s.steps, guidance=s.guidance,
                          negative_prompt=s.negative_prompt, seed=s.seed, shift=shift, device=device, first_index=start)
        for i, (prompt, video) in enumerate(zip(chunk, videos)):
            name = f"{start + i:03d}.mp4"
            if write:
                write_mp4(out_dir / name, video.cpu(), fps=s.fps)
            rows.append({"prompt": prompt, "path": name})
    if write:
        (out_dir / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out_dir


def _tokens(model, latent_shape) -> int:
    T, H, W = model.token_grid(latent_shape)
    return T * H * W


def load_run_for_sampling(run_dir, overrides: list[str] | None = None, device="cpu"):
    """Rebuild the model, text encoder and autoencoder of a run from RUN/config.yaml and its exported
    safetensors. Returns (cfg, model, text_encoder, autoencoder)."""
    from safetensors.torch import load_file

    from vgen.models import build_dit
    from vgen.models.autoencoder import build_autoencoder
    from vgen.models.text_encoder import TextEncoder

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"run.dir={str(run_dir)!r} has no config.yaml: not a vgen run directory")
    cfg = OmegaConf.merge(OmegaConf.load(cfg_path), OmegaConf.from_dotlist(list(overrides or [])))
    weights = run_dir / "export" / ("ema.safetensors" if cfg.sample.ema else "model.safetensors")
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist: the run has not saved a checkpoint yet")
    text_encoder = TextEncoder(cfg.text.encoder_path, cfg.text.max_length, device=device)
    autoencoder = build_autoencoder(cfg.autoencoder)
    if isinstance(autoencoder, torch.nn.Module):
        autoencoder = autoencoder.to(device).eval()
    model = build_dit(cfg.model, in_channels=autoencoder.latent_channels, text_dim=text_encoder.dim)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return cfg, model.to(device).eval(), text_encoder, autoencoder
