"""Training on latent shards written by launch/encode.py: it starts, and a resumed run repeats the losses
of an uninterrupted one."""

import subprocess

import pytest

from e2e_utils import PY, ROOT, TINY, check, env, launch, losses

pytestmark = pytest.mark.slow


def test_train_on_latent_shards_starts_and_resumes(tmp_path):
    from vgen.data.demo import write_demo_shards

    videos, latents = tmp_path / "videos", tmp_path / "latents"
    write_demo_shards(videos, num_clips=8, clips_per_shard=4, num_frames=4, height=16, width=16)
    sizes = [a for a in TINY if a.startswith(("data.", "text."))]
    encode = [PY, str(ROOT / "launch" / "encode.py"), f"data.path={videos}", f"data.encode_out={latents}", *sizes]
    check(subprocess.run(encode, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300))
    common = ["data.kind=latents", f"data.path={latents}", "train.max_steps=4", "checkpoint.every_steps=2", "text.dropout=0.5"]
    full, part = tmp_path / "full", tmp_path / "part"
    check(launch("python", common + [f"run.dir={full}"]))
    check(launch("python", common + [f"run.dir={part}", "train.stop_after_step=2"]))
    proc = launch("python", common + [f"run.dir={part}"])
    check(proc)
    assert "resumed from" in proc.stdout
    a, b = losses(full), losses(part)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4] and all(a[s] == b[s] for s in (3, 4))
    # latents from another autoencoder are refused, naming it
    bad = launch("python", common + [f"run.dir={tmp_path / 'bad'}", "autoencoder.patch=[1,4,4]"])
    assert bad.returncode == 2 and "autoencoder" in bad.stderr
