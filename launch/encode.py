"""Encode video shards into latent shards (autoencoder latents + text embeddings), ranks split by shard.

    python launch/encode.py data.path=data_cache/demo data.encode_out=data_cache/demo_latents
    torchrun --nproc_per_node 2 launch/encode.py data.path=SRC data.encode_out=DST
    deepspeed --num_gpus 8 launch/encode.py data.path=SRC encode.out=DST autoencoder.kind=vae \
        autoencoder.weights=wan21_vae.safetensors data.num_frames=17 data.height=256 data.width=256

`encode.out|batch|dtype=` are accepted as spellings of `data.encode_out|batch|dtype=`. Re-running the same
command skips the shards already written. Then train on the latents:

    python launch/train.py data.kind=latents data.path=DST
"""

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.common import hydra_overrides, run_cli  # noqa: E402


def encode_aliases(overrides: list[str]) -> list[str]:
    """`encode.X=...` -> `data.encode_X=...` while the schema has no `encode` section of its own."""
    from vgen.config import Config

    if "encode" in Config.__dataclass_fields__:
        return overrides
    return [re.sub(r"^(\+{0,2})encode\.(\w+)=", r"\1data.encode_\2=", o) for o in overrides]


def main() -> None:
    from vgen.config import load_config
    from vgen.data.encode_job import launcher_rank, pick_device, run_encode

    cfg = load_config(encode_aliases(hydra_overrides(sys.argv[1:])))
    rank, world, local_rank = launcher_rank()
    summary = run_encode(cfg, rank, world, pick_device(cfg.run, local_rank))
    print(f"[encode {rank}/{world}] done: {summary['encoded']} clips encoded, {summary['skipped']} skipped, "
          f"{summary['shards_done']} shards written, {summary['shards_skipped']} already there, "
          f"{summary['seconds']:.1f} s", flush=True)


if __name__ == "__main__":
    run_cli(main)
