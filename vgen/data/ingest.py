"""Ingestion: a folder or CSV/JSONL of captioned videos and images -> WebDataset shards + index.

    python launch/prepare.py prepare.source=/data/my_videos prepare.out=/data/my_shards prepare.workers=8

The output directory holds
- `shard-NNNNNN.tar`: per sample `KEY.<ext>` (the original bytes: mp4/webm/mkv/mov/avi or jpg/png/webp),
  `KEY.txt` (the caption) and `KEY.json` ({"num_frames", "fps", "width", "height", "duration", "kind",
  "source"}; images are 1-frame samples with fps 0 and duration 0);
- `index.jsonl`: one line per sample, {"key", "shard", "num_frames", "fps", "width", "height", "duration",
  "kind"}, shard by shard, which the bucketing reads without opening a tar;
- `prepare_report.json`: the counts and every file left out with its reason (also printed);
- `.prepare/`: the plan and one record per finished shard (what makes a re-run resumable).

Shards are fixed: the sources sorted by path, `samples_per_shard` per shard, so a table of the same files
gives byte-identical shards to the folder, and every rank computes the same plan without talking to the
others. Rank r of w (torchrun/deepspeed set RANK and WORLD_SIZE; no process group is needed) writes shards
r::w, each in a pool of `workers` processes. A file that fails its probe costs its sample, listed in the
report; the shard is written without it. Each tar is written as NAME.partial and renamed when complete, then
its record is written: a record means done, and a re-run skips it. Whichever rank finds every record
present writes the index and the report.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

from vgen.config import ConfigError
from vgen.data.probe import PROBE_MODES, ProbeError, media_extension, probe_media
from vgen.data.shards import DataError
from vgen.data.sources import BadFile, SourceEntry, list_source

STATE_DIR = ".prepare"
INDEX_NAME = "index.jsonl"
REPORT_NAME = "prepare_report.json"
INDEX_FIELDS = ("num_frames", "fps", "width", "height", "duration", "kind")


@dataclass(frozen=True)
class PrepareSettings:
    source: str
    out: Path
    samples_per_shard: int
    workers: int  # processes per rank; 0 = in this process
    probe: str  # "decode" or "packets" (see vgen.data.probe.probe_media)


@dataclass(frozen=True)
class ShardPlan:
    name: str  # "shard-000000" (the tar is NAME.tar)
    samples: tuple[tuple[str, SourceEntry], ...]  # (key, entry)


def prepare_settings(cfg) -> PrepareSettings:
    """The `prepare` section checked; each error names the setting."""
    p = cfg.prepare
    if not p.source:
        raise ConfigError("prepare.source=PATH is required: a folder of videos/images with .txt captions, "
                          "or a .csv/.jsonl with path and text columns")
    if not p.out:
        raise ConfigError("prepare.out=DIR is required: where the shards go")
    if p.samples_per_shard < 1:
        raise ConfigError(f"prepare.samples_per_shard={p.samples_per_shard} must be >= 1")
    if p.workers < 0:
        raise ConfigError(f"prepare.workers={p.workers} must be >= 0 (0 = in the main process)")
    if p.probe not in PROBE_MODES:
        raise ConfigError(f"prepare.probe={p.probe!r} must be one of {list(PROBE_MODES)}")
    return PrepareSettings(str(p.source), Path(p.out), int(p.samples_per_shard), int(p.workers), str(p.probe))


def plan_shards(entries: list[SourceEntry], samples_per_shard: int) -> list[ShardPlan]:
    """Sorted entries cut into shards of `samples_per_shard`; the key is the global position + the stem."""
    keyed = [(f"{i:08d}_{_safe_stem(e.path)}", e) for i, e in enumerate(entries)]
    return [ShardPlan(f"shard-{s:06d}", tuple(keyed[start:start + samples_per_shard]))
            for s, start in enumerate(range(0, len(keyed), samples_per_shard))]


def _safe_stem(path: str) -> str:
    # WebDataset splits a member name at its first dot, and tar's plain header holds 100 bytes of name
    return re.sub(r"[^A-Za-z0-9_-]+", "_", Path(path).stem)[:40]


def plan_fingerprint(plans: list[ShardPlan], settings: PrepareSettings) -> str:
    """What a finished shard's bytes depend on: files (path, caption, size), shard size, probe mode."""
    h = hashlib.sha256(json.dumps([settings.samples_per_shard, settings.probe]).encode())
    for plan in plans:
        for key, e in plan.samples:
            size = os.path.getsize(e.path) if os.path.exists(e.path) else -1
            h.update(json.dumps([plan.name, key, e.path, e.caption, size]).encode())
    return h.hexdigest()


def run_prepare(settings: PrepareSettings, rank: int = 0, world: int = 1,
                log: Callable[[str], None] = print) -> dict:
    """Write this rank's shards (skipping finished ones); merge the index when every shard is done.

    Returns:
        {"shards_written", "shards_skipped", "merged": bool, "report": the report dict or None}
    Raises:
        ConfigError/DataError: bad settings or source, or an out dir holding something else.
    """
    entries, listing_bad = list_source(settings.source)
    plans = plan_shards(entries, settings.samples_per_shard)
    if not plans:
        raise DataError(f"prepare.source={settings.source}: none of its {len(listing_bad)} files can be a "
                        f"sample, e.g. {listing_bad[0].path}: {listing_bad[0].reason}")
    _claim_out_dir(settings, plan_fingerprint(plans, settings), len(plans))
    for bad in listing_bad if rank == 0 else []:
        log(f"[prepare] skipped {bad.path}: {bad.reason}")
    mine = [p for p in plans[rank::world] if not _record_path(settings.out, p.name).exists()]
    written = _write_shards(mine, settings, rank, world, log)
    report = merge_if_complete(settings, plans, listing_bad, log)
    return {"shards_written": written, "shards_skipped": len(plans[rank::world]) - written,
            "merged": report is not None, "report": report}


def _claim_out_dir(settings: PrepareSettings, fingerprint: str, num_shards: int) -> None:
    """Check `prepare.out` is new, empty, or holds this very plan; record the plan. Nothing is removed."""
    out, plan_file = settings.out, settings.out / STATE_DIR / "plan.json"
    if plan_file.exists():
        try:
            saved = json.loads(plan_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"prepare.out={out}: {plan_file} is damaged ({e}); nothing was changed: use a new "
                            "prepare.out, or delete that file to start the plan over (finished shards are redone)") from e
        if saved.get("fingerprint") != fingerprint:
            raise DataError(f"prepare.out={out} holds shards of another source or settings (saved plan: "
                            f"{saved.get('shards')} shards of {saved.get('samples_per_shard')} from "
                            f"{saved.get('source')}); nothing was changed: use a new prepare.out or delete it")
        return
    # .prepare alone may be there: another rank of this job creating the plan at the same moment
    if out.exists() and (not out.is_dir() or any(p.name != STATE_DIR for p in out.iterdir())):
        raise DataError(f"prepare.out={out} exists and is not an empty directory written by prepare "
                        f"(no {STATE_DIR}/plan.json); nothing was changed: choose a new or empty directory")
    _write_atomic(plan_file, json.dumps({"fingerprint": fingerprint, "shards": num_shards, "source": settings.source,
                                         "samples_per_shard": settings.samples_per_shard}, indent=1))


def _write_shards(plans: list[ShardPlan], settings: PrepareSettings, rank: int, world: int, log) -> int:
    done = 0
    if settings.workers == 0:
        for plan in plans:
            _log_shard(write_shard(plan, settings.out, settings.probe), rank, world, log)
            done += 1
        return done
    with ProcessPoolExecutor(settings.workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(write_shard, p, settings.out, settings.probe): p.name for p in plans}
        try:
            for future in as_completed(futures):
                _log_shard(future.result(), rank, world, log)
                done += 1
        except BrokenProcessPool as e:
            # a decoder crash (not an exception) on some file: finished shards are kept, a re-run retries
            raise RuntimeError(f"a prepare worker process died ({e}); {done} shards were finished and are "
                               "kept: re-run the same command to retry the others") from e
    return done


def _log_shard(record: dict, rank: int, world: int, log) -> None:
    for bad in record["bad"]:
        log(f"[prepare {rank}/{world}] skipped {bad['path']}: {bad['reason']}")
    log(f"[prepare {rank}/{world}] {record['name']}: {len(record['samples'])} samples, "
        f"{len(record['bad'])} skipped")


def write_shard(plan: ShardPlan, out: Path, probe: str) -> dict:
    """Probe the shard's files, write NAME.tar (temp name, then rename) and its record; returns the record."""
    samples, bad = [], []
    tar_name = f"{plan.name}.tar"
    partial = out / f"{tar_name}.partial"
    with tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, entry in plan.samples:
            try:
                meta = probe_media(entry.path, probe)
                _add_sample(tar, key, entry, meta)
            except (ProbeError, OSError) as e:
                bad.append(BadFile(entry.path, str(e) if isinstance(e, ProbeError) else f"unreadable: {e}").as_dict())
                continue
            except Exception as e:  # a probe bug on one odd file must not end the job: list it
                bad.append(BadFile(entry.path, f"probe failed: {type(e).__name__}: {e}").as_dict())
                continue
            samples.append({"key": key, "shard": tar_name, **{k: meta[k] for k in INDEX_FIELDS}})
    if samples:
        os.replace(partial, out / tar_name)
    else:
        partial.unlink()  # an all-bad shard leaves no empty tar for the loader to trip on
    record = {"name": plan.name, "shard": tar_name if samples else None, "samples": samples, "bad": bad}
    _write_atomic(_record_path(out, plan.name), json.dumps(record))
    return record


def _add_sample(tar: tarfile.TarFile, key: str, entry: SourceEntry, meta: dict) -> None:
    """Media, metadata and caption of one sample; read before adding, so a failed read leaves no member."""
    media = Path(entry.path).read_bytes()
    json_bytes = json.dumps({**meta, "source": entry.path}).encode()
    for name, data in ((f"{key}.{media_extension(entry.path)}", media), (f"{key}.json", json_bytes),
                       (f"{key}.txt", entry.caption.encode("utf-8"))):
        # fixed owner, mode and time: the same files give the same bytes, whichever run or machine wrote them
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        tar.addfile(info, io.BytesIO(data))  # shares `data`'s buffer, no copy


def _record_path(out: Path, name: str) -> Path:
    return out / STATE_DIR / f"{name}.json"


def merge_if_complete(settings: PrepareSettings, plans: list[ShardPlan], listing_bad: list[BadFile],
                      log=print) -> dict | None:
    """Write index.jsonl and prepare_report.json when every shard has its record; else None."""
    records = []
    for plan in plans:
        path = _record_path(settings.out, plan.name)
        if not path.exists():
            return None
        records.append(json.loads(path.read_text()))
    samples = [s for r in records for s in r["samples"]]
    bad = sorted([b.as_dict() for b in listing_bad] + [b for r in records for b in r["bad"]],
                 key=lambda b: b["path"])
    _write_atomic(settings.out / INDEX_NAME, "".join(json.dumps(s) + "\n" for s in samples))
    kinds = {k: sum(s["kind"] == k for s in samples) for k in ("video", "image")}
    report = {"source": str(Path(settings.source).resolve()), "out": str(settings.out.resolve()), "samples": len(samples), **kinds,
              "shards": sum(r["shard"] is not None for r in records), "samples_per_shard": settings.samples_per_shard,
              "probe": settings.probe, "bad": bad}
    _write_atomic(settings.out / REPORT_NAME, json.dumps(report, indent=1))
    log(f"[prepare] {report['samples']} samples ({kinds['video']} videos, {kinds['image']} images) in "
        f"{report['shards']} shards under {settings.out}; {len(bad)} files left out"
        + (f" (listed in {settings.out / REPORT_NAME}):" if bad else ""))
    for b in bad:
        log(f"  {b['path']}: {b['reason']}")
    if not samples:
        raise DataError(f"prepare.source={settings.source}: no file could be read; reasons in "
                        f"{settings.out / REPORT_NAME}")
    return report


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def launcher_rank() -> tuple[int, int]:
    """(rank, world size) from torchrun's/deepspeed's environment; (0, 1) under plain python."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
