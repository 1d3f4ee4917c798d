"""The sampler: `launch/sample.py` on one process (files, manifest, options, clear errors) and under the
real launchers with sequence parallelism, where the float videos must equal the one-process ones.

The run is a 2-step tiny training run. Two steps leave the adaLN-Zero gates and the final layer ~0, so
the velocity is ~0 and no option (nor a broken attention) could change a video; the option and parity
tests therefore sample a copy of the run whose exported weights are random (same keys and shapes).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from e2e_utils import ROOT, check, env, launch, launcher_cmd, run_group

pytestmark = pytest.mark.slow

TOL = 1e-5
PROMPTS = ["a red circle moving left", "a blue square moving up"]
FAST = ["sample.steps=3", "sample.guidance=3.0"]


def sample_cli(args: list[str], kind: str = "python", nproc: int = 1, timeout: int = 300):
    """Run launch/sample.py under `kind` ("python", "torchrun", "deepspeed"); returns CompletedProcess."""
    return run_group(launcher_cmd(kind, str(ROOT / "launch" / "sample.py"), nproc) + args, env(), timeout)


def raw_videos(out_dir) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    return [load_file(str(p))["video"] for p in sorted(out_dir.glob("*.safetensors"))]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from vgen.data.demo import write_demo_shards

    shards, run = tmp_path_factory.mktemp("shards"), tmp_path_factory.mktemp("run")
    write_demo_shards(shards, num_clips=8, clips_per_shard=8, num_frames=4, height=16, width=16)
    check(launch("python", [f"data.path={shards}", "train.max_steps=2", "checkpoint.every_steps=0", f"run.dir={run}"], timeout=600))
    return run


@pytest.fixture(scope="module")
def random_run(run, tmp_path_factory):
    """The run's config with random exported weights (norm scales near 1, as in tests/sp_utils.py)."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("random_run")
    shutil.copy(run / "config.yaml", out / "config.yaml")
    g = torch.Generator().manual_seed(0)
    weights = {
        k: (1.0 + 0.3 * torch.randn(v.shape, generator=g)) if k.endswith("norm.weight") else 0.1 * torch.randn(v.shape, generator=g)
        for k, v in load_file(str(run / "export" / "model.safetensors")).items()
    }
    (out / "export").mkdir()
    for name in ("model.safetensors", "ema.safetensors"):
        save_file(weights, str(out / "export" / name))
    return out


@pytest.fixture(scope="module")
def reference(random_run, tmp_path_factory):
    """One process: `python launch/sample.py` with two prompts, mp4s plus raw float videos."""
    out = tmp_path_factory.mktemp("one")
    proc = sample_cli([f"run.dir={random_run}", f"prompts={json.dumps(PROMPTS)}", f"sample.out_dir={out}",
                       "sample.save_raw=true", *FAST])
    check(proc)
    return out, proc


def test_one_process_writes_mp4s_and_manifest(reference):
    from vgen.data.video import read_video_file, to_uint8_frames

    out, proc = reference
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert rows == [{"prompt": p, "path": f"{i:03d}.mp4"} for i, p in enumerate(PROMPTS)]
    assert sorted(p.name for p in out.glob("*.mp4")) == ["000.mp4", "001.mp4"]
    raws = raw_videos(out)
    assert [tuple(r.shape) for r in raws] == [(3, 4, 16, 16)] * 2  # data.num_frames=4, 16 x 16
    assert rel_err(raws[0], raws[1]) > 0.1  # different prompts and noise: different videos
    for row, raw in zip(rows, raws):
        frames = read_video_file(out / row["path"])  # (T, H, W, 3) uint8
        assert frames.shape == (4, 16, 16, 3)
        # the mp4 holds the raw video up to 8-bit rounding and near-lossless compression
        diff = (frames.int() - to_uint8_frames(raw).int()).abs().float().mean()
        assert diff < 2.0, f"{row['path']}: mean |mp4 - raw| = {diff:.2f} levels"
    assert "samples written to" in proc.stdout


def test_trained_export_loads_and_samples(run, tmp_path):
    """The real export of a training run (EMA and raw weights) loads strictly and samples."""
    from vgen.sample import generate_to_dir, load_run_for_sampling

    for ema in ("true", "false"):
        cfg, model, te, ae = load_run_for_sampling(run, [f"sample.ema={ema}", "sample.steps=2"])
        generate_to_dir(model, te, ae, cfg, tmp_path / ema, prompts=PROMPTS[:1])
        assert (tmp_path / ema / "000.mp4").stat().st_size > 0


def _sample_in_process(run_dir, out_dir, overrides: list[str]) -> torch.Tensor:
    """What launch/sample.py does on one process, minus the process start-up: same override parsing."""
    from vgen.sample import generate_to_dir, load_run_for_sampling

    cfg, model, te, ae = load_run_for_sampling(run_dir, [*FAST, "sample.save_raw=true", *overrides])
    generate_to_dir(model, te, ae, cfg, out_dir, prompts=PROMPTS[:1])
    return raw_videos(out_dir)[0]


def test_options_change_the_output_and_seed_reproduces(random_run, tmp_path):
    base = _sample_in_process(random_run, tmp_path / "base", [])
    again = _sample_in_process(random_run, tmp_path / "again", ["sample.seed=0"])
    assert torch.equal(base, again), "the same seed must reproduce the video exactly"
    for option in ("sample.seed=1", "sample.steps=4", "sample.guidance=1.0", "sample.negative_prompt=a blue square"):
        other = _sample_in_process(random_run, tmp_path / option.split("=")[0], [option])
        assert rel_err(other, base) > 1e-3, f"{option} did not change the video"


@pytest.mark.parametrize(
    "args, message",
    [
        (["run.dir={tmp}/missing"], "run.dir="),
        (["run.dir={tmp}/no_export"], "run.dir="),
        ([], "run.dir=PATH is required"),
        (["run.dir={random_run}", "sample.stepz=3"], "sample.stepz"),
    ],
    ids=["missing-run-dir", "missing-export", "no-run-dir", "typo"],
)
def test_bad_input_exits_2_naming_the_setting(args, message, tmp_path, run, random_run):
    (tmp_path / "no_export").mkdir()
    shutil.copy(run / "config.yaml", tmp_path / "no_export" / "config.yaml")
    proc = sample_cli([a.format(tmp=tmp_path, random_run=random_run) for a in args])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("kind, mode", [("deepspeed", "ring"), ("torchrun", "switch")])
def test_sequence_parallel_sampling_matches_one_process(kind, mode, random_run, reference, tmp_path):
    """2 processes, sp = 2 (the default degree under a launcher): the same float videos as one process."""
    one, _ = reference
    out = tmp_path / "sp"
    proc = sample_cli([f"run.dir={random_run}", f"prompts={json.dumps(PROMPTS)}", f"sample.out_dir={out}",
                       "sample.save_raw=true", f"parallel.sp.mode={mode}", *FAST], kind=kind, nproc=2)
    check(proc)
    assert f"sequence parallel: mode={mode} degree=2" in proc.stdout  # really ran split, not replicated
    assert (out / "manifest.jsonl").read_text() == (one / "manifest.jsonl").read_text()
    got, ref = raw_videos(out), raw_videos(one)
    assert len(got) == len(ref) == len(PROMPTS)
    errs = [rel_err(a, b) for a, b in zip(got, ref)]
    print(f"sampler {kind} sp=2 {mode}: max rel err {max(errs):.2e}")
    assert max(errs) <= TOL, errs



def test_contact_sheet_shows_every_prompt_and_frame(reference):
    """contact_sheet.png: a row per prompt, its frames across, each frame the video's frame scaled up."""
    import numpy as np
    from PIL import Image

    from vgen.data.video import to_uint8_frames

    out, proc = reference
    sheet = np.asarray(Image.open(out / "contact_sheet.png").convert("RGB"))
    cell = 16 * 4 + 2  # 16-pixel frames scaled x4 to 64, then a 2-pixel gap
    assert sheet.shape == (len(PROMPTS) * cell + 2, 4 * cell + 2, 3)
    assert sheet.std() > 10, "blank sheet"
    for r, raw in enumerate(raw_videos(out)):
        frames = to_uint8_frames(raw).numpy()  # (T, H, W, 3)
        for c, frame in enumerate(frames):
            y, x = 2 + r * cell, 2 + c * cell
            assert np.array_equal(sheet[y:y + 64:4, x:x + 64:4], frame), (r, c)


@pytest.fixture(scope="module")
def i2v_run(random_run, tmp_path_factory):
    """random_run's weights plus a random image-to-video input, its config with model.i2v=true."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("i2v_run")
    (out / "config.yaml").write_text((random_run / "config.yaml").read_text().replace("  i2v: false", "  i2v: true", 1))
    weights = load_file(str(random_run / "export" / "model.safetensors"))
    hidden = weights["patch_embed.weight"].shape[0]
    g = torch.Generator().manual_seed(1)  # a mask input that matters (training leaves it ~0 after 2 steps)
    weights["cond_embed.weight"], weights["cond_embed.bias"] = torch.randn(hidden, 4, generator=g), torch.zeros(hidden)
    (out / "export").mkdir()
    for name in ("model.safetensors", "ema.safetensors"):
        save_file(weights, str(out / "export" / name))
    return out


def test_image_to_video_from_png_and_from_video(i2v_run, random_run, tmp_path):
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file, save_file

    from vgen.data.video import read_video_file, write_mp4

    image = np.zeros((16, 16, 3), dtype=np.uint8)
    image[4:9, 6:11] = (230, 25, 25)
    Image.fromarray(image).save(tmp_path / "first.png")
    clip = torch.from_numpy(image).permute(2, 0, 1)[:, None].float().div(127.5).sub(1).repeat(1, 3, 1, 1)
    write_mp4(tmp_path / "first.mp4", clip, fps=8)
    for source in ("first.png", "first.mp4"):
        out = tmp_path / source.replace(".", "_")
        check(sample_cli([f"run.dir={i2v_run}", f"prompts={json.dumps(PROMPTS)}", f"sample.out_dir={out}",
                          f"sample.image={tmp_path / source}", *FAST]))
        for i in range(len(PROMPTS)):
            first = read_video_file(out / f"{i:03d}.mp4")[0].int()
            assert (first - torch.from_numpy(image).int()).abs().float().mean() < 2.0, source
        assert (out / "contact_sheet.png").is_file()
    t2v_run = tmp_path / "t2v_run"  # the same run as a text-to-video model: no mask input
    shutil.copytree(i2v_run, t2v_run)
    (t2v_run / "config.yaml").write_text((i2v_run / "config.yaml").read_text().replace("  i2v: true", "  i2v: false", 1))
    for name in ("model.safetensors", "ema.safetensors"):
        weights = load_file(str(t2v_run / "export" / name))
        save_file({k: v for k, v in weights.items() if not k.startswith("cond_embed.")}, str(t2v_run / "export" / name))
    proc = sample_cli([f"run.dir={t2v_run}", f"sample.image={tmp_path / 'first.png'}", f"sample.out_dir={tmp_path / 'x'}"])
    assert proc.returncode == 2 and "model.i2v" in proc.stderr and "Traceback" not in proc.stderr
    proc = sample_cli([f"run.dir={i2v_run}", f"sample.image={tmp_path / 'missing.png'}", f"sample.out_dir={tmp_path / 'y'}"])
    assert proc.returncode == 2 and "sample.image" in proc.stderr and "Traceback" not in proc.stderr
