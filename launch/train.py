"""Train a video DiT with flow matching under DeepSpeed.

    python launch/train.py                                    # the demo, one process (CPU or GPU)
    python launch/train.py experiment=demo run.dir=runs/a train.max_steps=100
    torchrun --nproc_per_node 2 launch/train.py run.dir=runs/b
    deepspeed --num_gpus 8 launch/train.py experiment=... run.dir=... parallel.zero_stage=3
    deepspeed --hostfile hosts launch/train.py experiment=... run.dir=...

Re-running the same command with the same run.dir resumes from its newest complete checkpoint, also on
another number of GPUs or sequence-parallel degree (same global batch). Exit status: 2 bad input, 3 a
checkpoint could not be saved (the previous one is kept), 4 a collective failed (a rank or node died).
SIGTERM (preemption) checkpoints at the next step boundary and exits 0; one that arrives after the last
checkpoint, during the shutdown, is logged and the shutdown finishes normally (exit 0).
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.common import hydra_overrides, run_cli  # noqa: E402


def main() -> None:
    from vgen.config import load_config
    from vgen.train.durable import SaveError, fault_point
    from vgen.train.setup import is_collective_failure
    from vgen.train.trainer import run_training

    cfg = load_config(hydra_overrides(sys.argv[1:]))
    try:
        step = run_training(cfg)
    except SaveError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        os._exit(3)  # skip interpreter teardown: other ranks may be gone, and gloo threads can abort on it
    except RuntimeError as err:
        if not is_collective_failure(err):
            raise
        print(f"error: a collective failed on rank {os.environ.get('RANK', '0')}: a peer rank or node died or did "
              f"not answer within train.collective_timeout_s={cfg.train.collective_timeout_s:g} ({err})",
              file=sys.stderr, flush=True)
        os._exit(4)
    fault_point("exit", step)
    # interpreter teardown puts Python's SIGTERM handler back to the default (killed, status -15) while the
    # process is only exiting: ignore the signal for that last stretch, everything is saved and closed
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


if __name__ == "__main__":
    run_cli(main)
