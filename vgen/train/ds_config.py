"""The DeepSpeed config, generated from the vgen config (users never write a ds_config by hand)."""

from __future__ import annotations


def build_ds_config(cfg, world_size: int, on_gpu: bool, num_params: int | None = None,
                    load_universal: bool = False) -> dict:
    """ZeRO stage, precision, clipping, accumulation, AdamW and warmup + cosine LR from `cfg`.

    Args:
        world_size: every rank; ZeRO shards and averages over all of them (sequence-parallel ranks
            included: their gradients are partial sums, see vgen/parallel/sequence.py).
        on_gpu: bf16 on GPU, fp32 on CPU.
        num_params: the model's parameter count; caps ZeRO's communication buckets.
        load_universal: the resume loads a universal checkpoint (another world size, vgen/train/elastic.py).
    """
    # DeepSpeed's default buckets hold 5e8 elements (2 GB in fp32) and ZeRO-2 allocates one every step:
    # for a model smaller than that, a bucket the size of the model does the same work without the cost
    bucket = int(min(5e8, max(num_params or 5e8, 1e6)))
    opt = cfg.train.optim
    micro, accum = cfg.data.micro_batch, cfg.train.grad_accum
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": opt.grad_clip,
        "zero_optimization": {
            "stage": cfg.parallel.zero_stage,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
        },
        "bf16": {"enabled": bool(on_gpu)},
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW on CPU (DeepSpeed reads the flag inside "params"): its fused Adam is a CUDA kernel
            "params": {"lr": opt.lr, "betas": list(opt.betas), "eps": 1e-8, "weight_decay": opt.weight_decay,
                       "torch_adam": not on_gpu},
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": max(cfg.train.max_steps, opt.warmup_steps + 1),
                "warmup_num_steps": max(opt.warmup_steps, 1),  # DeepSpeed refuses 0
                # the ramp is min + (1 - min) * i / warmup for schedule step i = 0, 1, ...: starting at
                # 1/warmup (see start_lr_schedule), so no warmup means the full lr from the first step
                "warmup_min_ratio": 1.0 / max(opt.warmup_steps, 1),
                "cos_min_ratio": opt.min_lr_ratio,
                "warmup_type": "linear",
            },
        },
        "checkpoint": {"load_universal": bool(load_universal)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def start_lr_schedule(scheduler) -> None:
    """Put DeepSpeed's WarmupCosineLR on its step 0 before the first optimizer step.

    Built with last_batch_iteration=-1, it sets every lr to 0 and steps only after each optimizer step,
    so the first step of every run would not move the weights.
    """
    if scheduler is not None and getattr(scheduler, "last_batch_iteration", 0) < 0:
        scheduler.step(0)
