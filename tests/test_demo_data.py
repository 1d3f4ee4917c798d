"""The demo dataset and its pixel-level evaluator prove each other: every ground-truth clip must be
classified right, and a wrong prompt must be scored wrong."""

import importlib.util
import json
import multiprocessing
import random
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vgen.data.demo import (COLOURS, DIRECTIONS, MARKER, SHAPES, caption, eval_prompts, parse_prompt,
                            render_clip, write_demo_shards)
from vgen.data.video import decode_video, read_video_file, write_mp4

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("demo_eval", ROOT / "benchmarks" / "demo_eval.py")
demo_eval = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo_eval)

SMALL = dict(num_clips=24, clips_per_shard=8)


def _samples(shards):
    """{key: {ext: bytes}} of every sample in the shards."""
    out = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    shards = write_demo_shards(tmp_path_factory.mktemp("demo"), **SMALL)
    return shards, _samples(shards)


def test_demo_shards_layout_and_determinism(demo, tmp_path):
    shards, samples = demo
    assert [p.name for p in shards] == ["demo-000000.tar", "demo-000001.tar", "demo-000002.tar"]
    assert sorted(samples) == [f"{i:06d}" for i in range(24)]
    again = write_demo_shards(tmp_path / "again", **SMALL)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in shards]
    other = write_demo_shards(tmp_path / "other", **SMALL, seed=1)
    assert other[0].read_bytes() != shards[0].read_bytes()


def test_every_demo_clip_is_classified_correctly(demo):
    _, samples = demo
    seen = set()
    for key, parts in samples.items():
        meta = json.loads(parts["json"])
        assert parts["txt"].decode() == caption(meta["colour"], meta["shape"], meta["direction"])
        assert parse_prompt(parts["txt"].decode()) == {k: meta[k] for k in ("colour", "shape", "direction")}
        video = decode_video(parts["mp4"], num_frames=8, height=32, width=32)  # the training path
        frames = ((video.permute(1, 2, 3, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
        got = demo_eval.classify_clip(frames)
        assert got["found"], key
        assert (got["colour"], got["direction"], got["shape"]) == (meta["colour"], meta["direction"],
                                                                  meta["shape"]), (key, got, meta)
        # the shape starts near the centre, so its first position says nothing about the direction, and
        # moves outwards at least a pixel per frame (the last frames may show only part of it)
        side, size = 32, meta["size"]
        assert abs(meta["x0"] - (side - size) / 2) <= 3 and abs(meta["y0"] - (side - size) / 2) <= 3
        assert meta["speed"] >= 1 and abs(got["dx"]) + abs(got["dy"]) > 7 * meta["speed"] - size / 2
        seen.add(meta["colour"])
    assert seen == set(COLOURS)  # 24 clips drawn from balanced rounds cover every colour


def test_demo_layouts_keep_the_shape_in_view():
    for layout in ("centre", "inside"):
        for i, direction in enumerate(DIRECTIONS * 4):
            frames, meta = render_clip("red", SHAPES[i % 2], direction, 8, 16, 16, random.Random(i), layout=layout)
            area = (frames.max(-1) > 100).sum((1, 2))  # shape pixels per frame
            assert area[0] == area.max() > 0 and area.min() >= area[0] / 2, (layout, meta, area)
            if layout == "inside":
                assert (area == area[0]).all()
    with pytest.raises(ValueError, match="layout"):
        render_clip("red", "square", "left", 8, 16, 16, random.Random(0), layout="edge")


def test_classify_blank_and_static_clips():
    blank = np.full((8, 32, 32, 3), 8, dtype=np.uint8)
    got = demo_eval.classify_clip(blank)
    assert not got["found"] and got["colour"] is None and got["direction"] is None
    speckled = blank.copy()
    speckled[3, 5, 7] = speckled[6, 20, 2] = COLOURS["red"]  # two noisy pixels are not a shape
    assert not demo_eval.classify_clip(speckled)["found"]
    still = blank.copy()
    still[:, 10:18, 10:18] = COLOURS["cyan"]
    got = demo_eval.classify_clip(still)
    assert got["colour"] == "cyan" and got["direction"] is None
    # brightness does not change the colour: a dim, hazy yellow is still yellow
    dim = blank.copy()
    dim[:, 10:18, 10:18] = (120, 115, 60)
    assert demo_eval.classify_clip(dim)["colour"] == "yellow"


def test_eval_prompts_cover_the_vocabulary():
    prompts = eval_prompts()
    assert len(prompts) >= 16 and len(set(prompts)) == len(prompts)
    parsed = [parse_prompt(p) for p in prompts]
    assert {p["colour"] for p in parsed} == set(COLOURS)
    assert {p["shape"] for p in parsed} == set(SHAPES)
    assert {p["direction"] for p in parsed} == set(DIRECTIONS)
    assert len(set(eval_prompts(48))) == 48
    assert eval_prompts(16) == prompts[:16]
    with pytest.raises(ValueError, match="colour"):
        parse_prompt("a purple square moving left")


def test_evaluate_manifest_scores_right_and_wrong(demo, tmp_path):
    _, samples = demo
    rows = []
    for i, key in enumerate(sorted(samples)[:6]):
        meta = json.loads(samples[key]["json"])
        video = decode_video(samples[key]["mp4"], num_frames=8, height=32, width=32)
        write_mp4(tmp_path / f"{key}.mp4", video, fps=8)  # float (3, T, H, W) path, as the sampler saves
        prompt = caption(meta["colour"], meta["shape"], meta["direction"])
        if i == 0:  # a prompt the clip does not follow in colour
            wrong = next(c for c in COLOURS if c != meta["colour"])
            prompt = caption(wrong, meta["shape"], meta["direction"])
        if i == 1:  # ... nor in direction
            wrong = next(d for d in DIRECTIONS if d != meta["direction"])
            prompt = caption(meta["colour"], meta["shape"], wrong)
        rows.append({"prompt": prompt, "path": f"{key}.mp4"})
    write_mp4(tmp_path / "blank.mp4", np.zeros((8, 32, 32, 3), np.uint8), fps=8)
    rows.append({"prompt": "a red circle moving up", "path": str(tmp_path / "blank.mp4")})  # absolute path
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    out = tmp_path / "result.json"
    result = demo_eval.main([str(tmp_path), "--out", str(out)])
    assert result["n"] == 7
    assert result["colour_accuracy"] == pytest.approx(5 / 7)
    assert result["direction_accuracy"] == pytest.approx(5 / 7)
    assert result["both_accuracy"] == pytest.approx(4 / 7)
    assert result["rows"][6]["got"]["colour"] is None
    record = json.loads(out.read_text())
    assert "demo_eval.py" in record["command"] and len(record["rows"]) == 7 and "git_commit" in record
    assert read_video_file(tmp_path / "blank.mp4").shape == (8, 32, 32, 3)


def test_incomplete_set_is_rewritten_complete_set_is_not(demo, tmp_path):
    shards, _ = demo
    out = tmp_path / "set"
    first = write_demo_shards(out, **SMALL)
    stamps = [p.stat().st_mtime_ns for p in first]
    assert write_demo_shards(out, **SMALL) == first
    assert [p.stat().st_mtime_ns for p in first] == stamps
    # a crash mid-write: no marker, a short shard
    (out / MARKER).unlink()
    first[1].write_bytes(first[1].read_bytes()[:1000])
    write_demo_shards(out, **SMALL)
    assert (out / MARKER).exists()
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in shards]


def _build_in_child(path: str, queue) -> None:
    from vgen.data.loader import build_loader
    cfg = SimpleNamespace(kind="videos", path=path, num_frames=8, height=32, width=32, frame_stride=1,
                          micro_batch=2, make_demo=True, demo_clips=96, demo_clips_per_shard=8)
    build_loader(cfg, dp_rank=0, dp_size=1, seed=0, prefetch=0)
    queue.put({p.name: p.stat().st_mtime_ns for p in Path(path).iterdir() if not p.name.startswith(".")})


def test_concurrent_make_demo_builds_one_set(tmp_path):
    ctx = multiprocessing.get_context("fork")  # the children only write files: no torch threads involved
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(str(tmp_path / "demo"), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    seen = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # Both saw the same files, untouched after the first writer finished: the set was written once.
    assert seen[0] == seen[1]
    names = sorted(seen[0])
    assert names == [MARKER] + [f"demo-{i:06d}.tar" for i in range(12)]
    marker = json.loads((tmp_path / "demo" / MARKER).read_text())
    assert marker["shards"] == names[1:]
    samples = _samples(sorted((tmp_path / "demo").glob("demo-*.tar")))
    assert sorted(samples) == [f"{i:06d}" for i in range(96)]
    assert all(set(parts) == {"mp4", "txt", "json"} for parts in samples.values())


def test_demo_refuses_to_write_into_a_prepared_folder(tmp_path):
    """With the default experiment, data.path=MY_SHARDS must not get the demo clips mixed in."""
    from vgen.data.shards import DataError

    (tmp_path / "index.jsonl").write_text("{}\n")
    (tmp_path / "shard-000000.tar").write_bytes(b"")
    with pytest.raises(DataError, match="data.make_demo=false"):
        write_demo_shards(tmp_path, num_clips=4, clips_per_shard=2, num_frames=2, height=8, width=8)
    assert sorted(p.name for p in tmp_path.glob("*[!k]")) == ["index.jsonl", "shard-000000.tar"]  # nothing written but the lock


def test_shape_classifier_reads_area_not_a_stray_pixel_or_a_halo():
    for i, shape in enumerate(SHAPES * 4):
        frames, meta = render_clip("green", shape, DIRECTIONS[i % 4], 8, 16, 16, random.Random(i))
        assert demo_eval.classify_clip(frames)["shape"] == shape
        # one stray pixel beside the shape in every frame widens its bounding box: the classifier before
        # read such a square as a circle; the area does not change with it
        stray = frames.copy()
        for t in range(8):
            ys, xs = np.nonzero(frames[t].max(-1) > 100)
            y, x = min(ys.max() + 2, 15), min(xs.max() + 2, 15)
            stray[t, y, x] = COLOURS["green"]
        assert demo_eval.classify_clip(stray)["shape"] == shape
        # a soft halo (a third of the colour) around the shape is background, not shape
        halo = frames.astype(np.float64)
        lit = frames.max(-1) > 100
        ring = np.zeros_like(lit)
        ring[:, 1:] |= lit[:, :-1]
        ring[:, :-1] |= lit[:, 1:]
        ring[:, :, 1:] |= lit[:, :, :-1]
        ring[:, :, :-1] |= lit[:, :, 1:]
        halo[ring & ~lit] = np.array(COLOURS["green"]) / 3
        assert demo_eval.classify_clip(halo.astype(np.uint8))["shape"] == shape
    # a clip that shows the other shape is scored as that shape
    square, _ = render_clip("red", "square", "left", 8, 16, 16, random.Random(0))
    circle, _ = render_clip("red", "circle", "left", 8, 16, 16, random.Random(0))
    assert demo_eval.classify_clip(square)["shape"] == "square" and demo_eval.classify_clip(circle)["shape"] == "circle"
