"""Latent shards: what the encoding job (`launch/encode.py`) writes and the latents loader reads.

A latent shard is a WebDataset tar named like the video shard it came from. Each sample holds
    {key}.safetensors   latent (C, T', H', W'), text (L, dim), text_mask (L,) bool
    {key}.txt           the caption
    {key}.json          source key and shard, shapes, dtype
and the directory holds, written once:
    latents_meta.json       what made the latents (autoencoder config, text encoder, clip settings, latent
                            shape, dtype); a re-run with other settings and a training run that does not
                            match them are refused, since latents of two encoders mixed in one set train
                            a model on nonsense without any error
    null_text.safetensors   the empty prompt's text and text_mask, swapped in at training time for
                            caption dropout (the trainer then needs no text encoder)
    _COMPLETE               written by the last rank to finish once every source shard has its latent
                            shard; its absence means the set is partial

Text embeddings are stored per sample, padded to `text.max_length`, exactly as `TextEncoder` returns them:
the positions past the mask are the encoder's real outputs, not zeros, so a trained model sees the same
text input from latent shards as from videos.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import safetensors.torch
import torch
from omegaconf import OmegaConf

from vgen.data.shards import DataError, DataWarning
from vgen.models.text_encoder import default_encoder_path

FORMAT_VERSION = 1
META_NAME = "latents_meta.json"
NULL_TEXT_NAME = "null_text.safetensors"
COMPLETE_NAME = "_COMPLETE"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# meta keys two encodings must share to live in one directory ("source" may move between machines)
_SAME_ENCODING = ("format", "autoencoder", "text", "clip", "latent_shape", "dtype", "buckets")


class LatentFormatError(ValueError):
    """A latent sample that cannot be used; `reason` is the tag its skip is counted under."""

    def __init__(self, message: str, reason: str = "bad_latent"):
        super().__init__(message)
        self.reason = reason


def _write_atomic(path: Path, data: bytes) -> None:
    """Readers (and a rank racing to write the same file) see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ---- one sample ---------------------------------------------------------------------------------------------

def pack_sample(key: str, latent: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, caption: str,
                source: dict, dtype: str) -> dict:
    """One latent sample as a dict for `webdataset.TarWriter`.

    Args:
        latent: (C, T', H', W'); text: (L, dim); text_mask: (L,) bool.
        source: where the clip came from, e.g. {"key": ..., "shard": ...}; stored in the .json member.
        dtype: storage dtype of latent and text, a key of DTYPES.
    """
    tensors = {"latent": latent.detach().to("cpu", DTYPES[dtype]).contiguous(),
               "text": text.detach().to("cpu", DTYPES[dtype]).contiguous(),
               "text_mask": text_mask.detach().to("cpu", torch.bool).contiguous()}
    info = {"source": source, "dtype": dtype, "latent_shape": list(latent.shape), "text_shape": list(text.shape)}
    return {"__key__": key, "safetensors": safetensors.torch.save(tensors), "txt": caption,
            "json": json.dumps(info, sort_keys=True)}


def unpack_sample(parts: dict[str, bytes], meta: dict) -> dict:
    """Tensors (float32 latent and text, bool mask) and caption of a raw sample, checked against `meta`.

    Raises:
        LatentFormatError: a member is missing or unreadable, or a shape is not the one in `meta`.
    """
    if "safetensors" not in parts:
        raise LatentFormatError("no .safetensors member", "missing_latent")
    try:
        tensors = safetensors.torch.load(parts["safetensors"])
    except Exception as e:  # safetensors raises its own (Rust) error types on damaged bytes
        raise LatentFormatError(f"unreadable safetensors: {type(e).__name__}: {e}") from e
    try:
        caption = parts.get("txt", b"").decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise LatentFormatError(str(e), "bad_caption") from e
    length, dim = meta["text"]["max_length"], meta["text"]["dim"]
    want = {"latent": tuple(meta["latent_shape"]), "text": (length, dim), "text_mask": (length,)}
    for name, shape in want.items():
        got = tuple(tensors[name].shape) if name in tensors else None
        if got != shape:
            raise LatentFormatError(f"{name} has shape {got}, {META_NAME} says {shape}")
    return {"latent": tensors["latent"].float(), "text": tensors["text"].float(),
            "text_mask": tensors["text_mask"].bool(), "caption": caption}


# ---- the directory's files ----------------------------------------------------------------------------------

def make_meta(ae_cfg, encoder_path, max_length: int, text_dim: int, clip: dict, latent_shape, dtype: str,
              source: str) -> dict:
    """The description of one encoding, as written to latents_meta.json."""
    ae = OmegaConf.to_container(ae_cfg, resolve=True) if OmegaConf.is_config(ae_cfg) else dict(ae_cfg)
    return {"format": FORMAT_VERSION, "autoencoder": ae,
            "text": {"encoder_path": str(encoder_path), "max_length": int(max_length), "dim": int(text_dim)},
            "clip": dict(clip), "latent_shape": [int(s) for s in latent_shape], "dtype": dtype, "source": str(source)}


def write_meta(out_dir: Path, meta: dict) -> None:
    """Write latents_meta.json, or check that the one already there describes the same encoding.

    Raises:
        DataError: the directory holds latents of another encoding.
    """
    path = Path(out_dir) / META_NAME
    if path.is_file():
        old = json.loads(path.read_text())
        differs = [k for k in _SAME_ENCODING if old.get(k) != meta.get(k)]
        if differs:
            detail = "; ".join(f"{k}: {old.get(k)} there, {meta.get(k)} now" for k in differs)
            raise DataError(f"data.encode_out={out_dir} holds latents of another encoding ({detail}); "
                            "write to a new directory, or delete that one")
        return
    _write_atomic(path, json.dumps(meta, indent=1, sort_keys=True).encode())


def latents_dir(path: str) -> Path:
    """The directory holding the meta files of `data.path` (a directory, a shard, or a shard pattern)."""
    path = str(path)
    if os.path.isdir(path):
        return Path(path)
    return Path(os.path.dirname(path.split("{")[0]) or ".")


def read_meta(path: str) -> dict:
    """latents_meta.json of the latent set at `data.path`.

    Raises:
        DataError: there is none (not a latent set, or not one written by launch/encode.py).
    """
    meta_path = latents_dir(path) / META_NAME
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"data.path={path} with data.kind=latents: cannot read {meta_path} ({e}); write latent "
                        "shards with launch/encode.py, or set data.kind=videos for video shards") from e
    if meta.get("format") != FORMAT_VERSION:
        raise DataError(f"data.path={path}: {meta_path} has format {meta.get('format')}, this vgen reads "
                        f"format {FORMAT_VERSION}; re-encode the set")
    if not (latents_dir(path) / COMPLETE_NAME).is_file():
        warnings.warn(f"data.path={path}: no {COMPLETE_NAME} marker, so the encoding job has not finished every "
                      "shard; training sees only the shards encoded so far", DataWarning, stacklevel=2)
    return meta


def write_null_text(out_dir: Path, emb: torch.Tensor, mask: torch.Tensor, dtype: str) -> None:
    """Store the empty prompt's (L, dim) embedding and (L,) mask, as the samples store theirs."""
    tensors = {"text": emb.detach().to("cpu", DTYPES[dtype]).contiguous(),
               "text_mask": mask.detach().to("cpu", torch.bool).contiguous()}
    _write_atomic(Path(out_dir) / NULL_TEXT_NAME, safetensors.torch.save(tensors))


def read_null_text(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(emb (L, dim) float32, mask (L,) bool) of the empty prompt for the latent set at `data.path`."""
    file = latents_dir(path) / NULL_TEXT_NAME
    if not file.is_file():
        raise DataError(f"data.path={path}: {file} is missing; re-run launch/encode.py to write it")
    tensors = safetensors.torch.load_file(str(file))
    return tensors["text"].float(), tensors["text_mask"].bool()


def check_compatible(meta: dict, cfg) -> None:
    """Refuse to train on latents made by another autoencoder or text setting than `cfg` names.

    Args:
        meta: `loader.meta` (latents_meta.json); cfg: the full run config.
    Raises:
        DataError: naming the setting that differs.
    """
    ae = OmegaConf.to_container(cfg.autoencoder, resolve=True)
    if ae != meta["autoencoder"]:
        raise DataError(f"data.path={cfg.data.path} was encoded with autoencoder={meta['autoencoder']}, the run "
                        f"has autoencoder={ae}; set the run's autoencoder section to match")
    if int(cfg.text.max_length) != meta["text"]["max_length"]:
        raise DataError(f"data.path={cfg.data.path} holds text of {meta['text']['max_length']} tokens, the run has "
                        f"text.max_length={cfg.text.max_length}")
    run_path = Path(cfg.text.encoder_path or default_encoder_path()).resolve()
    if run_path != Path(meta["text"]["encoder_path"]).resolve():
        # a warning only: the same encoder may sit at another path on another machine
        warnings.warn(f"text.encoder_path={run_path} is not the encoder the latents were made with "
                      f"({meta['text']['encoder_path']}); prompts at sampling time must use the same encoder",
                      DataWarning, stacklevel=2)
