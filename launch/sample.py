"""Sample videos from a trained run's exported weights (EMA by default).

    python launch/sample.py run.dir=runs/demo 'prompts=["a red circle moving left"]'
    python launch/sample.py run.dir=runs/demo sample.steps=30 sample.guidance=4 sample.seed=1 \
        sample.negative_prompt="a blue square" sample.out_dir=/tmp/out
    python launch/sample.py run.dir=runs/demo sample.image=first.png 'prompts=["a red circle moving left"]'
    deepspeed --num_gpus 4 launch/sample.py run.dir=runs/demo parallel.sp.mode=ring
    torchrun --nproc_per_node 4 launch/sample.py run.dir=runs/demo parallel.sp.degree=4 parallel.sp.mode=hybrid \
        parallel.sp.ulysses_degree=2

Writes one mp4 per prompt, manifest.jsonl and contact_sheet.png (a row per prompt, its frames across)
under RUN/samples/prompts/ (or sample.out_dir). sample.image=PATH (an image, or a video whose first frame
is taken) starts every video with that frame: image-to-video, for runs trained with model.i2v=true;
sample.save_raw=true also writes each video's float frames as NNN.safetensors. Under a launcher every rank
runs the same generation with sequence parallelism (parallel.sp.degree defaults to the number of
processes) and rank 0 writes the files.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.common import hydra_overrides, run_cli  # noqa: E402


def main() -> None:
    from vgen.config import ConfigError
    from vgen.sample import generate_to_dir, init_sampling_parallel, load_run_for_sampling, sampling_device

    overrides = hydra_overrides(sys.argv[1:])
    run_dirs = [o.split("=", 1)[1] for o in overrides if o.startswith("run.dir=")]
    if not run_dirs:
        raise ConfigError("run.dir=PATH is required: the run directory to sample from")
    device = sampling_device()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg, model, text_encoder, autoencoder = load_run_for_sampling(run_dirs[-1], overrides, device=device, world_size=world)
    topology = init_sampling_parallel(model, cfg, device)
    is_main = topology is None or topology.rank == 0
    prompts = list(cfg.get("prompts") or []) or None
    out = cfg.sample.out_dir or os.path.join(run_dirs[-1], "samples", "prompts")
    generate_to_dir(model, text_encoder, autoencoder, cfg, out, prompts=prompts, write=is_main)
    if topology is not None:
        import torch.distributed as dist

        dist.barrier()  # the files exist when any rank returns
        dist.destroy_process_group()
    if is_main:
        print(f"samples written to {out} (manifest.jsonl lists prompt -> file)")
        print(f"contact sheet: {os.path.join(out, 'contact_sheet.png')}")


if __name__ == "__main__":
    run_cli(main)
