"""Config composition, schema validation and the generated DeepSpeed config."""

import pytest

from vgen.config import ConfigError, load_config
from vgen.train.ds_config import build_ds_config


def test_demo_is_the_default_experiment():
    cfg = load_config([])
    assert cfg.experiment == "demo" and cfg.model.preset == "tiny" and cfg.data.make_demo


def test_fixed_user_facing_overrides_exist():
    cfg = load_config(["run.dir=/tmp/x", "train.max_steps=7", "checkpoint.every_steps=3", "checkpoint.keep=4",
                       "log.every_steps=2", "parallel.zero_stage=3", "model.preset=2b", "sample.every_steps=5"])
    assert (cfg.run.dir, cfg.train.max_steps, cfg.checkpoint.every_steps, cfg.checkpoint.keep) == ("/tmp/x", 7, 3, 4)
    assert (cfg.log.every_steps, cfg.parallel.zero_stage, cfg.model.preset, cfg.sample.every_steps) == (2, 3, "2b", 5)


@pytest.mark.parametrize(
    "override, named",
    [("model.preset=nope", "model.preset"), ("train.max_stepz=3", "max_stepz"), ("parallel.zero_stage=4", "parallel.zero_stage"),
     ("train.max_steps=abc", "max_steps"), ("experiment=nope", "experiment"), ("log.wandb=cloud", "log.wandb"),
     ("parallel.memory.offload_host_fraction=0", "parallel.memory.offload_host_fraction")],
)
def test_bad_settings_are_named(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(override.split())


def test_ds_config_follows_the_config():
    cfg = load_config(["parallel.zero_stage=3", "train.grad_accum=2", "data.micro_batch=3", "train.optim.grad_clip=0.5"])
    ds = build_ds_config(cfg, world_size=4, on_gpu=False)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["train_batch_size"] == 3 * 2 * 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5 and not ds["bf16"]["enabled"] and ds["optimizer"]["params"]["torch_adam"]
    assert build_ds_config(cfg, 4, on_gpu=True)["bf16"]["enabled"]
    assert ds["scheduler"]["params"]["total_num_steps"] == cfg.train.max_steps


@pytest.mark.parametrize("warmup", [0, 1, 10])
def test_first_step_has_a_learning_rate(warmup):
    """DeepSpeed's warmup ramp would give step 1 an lr of 0 (a wasted step); it must ramp from lr/warmup."""
    import torch
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    from vgen.train.ds_config import start_lr_schedule

    cfg = load_config([f"train.optim.warmup_steps={warmup}", "train.max_steps=50", "train.optim.lr=1e-3"])
    params = build_ds_config(cfg, world_size=1, on_gpu=False)["scheduler"]["params"]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    sched = WarmupCosineLR(opt, **params)
    start_lr_schedule(sched)  # as the trainer does after deepspeed.initialize
    lrs = []
    for _ in range(max(warmup, 1) + 1):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs[0] == pytest.approx(1e-3 / max(warmup, 1))
    assert lrs[max(warmup, 1) - 1] == pytest.approx(1e-3, rel=0.2) and all(b >= a for a, b in zip(lrs, lrs[1:warmup]))
