"""Train a video DiT with flow matching under DeepSpeed.

    python launch/train.py                                    # the demo, one process (CPU or GPU)
    python launch/train.py experiment=demo run.dir=runs/a train.max_steps=100
    torchrun --nproc_per_node 2 launch/train.py run.dir=runs/b
    deepspeed --num_gpus 8 launch/train.py experiment=... run.dir=... parallel.zero_stage=3
    deepspeed --hostfile hosts launch/train.py experiment=... run.dir=...

Re-running the same command with the same run.dir resumes from its newest complete checkpoint.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.common import hydra_overrides, run_cli  # noqa: E402


def main() -> None:
    from vgen.config import load_config
    from vgen.train.trainer import run_training

    cfg = load_config(hydra_overrides(sys.argv[1:]))
    run_training(cfg)


if __name__ == "__main__":
    run_cli(main)
