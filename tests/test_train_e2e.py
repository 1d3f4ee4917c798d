"""End-to-end: the real launchers on 2 CPU ranks, resume parity for ZeRO 1/2/3, kill -9 mid-checkpoint,
bad input that must fail clearly without touching what a run directory already holds."""

import json

import pytest

from e2e_utils import check, launch, losses

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from vgen.data.demo import write_demo_shards

    out = tmp_path_factory.mktemp("shards")
    write_demo_shards(out, num_clips=32, clips_per_shard=8, num_frames=4, height=16, width=16)
    return out


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_resume_repeats_uninterrupted_losses(tmp_path, shards, stage):
    common = [f"data.path={shards}", f"parallel.zero_stage={stage}", "train.max_steps=6", "checkpoint.every_steps=3"]
    full, part = tmp_path / "full", tmp_path / "part"
    check(launch("deepspeed", common + [f"run.dir={full}"]))
    check(launch("deepspeed", common + [f"run.dir={part}", "train.stop_after_step=3"]))
    assert sorted(losses(part)) == [1, 2, 3]
    check(launch("deepspeed", common + [f"run.dir={part}"]))
    a, b = losses(full), losses(part)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert a[step] == b[step], (stage, step, a[step], b[step])  # bitwise on CPU
    assert (part / "export" / "ema.safetensors").is_file() and (part / "export" / "model.safetensors").is_file()
    # checkpoint.keep=2 (default): the step-3 and step-6 checkpoints remain
    assert sorted(p.name for p in (part / "checkpoints").glob("step*")) == ["step00000003", "step00000006"]


def test_kill_during_checkpoint_resumes_from_previous_complete(tmp_path, shards):
    """The fault campaign's representative (benchmarks/fault_campaign.py runs it all): SIGKILL rank 1 in the
    middle of the background write of an async save."""
    common = [f"data.path={shards}", "parallel.zero_stage=2", "train.max_steps=6", "checkpoint.every_steps=3"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    check(launch("deepspeed", common + [f"run.dir={full}"]))
    proc = launch("deepspeed", common + [f"run.dir={killed}", "checkpoint.async=true"],
                  extra_env={"VGEN_FAULT": "ckpt_write_mid:6:1"})
    assert proc.returncode != 0
    ckpt = killed / "checkpoints"
    assert (ckpt / "latest").read_text() == "step00000003"
    assert not (ckpt / "step00000006" / "meta.json").exists()  # the torn checkpoint
    proc = launch("deepspeed", common + [f"run.dir={killed}"])
    check(proc)
    assert "resumed from" in proc.stdout + proc.stderr and "step00000003" in proc.stdout + proc.stderr
    a, b = losses(full), losses(killed)
    assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]
    assert (ckpt / "latest").read_text() == "step00000006"


def test_torchrun_and_plain_python(tmp_path, shards):
    common = [f"data.path={shards}", "train.max_steps=2", "checkpoint.every_steps=0"]
    check(launch("torchrun", common + [f"run.dir={tmp_path / 'tr'}"]))
    # plain python also makes samples during training and writes offline wandb logs
    extras = ["sample.every_steps=2", "sample.steps=2", "sample.prompts=[a red circle moving left]", "log.wandb=offline"]
    check(launch("python", common + [f"run.dir={tmp_path / 'py'}"] + extras))
    assert (tmp_path / "py" / "samples" / "step00000002" / "000.mp4").is_file()
    assert list((tmp_path / "py" / "wandb").glob("offline-run-*"))
    for name in ("tr", "py"):
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]
        for key in ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s"):
            assert key in rows[0]
        assert (tmp_path / name / "config.yaml").is_file()
        assert (tmp_path / name / "checkpoints" / "latest").read_text() == "step00000002"


def test_incompatible_checkpoint_is_refused_and_kept(tmp_path, shards):
    run = tmp_path / "run"
    common = [f"data.path={shards}", "train.max_steps=2", f"run.dir={run}"]
    check(launch("python", common))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = launch("python", common + ["train.max_steps=4", "model.hidden=64"])
    assert proc.returncode == 2
    assert "incompatible model config" in proc.stderr and "model.hidden" in proc.stderr
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert before == after


@pytest.mark.parametrize(
    "override, message",
    [("model.preset=huge", "model.preset='huge' does not exist"), ("data.path=MISSING data.make_demo=false", "data.path="),
     ("parallel.zero_stage=5", "parallel.zero_stage"), ("train.max_stepz=3", "max_stepz")],
)
def test_bad_input_fails_with_named_setting(tmp_path, override, message):
    override = override.replace("MISSING", str(tmp_path / "missing"))
    proc = launch("python", [f"run.dir={tmp_path / 'r'}", *override.split()])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()


def test_memory_policy_auto_plans_and_trains_or_refuses(tmp_path, shards):
    common = [f"data.path={shards}", "train.max_steps=1", "checkpoint.every_steps=0", "parallel.memory.policy=auto"]
    proc = launch("python", common + [f"run.dir={tmp_path / 'ok'}", "parallel.memory.budget_gb=10"])
    check(proc)
    assert "memory plan:" in proc.stdout
    proc = launch("python", common + [f"run.dir={tmp_path / 'no'}", "parallel.memory.budget_gb=0.00001"])
    assert proc.returncode == 2 and "budget_gb" in proc.stderr
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("stage, chunks", [(2, 2), (3, 1)])
def test_nested_offload_trains_like_plain(tmp_path, shards, stage, chunks):
    """The longest-sequence policy through the real trainer on 2 DeepSpeed ranks: nested checkpointing +
    offload (+ MLP chunks under ZeRO-2; under ZeRO-3 the parameters are gathered again in every
    recomputation) gives the losses of no memory policy."""
    common = [f"data.path={shards}", f"parallel.zero_stage={stage}", "train.max_steps=3", "checkpoint.every_steps=0",
              "train.optim.lr=5e-2"]
    lean = ["parallel.memory.checkpointing=nested", "parallel.memory.offload=true", f"parallel.memory.mlp_chunks={chunks}",
            "parallel.memory.offload_min_bytes=0"]
    check(launch("deepspeed", common + [f"run.dir={tmp_path / 'plain'}"]))
    check(launch("deepspeed", common + lean + [f"run.dir={tmp_path / 'nested'}"]))
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "nested")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert len({a[1], a[2], a[3]}) == 3  # the weights moved
    for step in (1, 2, 3):
        assert abs(a[step] - b[step]) <= 1e-6 * abs(a[step]), (step, a[step], b[step])


def test_sigterm_during_shutdown_exits_cleanly(tmp_path, shards):
    """A preemption signal that lands after the last checkpoint (here: rank 1, just before the shutdown's
    barrier) is logged and the run still ends with status 0 on both ranks, its checkpoint complete."""
    run = tmp_path / "run"
    proc = launch("torchrun", [f"data.path={shards}", f"run.dir={run}", "train.max_steps=2", "checkpoint.every_steps=0"],
                  extra_env={"VGEN_FAULT_TERM": "shutdown_barrier:2:1"})
    check(proc)
    assert "rank 1: SIGTERM during shutdown" in proc.stdout + proc.stderr
    assert (run / "checkpoints" / "latest").read_text() == "step00000002"
    assert (run / "checkpoints" / "step00000002" / "meta.json").is_file()


def test_sigterm_is_ignored_for_the_interpreter_teardown(monkeypatch):
    """Python puts its SIGTERM handler back to the default during interpreter teardown, so a SIGTERM there
    killed a finished rank (status -15, the deepspeed launcher then exits 241): launch/train.py must leave
    the signal ignored once the run is saved and closed."""
    import signal
    import sys

    import launch.train
    import vgen.train.trainer

    monkeypatch.setattr(vgen.train.trainer, "run_training", lambda cfg: 2)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    before = signal.getsignal(signal.SIGTERM)
    try:
        launch.train.main()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)
