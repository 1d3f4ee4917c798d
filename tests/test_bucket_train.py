"""Training on a set of mixed shapes with three buckets (two video shapes and images), end to end with the real
launchers: exact resume (one process), dp=2 under deepspeed, and one SP group of 2 ranks under torchrun."""

import json

import pytest

from bucket_data import BUCKETS, write_bucket_set
from e2e_utils import check, launch, losses

pytestmark = pytest.mark.slow

COMMON = [f"data.buckets={BUCKETS}", "data.frame_stride=2", "data.make_demo=false", "data.record_keys=true"]


@pytest.fixture(scope="module")
def bucket_set(tmp_path_factory):
    path = tmp_path_factory.mktemp("bucket_set")
    write_bucket_set(path)
    return path


def step_rows(run_dir, rank: int) -> dict[int, list[dict]]:
    """Per step, the micro-batches rank `rank` trained on (the last record of a step wins after a resume)."""
    rows = {}
    for line in (run_dir / "data_keys" / f"rank{rank}.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {})[row["micro"]] = row
    return {step: [micros[m] for m in sorted(micros)] for step, micros in rows.items()}


def test_bucketed_run_resumes_with_bitwise_losses(bucket_set, tmp_path):
    args = COMMON + [f"data.path={bucket_set}", "train.max_steps=6", "checkpoint.every_steps=3"]
    full, part = tmp_path / "full", tmp_path / "part"
    check(launch("python", args + [f"run.dir={full}"]))
    check(launch("python", args + [f"run.dir={part}", "train.stop_after_step=3"]))
    proc = launch("python", args + [f"run.dir={part}"])
    check(proc)
    assert "resumed from" in proc.stdout
    a, b = losses(full), losses(part)
    assert sorted(a) == sorted(b) == list(range(1, 7)) and all(a[s] == b[s] for s in range(1, 7))
    rows = step_rows(full, 0)
    assert {rows[s][0]["bucket"] for s in rows} == {"4x12x16", "4x16x8", "1x8x8"}  # all three trained
    assert step_rows(part, 0) == rows
    hist = json.loads((full / "bucket_histogram.json").read_text())
    assert hist["per_epoch"] == {"4x12x16": 7, "4x16x8": 3, "1x8x8": 9, "none": 0}
    assert "buckets per epoch {'4x12x16': 7, '4x16x8': 3, '1x8x8': 9, 'none': 0}" in proc.stdout


def test_bucketed_run_under_deepspeed_dp2(bucket_set, tmp_path):
    run = tmp_path / "dp2"
    check(launch("deepspeed", COMMON + [f"data.path={bucket_set}", f"run.dir={run}", "train.max_steps=6"]))
    r0, r1 = step_rows(run, 0), step_rows(run, 1)
    assert sorted(r0) == sorted(r1) == list(range(1, 7))
    for step in r0:
        (a,), (b,) = r0[step], r1[step]
        assert a["bucket"] == b["bucket"]  # one bucket per step on every rank
        assert not set(a["sample_id"]) & set(b["sample_id"])  # each rank its own slots
    assert {r0[s][0]["bucket"] for s in r0} == {"4x12x16", "4x16x8", "1x8x8"}
    assert len(losses(run)) == 6


def test_one_sp_group_sees_the_same_samples(bucket_set, tmp_path):
    run = tmp_path / "sp2"
    check(launch("torchrun", COMMON + [f"data.path={bucket_set}", f"run.dir={run}", "train.max_steps=6",
                                        "parallel.sp.degree=2"]))
    r0, r1 = step_rows(run, 0), step_rows(run, 1)
    assert sorted(r0) == list(range(1, 7)) and r0 == r1
    # the image bucket (1 frame, 2x2 latent tokens) trained under SP too
    assert "1x8x8" in {r0[s][0]["bucket"] for s in r0}
    assert len(losses(run)) == 6
