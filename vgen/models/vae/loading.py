"""Loading VAE weights laid out as diffusers' `AutoencoderKLWan` state dict (a safetensors file or a dict).

Loading is strict: every key of the model must be present with its exact shape and nothing else may be
present, otherwise the error lists the offending keys (expected vs got shapes) so a wrong config
(`base_dim`, `dim_mult`, `z_dim`, ...) or a wrong file is found at once rather than as bad videos later.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import nn

SHOWN = 5  # offending keys listed per kind of problem


def _shape(t) -> tuple:
    return tuple(t.shape)


def state_dict_problems(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Human-readable lines describing missing, unexpected and mis-shaped keys (empty when all match)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and _shape(state[k]) != _shape(expected[k])]
    lines = []
    if mismatched:
        lines.append(f"{len(mismatched)} keys with wrong shapes:")
        lines += [f"  {k}: expected {_shape(expected[k])}, got {_shape(state[k])}" for k in mismatched[:SHOWN]]
    if missing:
        lines.append(f"{len(missing)} missing keys:")
        lines += [f"  {k}: expected {_shape(expected[k])}" for k in missing[:SHOWN]]
    if unexpected:
        lines.append(f"{len(unexpected)} unexpected keys:")
        lines += [f"  {k}: got {_shape(state[k])}" for k in unexpected[:SHOWN]]
    return lines


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, on CPU."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"autoencoder.weights={path!r}: no such file")
    if not path.endswith(".safetensors"):
        raise ValueError(f"autoencoder.weights={path!r}: expected a .safetensors file (diffusers layout)")
    from safetensors.torch import load_file

    return load_file(path, device="cpu")


def load_vae_weights(model: nn.Module, source, name: str | None = None) -> nn.Module:
    """Copy a diffusers-layout state dict into `model`, strictly, casting to the model's dtype.

    Args:
        source: a safetensors path or a mapping of tensors.
        name: how to call the source in errors (default: the path, or "state dict").

    Raises:
        ValueError: keys or shapes do not match; the message lists the first offending keys.
    """
    state = read_state_dict(source) if isinstance(source, (str, os.PathLike)) else dict(source)
    name = name or (str(source) if isinstance(source, (str, os.PathLike)) else "state dict")
    problems = state_dict_problems(model, state)
    if problems:
        raise ValueError(
            f"VAE weights {name} do not match the model built from autoencoder.vae "
            f"(check base_dim / dim_mult / z_dim / num_res_blocks / attn_scales / temporal_downsample):\n"
            + "\n".join(problems)
        )
    # strict=True after the check above: a second guard that every key was mapped
    model.load_state_dict(state, strict=True)
    return model
