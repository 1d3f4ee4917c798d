"""Image-to-video on the demo, measured from pixels: the first frames of held-out validation clips (never
trained on) with their captions go through the sampler; the first generated frame is compared with the
given one (mean abs pixel error, 0-255), and colour, direction and shape are scored by demo_eval.

    python benchmarks/demo_i2v_eval.py runs/demo --clips 16 --out benchmarks/results/demo_i2v_cpu.json

Writes the mp4s, manifest.jsonl and contact_sheet.png under RUN/samples/i2v/ (or --samples).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

# this checkout's vgen, also when another copy is installed (as launch/*.py do)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_eval import evaluate, write_record  # noqa: E402


def held_out_first_frames(cfg, clips: int):
    """(first frames (N, 3, 1, H, W) in [-1, 1], captions) of the first `clips` samples of data.val_path."""
    from vgen.data.loader import clip_settings, decode_clip_sample
    from vgen.train.validation import read_val_samples

    if not cfg.data.val_path:
        raise SystemExit("the run has no data.val_path: nothing held out to take first frames from")
    frames, captions = [], []
    for _, parts in read_val_samples(str(cfg.data.val_path), clips):
        video, text = decode_clip_sample(parts, clip_settings(cfg.data), start=0)
        frames.append(video[:, :1])
        captions.append(text)
    return torch.stack(frames), captions


def run(run_dir: str, clips: int, out_dir: str | None, overrides: list[str]) -> dict:
    from vgen.contact_sheet import write_contact_sheet
    from vgen.data.video import read_video_file, write_mp4
    from vgen.sample import generate, latent_shape_for, load_run_for_sampling, _tokens
    from vgen.diffusion.flow import timestep_shift

    cfg, model, text_encoder, autoencoder = load_run_for_sampling(run_dir, overrides)
    first, captions = held_out_first_frames(cfg, clips)
    out = Path(out_dir or os.path.join(run_dir, "samples", "i2v"))
    out.mkdir(parents=True, exist_ok=True)
    shape = latent_shape_for(cfg, autoencoder)
    shift = timestep_shift(_tokens(model, shape), cfg.diffusion.shift_base_tokens, cfg.diffusion.shift_max)
    s, rows, videos, errors = cfg.sample, [], [], []
    for start in range(0, len(captions), 8):
        latents = autoencoder.encode(first[start:start + 8])
        batch = generate(model, text_encoder, autoencoder, captions[start:start + 8], shape, steps=s.steps,
                         guidance=s.guidance, negative_prompt=s.negative_prompt, seed=s.seed, shift=shift,
                         first_index=start, first_frames=latents)
        for i, video in enumerate(batch):
            name = f"{start + i:03d}.mp4"
            write_mp4(out / name, video, fps=s.fps)
            decoded = read_video_file(out / name)[0].float()  # (H, W, 3) of the written file's first frame
            given = ((first[start + i, :, 0].permute(1, 2, 0) + 1) * 127.5).round()
            errors.append(float((decoded - given).abs().mean()))
            rows.append({"prompt": captions[start + i], "path": name})
            videos.append(video)
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_contact_sheet(out / "contact_sheet.png", videos)
    result = evaluate(out)
    result["first_frame_mean_abs_error"] = sum(errors) / len(errors)
    result["first_frame_errors"] = errors
    result["contact_sheet"] = str(out / "contact_sheet.png")
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--samples", help="where the videos go (default RUN/samples/i2v)")
    p.add_argument("--out", help="write the figures as JSON here")
    p.add_argument("overrides", nargs="*", help="sampler settings, e.g. sample.seed=1")
    args = p.parse_intermixed_args(argv)
    result = run(args.run, args.clips, args.samples, args.overrides)
    print(f"image-to-video over {result['n']} held-out first frames: first-frame mean abs error "
          f"{result['first_frame_mean_abs_error']:.2f} / 255")
    for name in ("colour", "direction", "both", "shape"):
        print(f"  {name + ' accuracy':20s} {result[name + '_accuracy']:.3f}")
    print(f"contact sheet: {result['contact_sheet']}")
    if args.out:
        write_record(args.out, "benchmarks/demo_i2v_eval.py", argv, result)
    return result


if __name__ == "__main__":
    main()
