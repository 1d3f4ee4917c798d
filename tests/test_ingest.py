"""Ingestion (launch/prepare.py, vgen/data/ingest.py): a folder or CSV/JSONL of captioned media -> shards.

The test folder is built here: videos of four sizes and aspect ratios (one portrait) and lengths 1-30 s in
mp4/mkv/webm/mov, images in jpg/png/webp, one corrupt file, one without a caption, plus the real 7 s
countdown clip from ../shared/data when present.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest

from vgen.config import ConfigError, load_config
from vgen.data import ingest
from vgen.data.ingest import PrepareSettings, prepare_settings, run_prepare
from vgen.data.probe import probe_media
from vgen.data.shards import DataError, index_tar
from vgen.data.video import decode_video

REPO = Path(__file__).resolve().parent.parent
COUNTDOWN = REPO.parent / "shared" / "data" / "countdown-320x240.mp4"

# name: (container, codec, width, height, fps, seconds); four sizes/aspect ratios, 24x40 is portrait
VIDEOS = {
    "long_landscape.mp4": ("mp4", "libx264", 48, 32, 4, 30),
    "square_short.mkv": ("matroska", "libx264", 32, 32, 8, 1),
    "portrait.webm": ("webm", "libvpx-vp9", 24, 40, 4, 12),
    "wide.mov": ("mov", "mpeg4", 64, 36, 6, 5),
}
IMAGES = {"tall.jpg": ("mjpeg", "yuvj420p", 24, 40), "flat.png": ("png", "rgb24", 48, 32),
          "sq.webp": ("libwebp", "yuv420p", 32, 32)}


def _frames(n: int, height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    frames = np.repeat(rng.integers(0, 256, (1, height, width, 3), dtype=np.uint8), n, axis=0)
    for t in range(n):  # a bar moving down, so frames differ
        frames[t, (t * 3) % height, :, :] = 255
    return frames


def write_video(path: Path, fmt: str, codec: str, width: int, height: int, fps: int, seconds: int) -> None:
    with av.open(str(path), mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for t, rgb in enumerate(_frames(fps * seconds, height, width, seed=width * height)):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = t
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_image(path: Path, codec: str, pix_fmt: str, width: int, height: int) -> None:
    with av.open(str(path), mode="w", format="image2") as container:
        stream = container.add_stream(codec, rate=1)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        frame = av.VideoFrame.from_ndarray(_frames(1, height, width, seed=7)[0], format="rgb24").reformat(format=pix_fmt)
        for packet in list(stream.encode(frame)) + list(stream.encode()):
            container.mux(packet)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The test folder; captions are '<name> caption'."""
    root = tmp_path_factory.mktemp("ingest") / "src"
    (root / "sub").mkdir(parents=True)
    for name, spec in VIDEOS.items():
        write_video(root / name, *spec)
    for name, spec in IMAGES.items():
        write_image(root / "sub" / name, *spec)
    if COUNTDOWN.exists():
        shutil.copy(COUNTDOWN, root / "countdown.mp4")
    # corrupt: the first 4 KB of an mp4 whose index (moov) sits at the end
    (root / "broken.mp4").write_bytes((root / "long_landscape.mp4").read_bytes()[:4096])
    write_image(root / "uncaptioned.png", "png", "rgb24", 16, 16)
    for media in root.rglob("*"):
        if media.is_file() and media.name != "uncaptioned.png":
            media.with_suffix(".txt").write_text(f"{media.stem} caption\n")
    return root


def settings(src, out, **kw) -> PrepareSettings:
    values = {"samples_per_shard": 3, "workers": 0, "probe": "decode", **kw}
    return PrepareSettings(str(src), Path(out), **values)


@pytest.fixture(scope="module")
def prepared(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ingest_out") / "shards"
    run_prepare(settings(source, out), log=lambda _: None)
    return out


def read_tar(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def output_bytes(out: Path) -> dict[str, bytes]:
    """Every shard's bytes and the index: what must match between two ways of preparing the same files."""
    files = {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}
    files["index.jsonl"] = (out / "index.jsonl").read_bytes()
    return files


def test_folder_gives_shards_metadata_and_the_two_bad_files(source, prepared):
    index = [json.loads(line) for line in (prepared / "index.jsonl").read_text().splitlines()]
    by_stem = {line["key"].split("_", 1)[1]: line for line in index}
    expected_videos = {Path(n).stem: spec for n, spec in VIDEOS.items()}
    assert set(by_stem) == set(expected_videos) | {Path(n).stem for n in IMAGES} | (
        {"countdown"} if COUNTDOWN.exists() else set())
    for stem, (_, _, width, height, fps, seconds) in expected_videos.items():
        line = by_stem[stem]
        assert (line["num_frames"], line["fps"], line["width"], line["height"], line["kind"]) == (
            fps * seconds, fps, width, height, "video"), stem
        assert line["duration"] == pytest.approx(seconds, abs=1.0 / fps + 1e-6)
    for name, (_, _, width, height) in IMAGES.items():
        line = by_stem[Path(name).stem]
        assert (line["num_frames"], line["width"], line["height"], line["kind"]) == (1, width, height, "image")
    if COUNTDOWN.exists():
        line = by_stem["countdown"]
        assert (line["num_frames"], line["width"], line["height"]) == (209, 320, 240)
        assert line["fps"] == pytest.approx(30000 / 1001, abs=1e-5)
    aspect = {round(line["width"] / line["height"], 2) for line in index if line["kind"] == "video"}
    assert len(aspect) >= 3 and any(a < 1 for a in aspect)

    report = json.loads((prepared / "prepare_report.json").read_text())
    bad = {Path(b["path"]).name: b["reason"] for b in report["bad"]}
    assert set(bad) == {"broken.mp4", "uncaptioned.png"}
    assert bad["broken.mp4"].startswith("unreadable:") and bad["uncaptioned.png"].startswith("no caption:")
    assert report["samples"] == len(index) and report["image"] == len(IMAGES)


def test_shard_members_hold_the_original_bytes_caption_and_metadata(source, prepared):
    index = {line["key"]: line for line in map(json.loads, (prepared / "index.jsonl").read_text().splitlines())}
    seen = set()
    for shard in sorted(prepared.glob("*.tar")):
        samples, error = index_tar(str(shard))  # the training reader's view of the tar
        assert error is None and 1 <= len(samples) <= 3
        members = read_tar(shard)
        for key, parts in samples:
            media_ext = next(e for e in parts if e not in ("txt", "json"))
            meta = json.loads(members[f"{key}.json"])
            assert members[f"{key}.{media_ext}"] == Path(meta["source"]).read_bytes()
            assert members[f"{key}.txt"].decode() == f"{Path(meta['source']).stem} caption"
            assert {k: meta[k] for k in ingest.INDEX_FIELDS} == {k: index[key][k] for k in ingest.INDEX_FIELDS}
            assert index[key]["shard"] == shard.name
            seen.add(key)
    assert seen == set(index)
    # the long video decodes from its shard bytes at the end: the training path reads what prepare wrote
    key = next(k for k in index if k.endswith("long_landscape"))
    data = read_tar(prepared / index[key]["shard"])[f"{key}.mp4"]
    assert decode_video(data, 4, 32, 48, start=index[key]["num_frames"] - 4).shape == (3, 4, 32, 48)


def _write_table(source: Path, table: Path, fmt: str) -> None:
    """The same files listed in a table away from the folder, in shuffled order, Open-Sora's columns."""
    rows = []
    for media in sorted(source.rglob("*")):
        if media.suffix == ".txt" or not media.is_file():
            continue
        caption = media.with_suffix(".txt").read_text().strip() if media.with_suffix(".txt").exists() else ""
        rel = os.path.relpath(media, table.parent)
        rows.append({"path": rel, "text": caption, "num_frames": 99, "height": 1, "width": 1, "fps": 1, "aes": 5.0})
    random.Random(0).shuffle(rows)
    table.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        with open(table, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        table.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_table_of_the_same_files_gives_the_same_shards(source, prepared, tmp_path, fmt):
    table = tmp_path / "meta" / f"list.{fmt}"
    _write_table(source, table, fmt)
    out = tmp_path / "from_table"
    run_prepare(settings(table, out), log=lambda _: None)
    assert output_bytes(out) == output_bytes(prepared)
    bad = {Path(b["path"]).name: b["reason"] for b in json.loads((out / "prepare_report.json").read_text())["bad"]}
    assert set(bad) == {"broken.mp4", "uncaptioned.png"} and bad["uncaptioned.png"].startswith("no caption:")


def test_ranks_share_the_shards_and_the_last_one_merges(source, prepared, tmp_path):
    out = tmp_path / "ranks"
    first = run_prepare(settings(source, out), rank=1, world=2, log=lambda _: None)
    assert not first["merged"] and not (out / "index.jsonl").exists()
    names = sorted(p.name for p in out.glob("*.tar"))
    assert names == sorted(p.name for p in prepared.glob("*.tar"))[1::2]
    second = run_prepare(settings(source, out), rank=0, world=2, log=lambda _: None)
    assert second["merged"] and output_bytes(out) == output_bytes(prepared)


class _Stop(Exception):
    pass


def test_a_rerun_keeps_finished_shards_and_completes(source, prepared, tmp_path, monkeypatch):
    out = tmp_path / "resume"
    real, calls = ingest.write_shard, []

    def crash_on_third(plan, *args):
        calls.append(plan.name)
        if len(calls) == 3:
            (out / f"{plan.name}.tar.partial").write_bytes(b"half a tar")  # what a killed writer leaves
            raise _Stop
        return real(plan, *args)

    monkeypatch.setattr(ingest, "write_shard", crash_on_third)
    with pytest.raises(_Stop):
        run_prepare(settings(source, out), log=lambda _: None)
    monkeypatch.setattr(ingest, "write_shard", real)
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")}
    assert len(finished) == 2 and not (out / "index.jsonl").exists()

    summary = run_prepare(settings(source, out), log=lambda _: None)
    assert summary["shards_skipped"] == 2 and summary["merged"]
    assert {n: (out / n).stat().st_ino for n in finished} == {n: v[0] for n, v in finished.items()}
    assert {n: (out / n).stat().st_mtime_ns for n in finished} == {n: v[1] for n, v in finished.items()}
    assert output_bytes(out) == output_bytes(prepared) and not list(out.glob("*.partial"))


def test_an_out_dir_of_something_else_is_refused_untouched(source, prepared, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "shard-000000.tar").write_bytes(b"mine")
    with pytest.raises(DataError, match="prepare.out=.*not an empty directory"):
        run_prepare(settings(source, foreign), log=lambda _: None)
    assert [p.name for p in foreign.iterdir()] == ["shard-000000.tar"]
    assert (foreign / "shard-000000.tar").read_bytes() == b"mine"

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    before = output_bytes(copy)
    with pytest.raises(DataError, match="prepare.out=.*another source or settings"):
        run_prepare(settings(source, copy, samples_per_shard=4), log=lambda _: None)
    assert output_bytes(copy) == before


def test_bad_sources_name_the_setting_or_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"prepare.source=.*empty holds no videos or images"):
        run_prepare(settings(tmp_path / "empty", tmp_path / "o1"), log=lambda _: None)
    with pytest.raises(DataError, match="prepare.source=.*does not exist"):
        run_prepare(settings(tmp_path / "nope", tmp_path / "o2"), log=lambda _: None)
    table = tmp_path / "no_path.csv"
    table.write_text("file,text\na.mp4,hello\n")
    with pytest.raises(DataError, match=r"no_path.csv has no 'path' column \(columns: file, text\)"):
        run_prepare(settings(table, tmp_path / "o3"), log=lambda _: None)
    (tmp_path / "no_text.jsonl").write_text('{"path": "a.mp4"}\n')
    with pytest.raises(DataError, match="no_text.jsonl has no 'text' column"):
        run_prepare(settings(tmp_path / "no_text.jsonl", tmp_path / "o4"), log=lambda _: None)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))
    for override, setting in [([], "prepare.source"), (["prepare.source=x"], "prepare.out"),
                              (["prepare.source=x", "prepare.out=y", "prepare.workers=-1"], "prepare.workers"),
                              (["prepare.source=x", "prepare.out=y", "prepare.probe=fast"], "prepare.probe")]:
        with pytest.raises(ConfigError, match=setting):
            prepare_settings(load_config(override))


def test_probe_modes_agree(source):
    for media in sorted(source.rglob("*")):
        if not media.is_file() or media.suffix == ".txt" or media.name == "broken.mp4":
            continue
        assert probe_media(media, "packets") == probe_media(media, "decode"), media.name


@pytest.mark.slow
def test_launcher_exit_codes_and_parallel_ranks(source, prepared, tmp_path):
    """The real launcher: bad input exits 2 naming the file; torchrun ranks x worker processes give the
    shards of the single-process run."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    table = tmp_path / "bad.csv"
    table.write_text("video,caption\na.mp4,hello\n")
    bad = subprocess.run([sys.executable, "launch/prepare.py", f"prepare.source={table}",
                          f"prepare.out={tmp_path / 'x'}"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "bad.csv has no 'path' column" in bad.stderr, bad.stderr
    out = tmp_path / "torchrun"
    torchrun = Path(sys.executable).with_name("torchrun")
    run = subprocess.run([str(torchrun), "--nproc_per_node", "2", "launch/prepare.py", f"prepare.source={source}",
                          f"prepare.out={out}", "prepare.samples_per_shard=3", "prepare.workers=2"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert output_bytes(out) == output_bytes(prepared)
    assert "broken.mp4: unreadable" in run.stdout and "uncaptioned.png: no caption" in run.stdout


def test_the_same_file_twice_is_one_sample(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_image(src / "a.png", "png", "rgb24", 16, 16)
    (src / "link.png").symlink_to(src / "a.png")
    for stem in ("a", "link"):
        (src / f"{stem}.txt").write_text("a caption")
    run_prepare(settings(src, tmp_path / "out"), log=lambda _: None)
    index = (tmp_path / "out" / "index.jsonl").read_text().splitlines()
    bad = json.loads((tmp_path / "out" / "prepare_report.json").read_text())["bad"]
    assert len(index) == 1 and [(Path(b["path"]).name, b["reason"].split(":")[0]) for b in bad] == [("link.png", "duplicate")]


def test_launcher_main_exits_2_on_an_empty_folder(tmp_path, monkeypatch, capsys):
    from launch import prepare as launcher
    from launch.common import run_cli

    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(sys, "argv", ["launch/prepare.py", f"prepare.source={tmp_path / 'empty'}",
                                      f"prepare.out={tmp_path / 'out'}"])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(launcher.main)
    assert exit_info.value.code == 2
    assert f"prepare.source={tmp_path / 'empty'} holds no videos or images" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
