"""Sampling: Euler integration of the flow with classifier-free guidance, from a run directory's exported
safetensors (never pickles), writing one mp4 per prompt and a manifest.jsonl beside them.

Under a multi-process launcher every rank runs the same generation (same prompts, same per-prompt noise)
through the sequence-parallel model, so every rank ends with the same videos; only rank 0 writes them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from omegaconf import OmegaConf

from vgen.config import ConfigError
from vgen.contact_sheet import write_contact_sheet
from vgen.diffusion.flow import configured_shift, euler_sample, guided_velocity
from vgen.train.i2v import condition_batch

# settings only the sampler reads; every other override must name a key of the run's config.yaml
# sample.save_raw: also write NNN.safetensors ({"video": float32 (3, T, H, W) in [-1, 1]}) beside each mp4
# sample.image: an image or video whose first frame starts every video (image-to-video, needs model.i2v)
SAMPLER_KEYS = {"sample.save_raw": False, "sample.image": None}
SHEET_NAME = "contact_sheet.png"
_ABSENT = object()


def prompt_noise(shape, seed: int, index: int) -> torch.Tensor:
    """Noise for prompt `index`: depends on (seed, index) only, not on batch composition or rank."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 100_003 + index))


@torch.no_grad()
def generate(model, text_encoder, autoencoder, prompts: list[str], latent_shape, *, steps: int, guidance: float,
             negative_prompt: str = "", seed: int = 0, shift: float = 1.0, device="cpu", first_index: int = 0,
             first_frames: torch.Tensor | None = None):
    """Videos (B, 3, T, H, W) in [-1, 1] for `prompts`.

    Args:
        latent_shape: (C, T, H, W) of one latent.
        first_index: index of prompts[0] in the whole prompt list (for its noise seed).
        first_frames: image-to-video: (B or 1, C, k, H, W) latent frames the videos start with; they are
            held fixed while the other frames are generated (vgen/train/i2v.py).
    """
    model.eval()
    dtype = next(model.parameters()).dtype
    cond = [x.to(device) for x in text_encoder(prompts)]
    uncond = [x.to(device) for x in text_encoder([negative_prompt] * len(prompts))]
    cond[0], uncond[0] = cond[0].to(dtype), uncond[0].to(dtype)
    noise = torch.stack([prompt_noise(tuple(latent_shape), seed, first_index + i) for i in range(len(prompts))])

    noise, model_fn, keep = noise.to(device), model, None
    if first_frames is not None:
        given = torch.full((len(prompts),), first_frames.shape[2], dtype=torch.long)
        x0 = torch.zeros_like(noise)
        x0[:, :, : first_frames.shape[2]] = first_frames.to(device, noise.dtype)
        noise, frame_mask = condition_batch(noise, x0, given)
        keep = 1.0 - frame_mask  # the given frames do not move

        def model_fn(x, t, text, mask):
            fm = frame_mask.repeat(x.shape[0] // frame_mask.shape[0], 1, 1, 1, 1)  # both halves under guidance
            return model(x, t, text, mask, frame_mask=fm.to(dtype))

    def velocity(x, t):
        v = guided_velocity(model_fn, x.to(dtype), t, cond, uncond, guidance).float()
        return v if keep is None else v * keep

    latents = euler_sample(velocity, noise, steps, shift)
    return autoencoder.decode(latents).clamp(-1, 1)


def default_prompts(cfg) -> list[str]:
    if cfg.sample.prompts:
        return list(cfg.sample.prompts)
    from vgen.data.demo import eval_prompts

    return eval_prompts()


def latent_shape_for(cfg, autoencoder) -> tuple[int, ...]:
    return tuple(autoencoder.latent_shape(cfg.data.num_frames, cfg.data.height, cfg.data.width))


def generate_to_dir(model, text_encoder, autoencoder, cfg, out_dir, prompts=None, write=True, batch: int = 8) -> Path:
    """Generate every prompt, write `out_dir/NNN.mp4`, `out_dir/manifest.jsonl` and `out_dir/contact_sheet.png`
    (one row per prompt, its frames across) when `write`, and `out_dir/NNN.safetensors` with the float
    video too when `sample.save_raw` is set. With `sample.image` every video starts with that file's
    first frame.

    Args:
        write: False on every rank but one when several ranks generate the same videos.
    """
    from vgen.data.video import write_mp4

    prompts = list(prompts) if prompts else default_prompts(cfg)
    out_dir = Path(out_dir)
    device = next(model.parameters()).device
    shape = latent_shape_for(cfg, autoencoder)
    s = cfg.sample
    save_raw = bool(OmegaConf.select(cfg, "sample.save_raw", default=SAMPLER_KEYS["sample.save_raw"]))
    shift = configured_shift(_tokens(model, shape), cfg.diffusion)
    image = OmegaConf.select(cfg, "sample.image", default=None)
    first = first_latent_frames(image, autoencoder, cfg, model, device) if image else None
    rows, sheet = [], []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        videos = generate(model, text_encoder, autoencoder, chunk, shape, steps=s.steps, guidance=s.guidance,
                          negative_prompt=s.negative_prompt, seed=s.seed, shift=shift, device=device, first_index=start,
                          first_frames=first)
        sheet += list(videos.cpu())
        for i, (prompt, video) in enumerate(zip(chunk, videos)):
            name = f"{start + i:03d}.mp4"
            if write:
                write_mp4(out_dir / name, video.cpu(), fps=s.fps)
                if save_raw:
                    _save_raw(out_dir / f"{start + i:03d}.safetensors", video)
            rows.append({"prompt": prompt, "path": name})
    if write:
        (out_dir / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        write_contact_sheet(out_dir / SHEET_NAME, sheet)
    return out_dir


def first_latent_frames(path, autoencoder, cfg, model, device) -> torch.Tensor:
    """(1, C, k, H, W) latent of the first frame of an image or video file, at the run's size.

    Raises:
        ConfigError: the model has no image-to-video input, or the file is not a readable image/video.
    """
    from vgen.data.video import VideoDecodeError, decode_video

    if not model.cfg.cond_channels:
        raise ConfigError(f"sample.image={path!r}: this run's model was trained without model.i2v=true")
    try:  # PyAV reads images (PNG, JPEG, ...) as one-frame videos
        frame = decode_video(Path(path).read_bytes(), 1, cfg.data.height, cfg.data.width, start=0)  # (3, 1, H, W)
    except (OSError, VideoDecodeError) as err:
        raise ConfigError(f"sample.image={path!r}: {err}") from err
    with torch.no_grad():
        return autoencoder.encode(frame[None].to(device)).float()


def _save_raw(path: Path, video: torch.Tensor) -> None:
    from safetensors.torch import save_file

    save_file({"video": video.detach().float().cpu().contiguous()}, str(path))


def _tokens(model, latent_shape) -> int:
    T, H, W = model.token_grid(latent_shape)
    return T * H * W


def load_run_for_sampling(run_dir, overrides: list[str] | None = None, device="cpu", world_size: int = 1):
    """Rebuild the model, text encoder and autoencoder of a run from RUN/config.yaml and its exported
    safetensors. Returns (cfg, model, text_encoder, autoencoder).

    Args:
        overrides: `key=value` settings on top of the run's config; each must name a key the config has
            (or one of SAMPLER_KEYS), so a typo fails instead of being ignored.
        world_size: processes of the sampling job. `parallel.sp.degree` defaults to it: the run's SP
            setting described its training job, and the sampler spends every rank on each video.
    """
    from safetensors.torch import load_file

    from vgen.models import build_dit, build_frozen_encoders

    run_dir, overrides = Path(run_dir), list(overrides or [])
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"run.dir={str(run_dir)!r} has no config.yaml: not a vgen run directory")
    cfg = _merge_overrides(OmegaConf.load(cfg_path), overrides)
    if OmegaConf.select(cfg, "train.task", default="diffusion") != "diffusion":
        raise ConfigError(f"run.dir={str(run_dir)!r} trained train.task={cfg.train.task!r}; launch/sample.py samples DiT runs")
    if not any(o.startswith("parallel.sp.degree=") for o in overrides):
        cfg.parallel.sp.degree = world_size
    name = "ema.safetensors" if cfg.sample.ema else "model.safetensors"
    weights = run_dir / "export" / name
    if not weights.is_file():
        raise FileNotFoundError(f"run.dir={str(run_dir)!r} has no export/{name}: the run has not saved a checkpoint yet")
    text_encoder, autoencoder = build_frozen_encoders(cfg, device)
    model = build_dit(cfg.model, in_channels=autoencoder.latent_channels, text_dim=text_encoder.dim)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return cfg, model.to(device).eval(), text_encoder, autoencoder


def _merge_overrides(cfg, overrides: list[str]):
    for item in overrides:
        key = item.split("=", 1)[0]
        if "=" not in item or (key not in SAMPLER_KEYS and OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT):
            raise ConfigError(f"{item!r} is not a setting of this run's config.yaml (expected key=value)")
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))


def sampling_device() -> torch.device:
    """This rank's GPU under a launcher (LOCAL_RANK), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_sampling_parallel(model, cfg, device: torch.device):
    """Start the process group and apply `cfg.parallel` (sequence parallelism first) to `model` when the
    job has several processes (WORLD_SIZE > 1). Returns the topology, or None for one process.

    Every setting is checked before the process group starts, so bad ones exit on every rank with a
    message naming them instead of leaving other ranks waiting.
    """
    from vgen.parallel.parallelize import parallelize
    from vgen.parallel.topology import build_topology, check_heads, init_process_group, sp_layout

    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        ulysses, _ = sp_layout(cfg.parallel.sp, world)
        check_heads(model.cfg.heads, str(cfg.parallel.sp.mode), ulysses)
    except ValueError as err:
        raise ConfigError(f"{err} (this sampling job has {world} process(es): start N with deepspeed --num_gpus N or torchrun)") from err
    if world == 1:
        return None
    init_process_group(device.type)
    topology = build_topology(cfg.parallel.sp, heads=model.cfg.heads)
    if topology.rank == 0:
        note = f"; its {topology.dp_size} SP groups repeat the same work" if topology.dp_size > 1 else ""
        print(f"[vgen] sequence parallel: mode={topology.sp_mode} degree={topology.sp_size} (ulysses "
              f"{topology.ulysses_size} x ring {topology.ring_size}) on {world} processes{note}", flush=True)
    parallelize(model, cfg, topology)
    return topology
