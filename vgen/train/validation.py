"""Held-out validation loss: fixed clips, fixed timesteps, fixed noise, so the figure is comparable
across steps, runs and resumes.

The set is `data.val_path` (shards of the same kind as `data.path`: videos or latents), read in file
order, at most `data.val_clips` samples. With `data.make_demo` the demo builds it: clips drawn from
another seed, minus any clip identical to a training clip (vgen/data/demo.py, `write_demo_val_shards`).
Each clip is scored at every t in VAL_TIMESTEPS with noise drawn from (clip index, t) alone. Nothing here
touches a global RNG, so validation never changes what training draws, and a resumed run logs bitwise the
validation losses of an uninterrupted one (its weights are bitwise the same on CPU).

Every rank runs the same forward passes (under sequence parallelism the ranks of a group must run them
together); the figure is the same on every rank.
"""

from __future__ import annotations

import torch

from vgen.data.shards import index_tar, list_shards
from vgen.diffusion.flow import add_noise, flow_matching_loss

VAL_TIMESTEPS = (0.1, 0.3, 0.5, 0.7, 0.9)
NOISE_SEED = 20_260_000  # fixed: the noise must not depend on run.seed, so two seeds are comparable


def read_val_samples(path: str, limit: int) -> list[tuple[str, dict[str, bytes]]]:
    """Up to `limit` samples (key, {ext: bytes}) of the shards at `path`, in sorted shard and file order."""
    samples = []
    for shard in list_shards(path):
        entries, _ = index_tar(shard)
        with open(shard, "rb") as handle:
            for key, members in entries:
                parts = {}
                for ext, (offset, size) in members.items():
                    handle.seek(offset)
                    parts[ext] = handle.read(size)
                samples.append((key, parts))
                if len(samples) >= limit:
                    return samples
    return samples


class Validator:
    """Computes {"val_loss": mean over clips and timesteps, "val_loss_t0.9": ..., "val_loss_i2v": ...}.

    Args:
        task: the DiffusionTask (its frozen text encoder and autoencoder, and its loader for latents).
        cfg: the run's config (data.val_path, data.val_clips, data.micro_batch).
    """

    def __init__(self, task, cfg, device):
        self.device, self.batch = device, max(cfg.data.micro_batch, 8)
        self.dtype = task.dtype
        x0, text, mask = self._load(task, cfg)
        self.x0, self.text, self.mask = x0, text, mask  # (N, C, T, H, W), (N, L, dim), (N, L)
        gen = torch.Generator().manual_seed(NOISE_SEED)
        self.noise = torch.randn((len(VAL_TIMESTEPS),) + tuple(x0.shape), generator=gen)  # (K, N, C, T, H, W)
        self.i2v = bool(getattr(cfg.model, "i2v", False))

    def _load(self, task, cfg):
        from vgen.data.loader import SampleError, clip_settings, decode_clip_sample

        raw = read_val_samples(str(cfg.data.val_path), int(cfg.data.val_clips))
        if not raw:
            raise ValueError(f"data.val_path={cfg.data.val_path!r} holds no samples")
        if cfg.data.kind == "latents":
            from vgen.data.latents import unpack_sample

            items = [unpack_sample(parts, task.loader.meta) for _, parts in raw]
            return (torch.stack([i["latent"] for i in items]).float(), torch.stack([i["text"] for i in items]).float(),
                    torch.stack([i["text_mask"] for i in items]))
        videos, captions = [], []
        for key, parts in raw:
            try:
                video, text = decode_clip_sample(parts, clip_settings(cfg.data), start=0)
            except SampleError as err:
                raise ValueError(f"data.val_path={cfg.data.val_path!r}: sample {key}: {err}") from err
            videos.append(video)
            captions.append(text)
        with torch.no_grad():
            x0 = torch.cat([task.autoencoder.encode(v.to(self.device)).float().cpu()
                            for v in torch.stack(videos).split(self.batch)])
        text, mask = task.text_encoder(captions)
        return x0, text.float().cpu(), mask.cpu()

    @torch.no_grad()
    def __call__(self, model) -> dict:
        was_training = model.training
        model.eval()
        out = {"val_loss": 0.0}
        for k, t in enumerate(VAL_TIMESTEPS):
            loss_t = self._loss_at(model, k, t, given_frames=0)
            out[f"val_loss_t{t}"] = loss_t
            out["val_loss"] += loss_t / len(VAL_TIMESTEPS)
        if self.i2v:
            out["val_loss_i2v"] = sum(self._loss_at(model, k, t, given_frames=1)
                                      for k, t in enumerate(VAL_TIMESTEPS)) / len(VAL_TIMESTEPS)
        model.train(was_training)
        return out

    def _loss_at(self, model, k: int, t: float, given_frames: int) -> float:
        from vgen.train.i2v import condition_batch

        total, count = 0.0, 0
        for start in range(0, self.x0.shape[0], self.batch):
            sl = slice(start, start + self.batch)
            x0, noise = self.x0[sl].to(self.device), self.noise[k, sl].to(self.device)
            tt = torch.full((x0.shape[0],), t, device=self.device)
            xt = add_noise(x0, noise, tt)
            given = torch.full((x0.shape[0],), given_frames, dtype=torch.long)
            xt, frame_mask = condition_batch(xt, x0, given) if self.i2v else (xt, None)
            pred = model(xt.to(self.dtype), tt, self.text[sl].to(self.device, self.dtype), self.mask[sl].to(self.device),
                         frame_mask=frame_mask)
            weight = None if frame_mask is None else 1.0 - frame_mask
            loss = flow_matching_loss(pred, x0, noise, weight=weight)
            total += float(loss) * x0.shape[0]
            count += x0.shape[0]
        return total / count


def build_validator(cfg, task, device):
    """The Validator of a diffusion run with `data.val_path` and `log.val_every_steps` set, else None."""
    if not cfg.data.val_path or not cfg.log.val_every_steps or cfg.train.task != "diffusion":
        return None
    if cfg.data.make_demo and cfg.data.kind == "videos":
        from vgen.data.demo import write_demo_val_shards

        write_demo_val_shards(cfg.data)
    return Validator(task, cfg, device)
