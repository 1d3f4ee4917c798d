"""Elastic resume: continue a run on another world size, sequence-parallel degree or ZeRO stage.

What has to carry over, and how:
- model, optimizer, LR schedule: DeepSpeed's files are partitioned by the saving layout. When the layout
  differs, rank 0 converts the checkpoint once with DeepSpeed's `ds_to_universal` into `<tag>/universal`
  (layout-free, one folder per parameter) and the engine loads it with `checkpoint.load_universal`.
- EMA: sharded by rank (vgen/train/ema.py); rebuilt from every old rank's shards and re-cut.
- data position: the sample order is global (vgen/data), so rank 0's saved position is every rank's.
- global batch: recorded in meta.json; a resume with another one is refused unless
  train.allow_batch_change=true, since it changes both the sample stream and the optimisation.
"""

from __future__ import annotations

import os
import time
from argparse import Namespace
from pathlib import Path

import torch.distributed as dist

from vgen.config import ConfigError

DONE = ".converted"


def run_layout(cfg, topo, loader=None) -> dict:
    """What a checkpoint records about the run that wrote it (meta.json).

    global_batch: samples per optimizer step; with data.buckets, one per bucket (from the loader's order).
    """
    micro, accum = int(cfg.data.micro_batch), int(cfg.train.grad_accum)
    per_bucket = loader.state_dict().get("global_batch") if loader is not None else None
    if per_bucket and len(per_bucket) == 1:
        per_bucket = per_bucket[0]
    return {"world_size": topo.world_size, "dp_size": topo.dp_size, "sp_size": topo.sp_size,
            "zero_stage": int(cfg.parallel.zero_stage), "micro_batch": micro, "grad_accum": accum,
            "global_batch": per_bucket or micro * accum * topo.dp_size}


def check_global_batch(saved: dict, now: dict, cfg, tag: str) -> None:
    """Refuse a resume that changes the global batch, naming the settings on both sides."""
    if "global_batch" not in saved or saved["global_batch"] == now["global_batch"] or cfg.train.allow_batch_change:
        return
    def describe(x: dict) -> str:
        micro = "the data.buckets micro_batch values" if isinstance(x["global_batch"], list) else f"data.micro_batch {x['micro_batch']}"
        return (f"{x['global_batch']} = {micro} x train.grad_accum {x['grad_accum']} x data-parallel size "
                f"{x['dp_size']} (world {x['world_size']} / parallel.sp.degree {x['sp_size']})")
    raise ConfigError(
        f"run.dir={cfg.run.dir!r}: checkpoint {tag} was trained with global batch {describe(saved)}; this resume "
        f"has global batch {describe(now)}. Choose data.micro_batch / train.grad_accum so the global batch stays "
        f"{saved['global_batch']}, or set train.allow_batch_change=true to change it on purpose. Nothing was changed."
    )


def needs_universal(saved: dict, now: dict) -> bool:
    """DeepSpeed's partitioned files load only into the layout that wrote them."""
    return any(saved.get(k, now[k]) != now[k] for k in ("world_size", "zero_stage"))


def prepare_universal(tag_dir: Path, timeout_s: float, log) -> tuple[str, str]:
    """Convert `tag_dir` to a universal checkpoint once (rank 0); returns (load_dir, tag) for the engine.

    The other ranks wait for the conversion's marker file rather than in a collective: converting a large
    model can outlast train.collective_timeout_s.
    """
    out = tag_dir / "universal"
    if dist.get_rank() == 0 and not (out / DONE).is_file():
        log(f"checkpoint {tag_dir.name} was saved with another world size or ZeRO stage: converting it with "
            f"DeepSpeed's ds_to_universal into {out}")
        _convert(tag_dir, out)
    deadline = time.monotonic() + max(timeout_s, 3600.0)
    while not (out / DONE).is_file():
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank 0 did not finish converting {tag_dir} to a universal checkpoint")
        time.sleep(0.5)
    return str(tag_dir), "universal"


def _convert(tag_dir: Path, out: Path) -> None:
    import shutil

    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(out, ignore_errors=True)  # a conversion killed half-way
    args = Namespace(input_folder=str(tag_dir), output_folder=str(out), num_extract_workers=1,
                     num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    ds_to_universal.main(args)
    latest_universal = tag_dir / "latest_universal"  # written by the converter next to its output; unused
    latest_universal.unlink(missing_ok=True)
    (out / DONE).write_text("ok")
    os.sync()
