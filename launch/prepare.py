"""Turn a folder or CSV/JSONL of captioned videos and images into training shards (vgen/data/ingest.py).

    python launch/prepare.py prepare.source=/data/clips prepare.out=/data/shards            # folder: a.mp4 + a.txt
    python launch/prepare.py prepare.source=/data/meta.csv prepare.out=/data/shards prepare.workers=8
    torchrun --nproc_per_node 4 launch/prepare.py prepare.source=... prepare.out=...      # ranks share the shards

Re-running the same command skips the shards already written. Files that cannot be samples (corrupt,
unreadable, no caption) are printed and listed in OUT/prepare_report.json; bad settings or sources exit 2.
Then train on the shards:

    python launch/train.py data.path=/data/shards
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.common import hydra_overrides, run_cli  # noqa: E402


def main() -> None:
    from vgen.config import load_config
    from vgen.data.ingest import launcher_rank, prepare_settings, run_prepare

    settings = prepare_settings(load_config(hydra_overrides(sys.argv[1:])))
    rank, world = launcher_rank()
    summary = run_prepare(settings, rank, world)
    waiting = "" if summary["merged"] else "; the index is written by the last rank to finish"
    print(f"[prepare {rank}/{world}] done: {summary['shards_written']} shards written, "
          f"{summary['shards_skipped']} already there{waiting}", flush=True)


if __name__ == "__main__":
    run_cli(main)
