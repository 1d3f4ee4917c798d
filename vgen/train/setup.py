"""Start-up pieces of a training run: device, process group, seeds, the frozen encoders, the model."""

from __future__ import annotations

import dataclasses
import os

import torch

from vgen.models import build_dit
from vgen.models.autoencoder import build_autoencoder
from vgen.models.text_encoder import TextEncoder
from vgen.parallel.topology import build_topology, init_process_group


def pick_device(run_cfg) -> torch.device:
    if run_cfg.device == "cuda" or (run_cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("run.device=cuda but no CUDA device is available")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(cfg):
    """Process group for any launcher, then the dp x sp topology."""
    device = pick_device(cfg.run)
    if device.type == "cpu":
        # DeepSpeed picks its accelerator from this; without it a CUDA-less machine may guess wrong
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    init_process_group(device.type)
    return device, build_topology(cfg.parallel.sp)


def set_determinism(cfg) -> None:
    torch.manual_seed(cfg.run.seed)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        if torch.cuda.is_available():
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def build_frozen(cfg, device):
    """The text encoder and autoencoder: frozen, never trained by the DiT run."""
    text_encoder = TextEncoder(cfg.text.encoder_path, cfg.text.max_length, device=device)
    autoencoder = build_autoencoder(cfg.autoencoder)
    if isinstance(autoencoder, torch.nn.Module):
        autoencoder = autoencoder.to(device).eval().requires_grad_(False)
    return text_encoder, autoencoder


def build_model(cfg, text_dim: int, latent_channels: int):
    """The DiT with the run seed, so every rank starts from the same weights."""
    torch.manual_seed(cfg.run.seed)
    return build_dit(cfg.model, in_channels=latent_channels, text_dim=text_dim)


def model_signature(model, cfg) -> dict:
    """The settings a checkpoint must share with the config to be loaded into this model."""
    sig = {f"model.{k}": (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(model.cfg).items() if k != "attention"}
    sig["autoencoder.kind"] = cfg.autoencoder.kind
    sig["text.max_length"] = cfg.text.max_length
    return sig

