"""Probes of what a trained demo model uses, measured on held-out demo clips at fixed timesteps and noise.

    python benchmarks/demo_probe.py RUN [--clips 48] [--out benchmarks/results/demo_probe.json]

For each t in TIMESTEPS the flow-matching loss is measured with
  - the true caption; the caption with the opposite direction; with another colour; the empty caption,
  - the clip's frames reversed (true caption): a model that knows which way the shape moves loses more,
  - the temporal attention's output zeroed: how much the model leans on it,
and the mean |change| of the model's output at every frame when latent frame 0 of its input is
perturbed (how much the frames talk to each other), and the share of cross-attention weight on the
direction word. Larger gaps mean the model uses that input; zero means it ignores it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

# this checkout's vgen, also when another copy is installed (as launch/*.py do)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vgen.data.demo import DIRECTIONS, caption, parse_prompt  # noqa: E402
from vgen.diffusion.flow import add_noise  # noqa: E402

TIMESTEPS = (0.1, 0.3, 0.5, 0.7, 0.9)
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def _loss(model, x0, noise, t, text, mask):
    tt = torch.full((x0.shape[0],), t)
    pred = model(add_noise(x0, noise, tt), tt, text, mask)
    return (pred - (noise - x0)).pow(2).mean().item()


def _swap(c: str, field: str) -> str:
    p = parse_prompt(c)
    if field == "direction":
        p["direction"] = OPPOSITE[p["direction"]]
    else:
        p["colour"] = "blue" if p["colour"] != "blue" else "red"
    return caption(p["colour"], p["shape"], p["direction"])


class _TemporalOff:
    """Context: every block's temporal attention returns zeros."""

    def __init__(self, model):
        self.hooks, self.model = [], model

    def __enter__(self):
        for b in self.model.blocks:
            self.hooks.append(b.temporal.register_forward_hook(lambda m, i, o: torch.zeros_like(o)))

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()


def cross_frame_sensitivity(model, x0, noise, t, text, mask, eps: float = 0.5) -> list[float]:
    """Mean |output change| per latent frame when frame 0 of the noisy input moves by eps * N(0, 1)."""
    tt = torch.full((x0.shape[0],), t)
    xt = add_noise(x0, noise, tt)
    delta = torch.zeros_like(xt)
    delta[:, :, 0] = eps * torch.randn(delta[:, :, 0].shape, generator=torch.Generator().manual_seed(1))
    diff = (model(xt + delta, tt, text, mask) - model(xt, tt, text, mask)).abs()
    return diff.mean(dim=(0, 1, 3, 4)).tolist()


def direction_attention_share(model, text_encoder, captions) -> list[float]:
    """Per block: the share of cross-attention probability (mean over queries, heads) on the direction word."""
    tok = text_encoder.tokenizer(captions[0])["input_ids"]
    words = text_encoder.tokenizer.convert_ids_to_tokens(tok)
    position = next(i for i, w in enumerate(words) if w in DIRECTIONS)
    shares, originals = [], []
    for block in model.blocks:
        core = block.cross.core
        originals.append(core.forward)

        def record(q, k, v, grid, kv_mask=None, _orig=core.forward):
            logits = torch.einsum("bnhd,blhd->bhnl", q, k) / q.shape[-1] ** 0.5
            logits = logits.masked_fill(~kv_mask[:, None, None, :], float("-inf"))
            shares.append(logits.softmax(-1)[..., position].mean().item())
            return _orig(q, k, v, grid, kv_mask)

        core.forward = record
    return shares, originals, position


def _red_centroid_x(video: torch.Tensor) -> list[float]:
    """Per frame, the x centroid of the red excess R - (G + B) / 2 of a (3, T, H, W) video in [-1, 1]."""
    w = (video[0] - 0.5 * (video[1] + video[2])).clamp(min=0)  # (T, H, W)
    xs = torch.arange(w.shape[-1], dtype=w.dtype)
    return ((w.sum(1) * xs).sum(-1) / w.sum((1, 2)).clamp(min=1e-6)).tolist()


@torch.no_grad()
def mean_prediction_track(model, text_encoder, autoencoder, shape, data_clips, t: float = 0.95, draws: int = 64) -> dict:
    """Where the model's mean x0 prediction from noise puts a red shape "moving left", frame by frame,
    beside where the data's mean puts it: the ideal prediction at high t is E[x0 | caption]."""
    text, mask = text_encoder(["a red circle moving left"] * draws)
    noise = torch.randn((draws, *shape), generator=torch.Generator().manual_seed(0))
    tt = torch.full((draws,), t)
    x0_hat = noise - model(noise, tt, text, mask)  # x_t ~ noise at high t, x0 = x_t - t v ~ noise - v
    return {"t": t, "model_x": _red_centroid_x(autoencoder.decode(x0_hat).mean(0)),
            "data_x": _red_centroid_x(data_clips.mean(0))}


@torch.no_grad()
def probe(model, text_encoder, x0, captions, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=gen)
    enc = lambda cs: text_encoder(cs)  # noqa: E731
    text, mask = enc(captions)
    variants = {"opposite_direction": enc([_swap(c, "direction") for c in captions]),
                "other_colour": enc([_swap(c, "colour") for c in captions]), "empty": enc([""] * len(captions))}
    out = {"t": list(TIMESTEPS), "loss": [], "gap": {k: [] for k in [*variants, "reversed_frames", "temporal_off"]},
           "cross_frame": {}}
    for t in TIMESTEPS:
        base = _loss(model, x0, noise, t, text, mask)
        out["loss"].append(base)
        for name, (tx, m) in variants.items():
            out["gap"][name].append(_loss(model, x0, noise, t, tx, m) - base)
        out["gap"]["reversed_frames"].append(_loss(model, x0.flip(2), noise, t, text, mask)
                                             - _loss(model, x0, noise, t, text, mask))
        with _TemporalOff(model):
            out["gap"]["temporal_off"].append(_loss(model, x0, noise, t, text, mask) - base)
        out["cross_frame"][str(t)] = cross_frame_sensitivity(model, x0, noise, t, text, mask)
    shares, originals, position = direction_attention_share(model, text_encoder, captions)
    model(add_noise(x0, noise, torch.full((x0.shape[0],), 0.5)), torch.full((x0.shape[0],), 0.5), text, mask)
    for block, orig in zip(model.blocks, originals):
        block.cross.core.forward = orig
    out["direction_word_attention"] = shares
    out["direction_word_uniform_share"] = 1.0 / float(mask.sum(1).float().mean())
    return out


def main(argv=None) -> dict:
    from vgen.data.demo import render_clip, COLOURS, SHAPES
    from vgen.sample import load_run_for_sampling
    import random
    import numpy as np

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("run")
    p.add_argument("--clips", type=int, default=48)
    p.add_argument("--out")
    p.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
    args = p.parse_args(argv)
    cfg, model, text_encoder, autoencoder = load_run_for_sampling(args.run, ["sample.ema=false"] if args.raw else [])
    d = cfg.data
    rng = random.Random("probe")
    videos, captions = [], []
    for i in range(args.clips):
        c, s, di = list(COLOURS)[i % 6], SHAPES[(i // 6) % 2], DIRECTIONS[(i // 12) % 4]
        frames, _ = render_clip(c, s, di, d.num_frames, d.height, d.width, rng)
        videos.append(torch.from_numpy(np.asarray(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1)
        captions.append(caption(c, s, di))
    x0 = autoencoder.encode(torch.stack(videos))
    result = probe(model, text_encoder, x0, captions)
    left = torch.stack([torch.from_numpy(np.asarray(render_clip("red", "circle", "left", d.num_frames, d.height, d.width, rng)[0]))
                        .permute(3, 0, 1, 2).float() / 127.5 - 1 for _ in range(256)])
    result["mean_prediction_left"] = mean_prediction_track(model, text_encoder, autoencoder, tuple(x0.shape[1:]), left)
    print(json.dumps({k: v for k, v in result.items()}, indent=None, default=lambda x: round(x, 4))[:3000])
    if args.out:
        Path(args.out).write_text(json.dumps({"run": args.run, **result}, indent=1))
    return result


if __name__ == "__main__":
    main()
