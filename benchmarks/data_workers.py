"""Clips per second of the training loader with data.workers = 0, 1, 2 (decoding worker processes).

    python benchmarks/data_workers.py                       # writes benchmarks/results/data_workers_cpu.json
    python benchmarks/data_workers.py --rounds 5 --batches 8

The set: copies of the real 7 s H.264 clip ../shared/data/countdown-320x240.mp4 (209 frames, 320x240), in 4
shards with an index, trained as one bucket of 16 frames at stride 2 (a random start in each clip), 64x64, 4 clips
a micro-batch. Each setting is timed in every round, the settings alternating, so a busy machine slows them
alike; the figures are the clips/s of each round and the per-round ratios to workers=0. The workers are started
(and warmed by one batch) before the clock runs: start-up is paid once per run, not per batch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VIDEO = ROOT.parent / "shared" / "data" / "countdown-320x240.mp4"


def write_set(out: Path, copies: int, per_shard: int) -> None:
    import webdataset as wds

    data = VIDEO.read_bytes()
    meta = {"num_frames": 209, "fps": 30, "width": 320, "height": 240, "duration": 7.0, "kind": "video"}
    records = []
    for s in range(0, copies, per_shard):
        shard = f"bench-{s // per_shard:06d}.tar"
        with wds.TarWriter(str(out / shard), mtime=0) as sink:
            for i in range(s, min(s + per_shard, copies)):
                sink.write({"__key__": f"clip{i:04d}", "mp4": data, "txt": f"countdown {i}", "json": json.dumps(meta)})
                records.append({"key": f"clip{i:04d}", "shard": shard, **meta})
    (out / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def device_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} x {os.cpu_count()} cores"
    except OSError:
        pass
    return f"CPU: {platform.processor()} x {os.cpu_count()} cores"


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=6, help="micro-batches timed per setting and round")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_workers_cpu.json"))
    args = parser.parse_args()
    if not VIDEO.is_file():
        sys.exit(f"error: {VIDEO} is missing (the benchmark decodes that real clip)")
    import torch
    from omegaconf import OmegaConf

    from vgen.data.loader import build_loader

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        write_set(Path(tmp), copies=64, per_shard=16)
        base = dict(kind="videos", path=tmp, num_frames=16, height=64, width=64, frame_stride=2, micro_batch=4,
                    make_demo=False, buckets=[])
        loaders = {w: build_loader(OmegaConf.create({**base, "workers": w}), 0, 1, seed=0, prefetch=2, log=lambda m: None)
                   for w in args.workers}
        for loader in loaders.values():
            next(loader)  # start the workers and the prefetch thread
        rates = {w: [] for w in args.workers}
        for _ in range(args.rounds):
            for w, loader in loaders.items():
                start = time.perf_counter()
                clips = sum(len(next(loader)["caption"]) for _ in range(args.batches))
                rates[w].append(clips / (time.perf_counter() - start))
                loader.close()  # stop its prefetch thread so it does not steal the next setting's cores
        for loader in loaders.values():
            loader.close(workers=True)
    ref = args.workers[0]
    result = {
        "benchmark": "data_workers", "device": device_name(), "torch": torch.__version__,
        # the machine is shared: a load far above the core count means every setting got a fraction of a core
        "load_average_1_5_15min_at_end": list(os.getloadavg()),
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]), "git_commit": git_commit(),
        "setup": {"video": "countdown-320x240.mp4 (209 frames, H.264)", "clip": "16 frames at stride 2 -> 64x64",
                  "micro_batch": 4, "batches_per_round": args.batches, "rounds": args.rounds, "prefetch": 2},
        "clips_per_s": {str(w): r for w, r in rates.items()},
        "median_clips_per_s": {str(w): statistics.median(r) for w, r in rates.items()},
        "ratio_to_workers_0_per_round": {str(w): [a / b for a, b in zip(r, rates[ref])] for w, r in rates.items()},
        "median_ratio_to_workers_0": {str(w): statistics.median(a / b for a, b in zip(r, rates[ref]))
                                      for w, r in rates.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("median_clips_per_s", "median_ratio_to_workers_0")}, indent=1))


if __name__ == "__main__":
    main()
