"""Fast ablations of the demo: why does the tiny DiT not learn motion direction?

Trains the demo's model in one process on clips rendered in memory (no mp4 round trip, no DeepSpeed, one
thread by default, so two ablations run side by side on a 2-core machine in ~6 minutes each), then scores
EMA samples from pixels exactly as `benchmarks/demo_eval.py` does, and probes the model's mean prediction
at high noise. Each flag switches one suspected cause on or off:

  --onehot-direction  the direction also enters adaLN as a learned one-hot embedding (rules out the text)
  --wrap              the shape wraps around the frame edges, so the start position says nothing about
                      the direction (the demo's "inside" layout had to start on the far side: a shortcut)
  --one-look          every clip is a red square (direction is the only thing left to learn)
  --full-attention    the temporal layer attends over all tokens (rules out factorized attention)
  --x-prediction      the network predicts x0, turned into the velocity (xt - x0) / t (JiT-style)
  --model-patch/--hidden  finer tokens (1,1,1 = 2x2 pixels) at a similar cost (hidden 64)
  --layout inside     the demo's clips before the sixth round (start anywhere the shape stays inside;
                      with --shape-size 4 the clips of the earlier records)

    python benchmarks/demo_ablation.py --steps 1200 --out benchmarks/results/demo_ablation_base.json
    python benchmarks/demo_ablation.py --probe-only W.pt  # mean-prediction tracks of saved EMA weights

The mean-prediction probe: at t = 0.98 the loss-optimal x0 estimate is E[x0 | prompt]; for "moving left"
the data's shape centroid runs from 11 px (frame 0) to 4 px (frame 7). A model that uses the direction word
shows that slope; one that ignores it shows the same flat track for every direction.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_eval import classify_clip, write_record  # noqa: E402
from vgen.data.demo import (COLOURS, DIRECTIONS, MOTION, _combos, _shape_mask, caption, eval_prompts,  # noqa: E402
                            paint_track, parse_prompt, render_clip)
from vgen.diffusion.flow import add_noise, euler_sample, flow_matching_loss, sample_timesteps  # noqa: E402
from vgen.models import build_dit  # noqa: E402
from vgen.models.autoencoder import PatchAutoencoder  # noqa: E402
from vgen.models.text_encoder import TextEncoder  # noqa: E402
from vgen.sample import prompt_noise  # noqa: E402
from vgen.train.i2v import condition_batch  # noqa: E402

NULL_DIRECTION = len(DIRECTIONS)  # the one-hot id of the empty (unconditional) prompt


def render_wrapped(colour, shape, direction, frames, height, width, rng, speed=1):
    """A demo clip whose shape wraps around the edges: start anywhere, whatever the direction."""
    size = max(2, round(min(height, width) / 4))
    dx, dy = MOTION[direction]
    x0, y0, background = rng.randrange(width), rng.randrange(height), rng.randint(0, 16)
    base = np.full((height, width, 3), background, dtype=np.uint8)
    base[:size, :size][_shape_mask(shape, size)] = COLOURS[colour]
    clip = np.stack([np.roll(base, (y0 + dy * speed * t, x0 + dx * speed * t), axis=(0, 1)) for t in range(frames)])
    return clip, {"x0": x0, "y0": y0}


def render_narrow(colour, shape, direction, frames, side, rng, size=None, across=0):
    """A demo clip whose across-axis position stays within `across` px of the centre line."""
    size = size or max(2, round(side / 4))
    dx, dy = MOTION[direction]
    travel = frames - 1
    along = rng.randint(0, side - size - travel) + (travel if dx + dy < 0 else 0)
    mid = (side - size) // 2
    cross = rng.randint(max(0, mid - across), min(side - size, mid + across))
    x0, y0 = (along, cross) if dx else (cross, along)
    clip = paint_track(colour, shape, size, (x0, y0), (dx, dy), frames, side, side, rng.randint(0, 16))
    return clip, {"x0": x0, "y0": y0, "size": size}


def wrapped_direction(frames) -> str | None:
    """Direction of a wrapped clip: the sum of the best circular shifts between consecutive foreground masks
    (a centroid track jumps where the shape wraps)."""
    pixels = np.asarray(frames, dtype=np.float64)
    mask = np.abs(pixels - np.median(pixels.reshape(-1, 3), axis=0)).max(-1) > 60
    sx = sy = 0
    for a, b in zip(mask[:-1], mask[1:]):
        overlap = [(int((np.roll(a, (y, x), axis=(0, 1)) & b).sum()), -abs(x) - abs(y), x, y)
                   for x in range(-5, 6) for y in range(-5, 6)]
        _, _, x, y = max(overlap)
        sx, sy = sx + x, sy + y
    if max(abs(sx), abs(sy)) < 1:
        return None
    return ("right" if sx > 0 else "left") if abs(sx) >= abs(sy) else ("down" if sy > 0 else "up")


class Ablation:
    def __init__(self, args):
        self.args = args
        self.ae = PatchAutoencoder((1, 2, 2))
        self.text = TextEncoder(None, 32, layers=(0, -1))
        self.combos = _combos(args.clips, 0)[: args.clips]
        self.val_combos = _combos(16, 0)[:16]  # the first round of 48 holds each (colour, shape, direction) once
        if args.one_look:
            self.combos, self.val_combos = ([("red", "square", c[2]) for c in cs] for cs in (self.combos, self.val_combos))
        clips = [self.render(c, f"0-clip-{i}") for i, c in enumerate(self.combos)]
        self.latents = torch.cat([self.encode(c) for c in clips])  # (N, 12, T, h, w)
        self.captions = [caption(*c) for c in self.combos]
        self.prompts = ([caption("red", "square", DIRECTIONS[i % 4]) for i in range(24)] if args.one_look
                        else eval_prompts(24))

    def render(self, combo, key):
        return self.render_with_meta(combo, key)[0]

    def render_with_meta(self, combo, key):
        a = self.args
        if a.wrap:
            return render_wrapped(*combo, a.frames, a.size, a.size, random.Random(key), a.speed)
        if a.across is not None:
            return render_narrow(*combo, a.frames, a.size, random.Random(key), a.shape_size, a.across)
        return render_clip(*combo, a.frames, a.size, a.size, random.Random(key), a.shape_size, a.layout)

    def encode(self, clip):  # uint8 (T, H, W, 3) -> latent (1, C, T, h, w)
        return self.ae.encode((torch.from_numpy(clip).permute(3, 0, 1, 2).float() / 127.5 - 1)[None])

    def build(self):
        a = self.args
        cfg = SimpleNamespace(preset="tiny", hidden=a.hidden, depth=a.depth, heads=4, mlp_ratio=None,
                              patch=[int(p) for p in a.model_patch.split(",")], attention="sdpa", abs_pos=True,
                              i2v=a.i2v_prob > 0)
        torch.manual_seed(a.seed)
        model = build_dit(cfg, self.ae.latent_channels, self.text.dim)
        if a.full_attention:
            for block in model.blocks:
                block.temporal.core.kind = "full"
        if a.learned_pos:  # a learned (t, h, w) table beside the sinusoids: joint spacetime patterns in one step
            tokens = math.prod(model.token_grid(self.latents.shape))
            model.patch_embed = LearnedTable(model.patch_embed, tokens, a.hidden)
        if a.frozen_text_proj:  # keep the text projection at its random init: words stay as far apart as MiniLM has them
            for module in (model.text_proj, model.text_norm):
                module.requires_grad_(False)
        if a.pooled_gain != 1.0:  # a stronger text signal in adaLN from the start
            with torch.no_grad():
                model.pooled_proj.weight.mul_(a.pooled_gain)
        if a.onehot_direction:  # the direction id joins the pooled text in adaLN
            model.pooled_proj = OneHotDirection(model.pooled_proj, a.hidden)
        return model

    def set_direction_ids(self, model, prompts):
        """The one-hot ablation reads the direction from the prompts themselves."""
        if self.args.onehot_direction:
            model.pooled_proj.ids = torch.tensor([DIRECTIONS.index(parse_prompt(p)["direction"]) if p else
                                                  NULL_DIRECTION for p in prompts])

    def velocity(self, model, xt, t, prompts, **kw):
        """The model's velocity for prompts."""
        self.set_direction_ids(model, prompts)
        out = model(xt, t, *self.text(prompts), **kw)
        if self.args.x_prediction:  # the network's output is x0: v = (xt - x0) / t
            return (xt - out) / t.clamp(min=0.05).view(-1, 1, 1, 1, 1)
        return out


class LearnedTable(torch.nn.Module):
    """patch_embed(x) + a learned per-token-position table (one grid only)."""

    def __init__(self, inner, tokens, hidden):
        super().__init__()
        self.inner, self.table = inner, torch.nn.Parameter(torch.randn(tokens, hidden) * 0.5)

    def forward(self, x):
        return self.inner(x) + self.table


class OneHotDirection(torch.nn.Module):
    """pooled_proj(pooled) + a learned embedding of the prompt's direction (ids set per call)."""

    def __init__(self, inner, hidden):
        super().__init__()
        self.inner, self.embed, self.ids = inner, torch.nn.Embedding(NULL_DIRECTION + 1, hidden), None
        torch.nn.init.normal_(self.embed.weight, std=0.5)

    def forward(self, pooled):
        return self.inner(pooled) + self.embed(self.ids[: pooled.shape[0]])


def train(ab: Ablation, model, log):
    a, g = ab.args, torch.Generator().manual_seed(ab.args.seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    results = []
    for step in range(1, a.steps + 1):
        idx = torch.randint(0, len(ab.captions), (a.batch,), generator=g)
        x0 = ab.latents[idx]
        prompts = [ab.captions[i] if torch.rand(1, generator=g) >= 0.1 else "" for i in idx.tolist()]
        t = sample_timesteps(a.batch, g, a.train_shift, a.logit_mean, a.logit_std)
        noise = torch.randn(x0.shape, generator=g)
        xt, frame_mask = add_noise(x0, noise, t), None
        if a.i2v_prob > 0:
            xt, frame_mask = condition_batch(xt, x0, (torch.rand(a.batch, generator=g) < a.i2v_prob).long())
        # the trainer's schedule: linear warm-up over 50 steps, cosine to 0.1 x lr
        lr = a.lr * min(1.0, step / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / a.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        pred = ab.velocity(model, xt, t, prompts, frame_mask=frame_mask)
        loss = flow_matching_loss(pred, x0, noise, None if frame_mask is None else 1 - frame_mask)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].mul_(a.ema).add_(v, alpha=1 - a.ema)
        if step % 100 == 0:
            log(f"step {step} loss {loss.item():.4f}")
        if step % a.eval_every == 0 or step == a.steps:
            results.append({"step": step, "train_loss": loss.item(), **evaluate(ab, ema)})
            log(json.dumps(results[-1]))
    return ema, results


@torch.no_grad()
def guided_sample(ab: Ablation, model, prompts, noise, first=None):
    """20 Euler steps with classifier-free guidance (scale --guidance); `first`: image-to-video first latent
    frames (B, C, 1, h, w). Not vgen.sample.generate: the ablations' velocity needs the prompts themselves
    (one-hot direction) and may convert an x0 output (x-prediction)."""
    n, keep, frame_mask = len(prompts), None, None
    if first is not None:
        x0 = torch.zeros_like(noise)
        x0[:, :, :1] = first
        noise, frame_mask = condition_batch(noise, x0, torch.ones(n, dtype=torch.long))
        keep = 1 - frame_mask

    def velocity(x, t):
        extra = {} if frame_mask is None else {"frame_mask": torch.cat([frame_mask, frame_mask])}
        v_c, v_u = ab.velocity(model, torch.cat([x, x]), torch.cat([t, t]), prompts + [""] * n, **extra).chunk(2)
        v = v_u + ab.args.guidance * (v_c - v_u)
        return v if keep is None else v * keep

    x = euler_sample(velocity, noise, 20, ab.args.sample_shift)
    return ((ab.ae.decode(x).clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1).numpy()


def _noise(ab, count, offset):
    return torch.stack([prompt_noise(ab.latents.shape[1:], 0, offset + i) for i in range(count)])


def score(ab, prompts, clips) -> dict:
    hits = {"colour": 0, "direction": 0, "shape": 0}
    for prompt, clip in zip(prompts, clips):
        want, got = parse_prompt(prompt), classify_clip(clip, ab.args.shape_size)
        if ab.args.wrap and got["found"]:
            got["direction"] = wrapped_direction(clip)
        hits = {k: v + (got[k] == want[k]) for k, v in hits.items()}
    return {k: v / len(prompts) for k, v in hits.items()}


def evaluate(ab: Ablation, weights) -> dict:
    model = ab.build()
    model.load_state_dict(weights)
    model.eval()
    t2v = guided_sample(ab, model, ab.prompts, _noise(ab, 24, 0))
    out = {"t2v": score(ab, ab.prompts, t2v), "t2v_motion": motion_stats(t2v)}
    if ab.args.i2v_prob > 0:  # first frames of 16 clips never trained on
        out["i2v"], out["word_swap"] = i2v_probe(ab, model)
        # text -> first frame -> video: the text-to-video samples' first frames, then image-to-video from them
        first = torch.cat([ab.encode(clip)[:, :, :1] for clip in t2v])
        two_stage = guided_sample(ab, model, ab.prompts, _noise(ab, 24, 200), first=first)
        out["t2v_two_stage"] = score(ab, ab.prompts, two_stage)
    out["mean_tracks"] = mean_tracks(ab, model)
    return out


def motion_stats(clips) -> dict:
    """How the generated shapes move: how many tracks are still (< 1 px), and the mean |dx|+|dy|."""
    got = [classify_clip(c) for c in clips]
    return {"still": sum(g["found"] and g["direction"] is None for g in got) / len(got),
            "mean_travel": float(np.mean([abs(g["dx"]) + abs(g["dy"]) for g in got]))}


OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def room_ahead(meta, frame: int) -> str:
    """The direction with the most room ahead of the shape's first position in a square frame: what a model
    that reads the direction off the start position (the demo clips' shortcut) would pick."""
    span = frame - meta["size"]
    room = {"left": meta["x0"], "right": span - meta["x0"], "up": meta["y0"], "down": span - meta["y0"]}
    return max(room, key=room.get)


def i2v_probe(ab: Ablation, model):
    """Image-to-video from 16 held-out first frames: the scores with the true prompts, and the word-swap
    probe: the same first frames and noise with the opposite direction word. A model that reads the word
    moves the other way; one that ignores it gives the same direction for both."""
    combos = ab.val_combos
    rendered = [ab.render_with_meta(c, f"val-{i}") for i, c in enumerate(combos)]
    first = torch.cat([ab.encode(clip)[:, :, :1] for clip, _ in rendered])
    moved = {}
    for words in ("true", "opposite"):
        prompts = [caption(c[0], c[1], c[2] if words == "true" else OPPOSITE[c[2]]) for c in combos]
        clips = guided_sample(ab, model, prompts, _noise(ab, 16, 100), first=first)
        moved[words] = [wrapped_direction(c) if ab.args.wrap else classify_clip(c)["direction"] for c in clips]
        if words == "true":
            scores = score(ab, prompts, clips)
    truth = [c[2] for c in combos]
    swap = {"same_direction_either_word": _share(moved["true"], moved["opposite"]),
            "true_word_follows_truth": _share(moved["true"], truth),
            "opposite_word_follows_word": _share(moved["opposite"], [OPPOSITE[d] for d in truth])}
    if not ab.args.wrap:  # the shortcut exists only in the demo's own clips
        rule = [room_ahead(meta, ab.args.size) for _, meta in rendered]
        swap.update({"truth_is_room_ahead": _share(truth, rule), "true_word_follows_room_ahead": _share(moved["true"], rule),
                     "opposite_word_follows_room_ahead": _share(moved["opposite"], rule)})
    return scores, swap


def _share(a, b) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


@torch.no_grad()
def mean_tracks(ab: Ablation, model, t: float = 0.98, samples: int = 64) -> dict:
    """Per direction: the shape's centroid (x, y) per frame in the model's mean x0 estimate at noise level t
    (prompt "a red square moving D"), beside the same of the training clips of that direction."""
    out = {}
    for d in DIRECTIONS:
        prompts = [caption("red", "square", d)] * samples
        noise = torch.randn((samples,) + tuple(ab.latents.shape[1:]), generator=torch.Generator().manual_seed(5))
        tt = torch.full((samples,), t)
        xt = add_noise(torch.full_like(noise, -0.95), noise, tt)  # a near-black clip at noise level t
        x0 = xt - tt.view(-1, 1, 1, 1, 1) * ab.velocity(model, xt, tt, prompts)
        data = ab.latents[[i for i, c in enumerate(ab.combos) if c[2] == d]]
        out[d] = {"model": _centroids(ab, x0.mean(0)), "data": _centroids(ab, data.mean(0)) if len(data) else None}
    return out


TEXT_GAP_PROMPTS = ["a red circle moving left", "a red circle moving right", "a blue circle moving left",
                    "a red square moving left"]


@torch.no_grad()
def text_gaps(ab: Ablation, model) -> dict:
    """How far apart the DiT's text features keep two prompts that differ in one word (direction, colour,
    shape): the pooled vector that joins adaLN, and the differing word's own token in the cross-attention
    context. A projection that learns to drop a word shows it as a gap shrinking with training."""
    ab.set_direction_ids(model, TEXT_GAP_PROMPTS)
    ctx, pooled = model.embed_text(*ab.text(TEXT_GAP_PROMPTS))
    tokens = ab.text.tokenizer(TEXT_GAP_PROMPTS[0])["input_ids"]  # [CLS] a red circle moving left [SEP]
    word = {"direction": len(tokens) - 2, "colour": 2, "shape": 3}
    out = {}
    for other, field in enumerate(("direction", "colour", "shape"), start=1):
        out[field] = {"pooled": round((pooled[0] - pooled[other]).norm().item(), 3),
                      "word_token": round((ctx[0, word[field]] - ctx[other, word[field]]).norm().item(), 3)}
    out["pooled_norm"] = round(pooled[0].norm().item(), 3)
    return out


def _centroids(ab, latent) -> list:
    video = ab.ae.decode(latent[None])[0]  # (3, T, H, W)
    fg = video.max(0).values  # brightest channel: the shape stands out in at least one
    fg = (fg - fg.flatten(1).median(1).values[:, None, None]).clamp(min=0)  # (T, H, W), background removed
    total = fg.sum((1, 2)) + 1e-6
    xs, ys = torch.arange(fg.shape[2]).float(), torch.arange(fg.shape[1]).float()
    cx, cy = (fg.sum(1) * xs).sum(1) / total, (fg.sum(2) * ys).sum(1) / total
    return [[round(x, 2), round(y, 2)] for x, y in zip(cx.tolist(), cy.tolist())]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--steps", type=int, default=1200), add("--batch", type=int, default=8), add("--lr", type=float, default=1e-3)
    add("--clips", type=int, default=512), add("--i2v-prob", type=float, default=0.5)
    add("--ema", type=float, default=0.995), add("--guidance", type=float, default=3.0)
    add("--across", type=int, default=None, help="across-axis position within this many px of the centre")
    add("--layout", default="centre", choices=("centre", "inside"),
        help="the demo clips' layout (vgen.data.demo.render_clip); 'inside' --shape-size 4: the records before it")
    add("--pooled-gain", type=float, default=1.0)
    add("--train-shift", type=float, default=1.0), add("--sample-shift", type=float, default=1.0)
    add("--logit-mean", type=float, default=0.0), add("--logit-std", type=float, default=1.0)
    add("--hidden", type=int, default=128), add("--depth", type=int, default=4), add("--model-patch", default="1,2,2")
    add("--frames", type=int, default=8), add("--size", type=int, default=16), add("--speed", type=int, default=1)
    add("--shape-size", type=int, default=None, help="shape side in pixels (default: 3/8 of the frame)")
    for flag in ("--frozen-text-proj", "--learned-pos", "--onehot-direction", "--wrap", "--one-look", "--full-attention", "--x-prediction"):
        add(flag, action="store_true")
    add("--eval-every", type=int, default=400), add("--seed", type=int, default=0), add("--threads", type=int, default=1)
    add("--save", help="write the EMA weights here"), add("--probe-only", help="EMA weights to probe; no training")
    add("--text-gaps", help="EMA weights whose text-feature gaps to print beside the initial ones; no training")
    add("--out", help="JSON record of the arguments and results")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    ab = Ablation(args)
    log = lambda msg: print(f"[{time.time() - start:6.0f}s] {msg}", flush=True)  # noqa: E731
    if args.text_gaps:  # a few seconds: the text features of initial and saved weights
        model = ab.build()
        results = [{"weights": "init", **text_gaps(ab, model)}]
        model.load_state_dict(torch.load(args.text_gaps))
        results.append({"weights": args.text_gaps, **text_gaps(ab, model)})
        log(json.dumps(results))
    elif args.probe_only:
        results = [evaluate(ab, torch.load(args.probe_only))]
        log(json.dumps(results[-1]))
    else:
        ema, results = train(ab, ab.build(), log)
        if args.save:
            torch.save(ema, args.save)
    record = {"args": vars(args), "seconds": round(time.time() - start, 1), "results": results}
    if args.out:
        write_record(args.out, "benchmarks/demo_ablation.py", argv, record)
    return record


if __name__ == "__main__":
    main()
