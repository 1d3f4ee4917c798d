"""The trainer: the one place that knows DeepSpeed.

Start-up order matters for "nothing already saved is lost": everything that can fail on bad input (config,
data path, model preset, checkpoint compatibility) is checked before the run directory is written to.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from vgen.config import to_yaml
from vgen.data.loader import build_loader, record_keys, write_bucket_histogram
from vgen.parallel.offload import reserve_offload_arena
from vgen.parallel.parallelize import parallelize
from vgen.train import setup
from vgen.train.checkpoint import CheckpointManager, export_safetensors, rng_state, set_rng_state
from vgen.train.ds_config import build_ds_config, start_lr_schedule
from vgen.train.durable import fault_point
from vgen.train.elastic import check_global_batch, needs_universal, prepare_universal, run_layout
from vgen.train.ema import ShardedEMA
from vgen.train.metrics import MetricsLogger, gpu_peak_flops, truncate_after
from vgen.train.tasks import build_task
from vgen.train.validation import build_validator


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.device, self.topo = setup.init_distributed(cfg)
        self.is_main = dist.get_rank() == 0
        self.run_dir = Path(cfg.run.dir)
        setup.set_determinism(cfg)
        self.task = build_task(cfg, self.device, None)  # the loader's auto micro-batches need its encoders
        self.loader = self.task.loader = build_loader(
            cfg.data, self.topo.dp_rank, self.topo.dp_size, cfg.run.seed, grad_accum=cfg.train.grad_accum,
            micro_batch_for=self._auto_micro_batch, log=self._log)
        if cfg.data.kind == "latents":
            from vgen.data.latents import check_compatible

            check_compatible(self.loader.meta, cfg)  # latents from another autoencoder/text setting
        model = self.task.build_model()
        background = cfg.checkpoint["async"] if cfg.checkpoint["async"] is not None else self.device.type == "cuda"
        self.ckpt = CheckpointManager(self.run_dir, cfg.checkpoint.keep, self.task.signature(model), background)
        self.layout = run_layout(cfg, self.topo, self.loader)
        self.resume_tag = self.ckpt.select_resume_tag(self._log)  # newest whose checksums pass
        universal = False
        if self.resume_tag:
            self.ckpt.check_compatible(self.resume_tag)
            saved = self.ckpt.read_meta(self.resume_tag)
            check_global_batch(saved, self.layout, cfg, self.resume_tag)
            universal = needs_universal(saved, self.layout)
        self._plan_memory(model)
        parallelize(model, cfg, self.topo)
        # pinned offload memory for the longest latent, before step 1 (a clear error if the host lacks it)
        if cfg.parallel.memory.offload:
            reserve_offload_arena(model, self.task.config_latent_shape(), cfg.data.micro_batch, self.topo.sp_size, self.device)
        if self.device.type == "cpu":
            setup.disable_deepspeed_shm_allreduce()
        num_params = sum(p.numel() for p in model.parameters())
        ds_config = build_ds_config(cfg, self.topo.world_size, self.device.type == "cuda", num_params, universal)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        self.ckpt.use_snapshot_engine(self.engine)
        start_lr_schedule(self.engine.lr_scheduler)  # a resume then loads the saved schedule over it
        self.ema = ShardedEMA(self.engine.module, cfg.train.ema_decay)
        self.step = self._resume(universal) if self.resume_tag else 0
        self._write_run_files()
        self.metrics = MetricsLogger(self.run_dir, cfg, self.is_main, cfg.train.max_steps, self.step)
        self.validator = build_validator(cfg, self.task, self.device)  # held-out loss (vgen/train/validation.py)
        self.stop_requested = False
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _plan_memory(self, model) -> None:
        """parallel.memory.policy=auto: the planner picks checkpointing/offload/chunking for the budget."""
        mem = self.cfg.parallel.memory
        if mem.policy != "auto" and mem.checkpointing != "auto":
            return
        from vgen.parallel.planner import plan_on_rank0

        plan = plan_on_rank0(self.cfg, self.task.config_latent_shape(), self.cfg.text.max_length,
                              self.topo.world_size, text_dim=model.cfg.text_dim, log=self._log)
        mem.merge_with(plan.settings())
        self._log(f"memory plan: {plan.settings()}")

    def _auto_micro_batch(self, bucket, latent_shape) -> int:
        """data.buckets micro_batch=auto: the simulator's largest micro-batch within parallel.memory.budget_gb."""
        from vgen.data.buckets import BucketError, auto_micro_batch

        if not hasattr(self.task, "autoencoder"):
            raise BucketError(f"data.buckets {bucket.name}: micro_batch=auto is for train.task=diffusion")
        shape = latent_shape or self.task.autoencoder.latent_shape(bucket.frames, bucket.height, bucket.width)
        return auto_micro_batch(self.cfg, bucket, shape, self.topo.world_size, text_dim=self.task.text_encoder.dim,
                                log=self._log)

    # ---- resume and run files -------------------------------------------------------------------------
    def _resume(self, universal: bool) -> int:
        tag = self.resume_tag
        load_dir, load_tag = str(self.ckpt.dir), tag
        if universal:  # saved by another world size or ZeRO stage (vgen/train/elastic.py)
            load_dir, load_tag = prepare_universal(self.ckpt.dir / tag, self.cfg.train.collective_timeout_s, self._log)
        self.engine.load_checkpoint(load_dir, tag=load_tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        saved_world = self.ckpt.read_meta(tag).get("world_size")
        state = self.ckpt.load_rank_state(tag) if saved_world == self.topo.world_size else None
        if state is not None:
            self.loader.load_state_dict(state["data"])
            set_rng_state(state["rng"])
        if state is None or not self.ema.load_state_dict(state["ema"]):
            old = [self.ckpt.load_rank_state(tag, r) for r in range(saved_world)]
            if state is None:  # the sample order is global: rank 0's position is every rank's
                self.loader.load_state_dict(old[0]["data"])
                set_rng_state(old[self.topo.rank % saved_world]["rng"])
            self.ema.load_resharded([s["ema"] for s in old])
            self._log(f"checkpoint {tag} came from world size {saved_world}: EMA re-sharded to {self.topo.world_size}")
        step = int(self.engine.global_steps)
        self._log(f"resumed from {self.ckpt.dir / tag} at step {step}")
        return step

    def _write_run_files(self) -> None:
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
            truncate_after(self.run_dir / "metrics.jsonl", self.step)
            write_bucket_histogram(self.run_dir, self.loader)
        dist.barrier()

    def _log(self, msg: str) -> None:
        if self.is_main:
            print(f"[vgen] {msg}", flush=True)

    def _on_sigterm(self, *_):
        self.stop_requested = True  # checkpoint at the next step boundary, then exit (preemption)

    # ---- one step ---------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        step = self.step + 1
        start = time.perf_counter()
        loss_sum, tokens, self._samples = torch.zeros(2, dtype=torch.float64, device=self.device), 0, 0
        for micro in range(self.cfg.train.grad_accum):
            fault_point("data", step)
            batch = next(self.loader)
            if self.cfg.data.record_keys:
                record_keys(self.run_dir, dist.get_rank(), step, micro, batch)
            loss, tokens = self.task.loss(self.engine, batch, step, self.topo.dp_rank, micro)
            # SP ranks each hold partial-sum gradients and ZeRO averages over all ranks: scale back up
            self.engine.backward(loss * self.topo.sp_size)
            fault_point("step", step)
            self.engine.step()
            loss_sum[0] += loss.detach().double() * len(batch["caption"])
            self._samples += len(batch["caption"])
        self.ema.update()
        self.step = step
        # the logged loss is the mean over the global batch's samples, whatever their split over ranks and
        # micro-steps (so runs with another dp size compare); SP ranks count their group's samples once each,
        # which cancels in the ratio
        loss_sum[1] = self._samples
        dist.all_reduce(loss_sum)
        return self._record(step, (loss_sum[0] / loss_sum[1]).item(), time.perf_counter() - start, tokens)


    def _record(self, step: int, loss: float, seconds: float, tokens: int) -> dict:
        samples = self._samples * self.topo.dp_size  # every rank of a step holds the same bucket and count
        norm = self.engine.get_global_grad_norm()
        rec = {
            "step": step,
            "loss": loss,
            "lr": float(self.engine.get_lr()[0]),
            "grad_norm": float(norm) if norm is not None else float("nan"),
            "samples_per_s": samples / seconds,
            "tokens_per_s": samples * tokens / seconds,
            "skipped_samples": self.loader.stats()["skipped"],
        }
        offloader = getattr(self.engine.module, "memory_offloader", None)
        if offloader is not None:  # bytes each way; on GPU also how long compute waited for copies
            rec.update(offloader.step_metrics())
        if self.device.type == "cuda":
            rec["mem_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
            peak = gpu_peak_flops()
            if peak:
                flops = self.task.flops_per_sample(self.engine.module)
                rec["mfu"] = flops * samples / seconds / (peak * self.topo.world_size)
        return rec

    # ---- the loop -------------------------------------------------------------------------------------
    def train(self) -> None:
        cfg = self.cfg
        stop_at = min(cfg.train.max_steps, cfg.train.stop_after_step or cfg.train.max_steps)
        if self.step >= cfg.train.max_steps:
            self._log(f"run already at step {self.step} >= train.max_steps={cfg.train.max_steps}; nothing to do")
        while self.step < stop_at:
            rec = self.train_step()
            val_due = self.validator is not None and (self._due(cfg.log.val_every_steps) or self.step == cfg.train.max_steps)
            if val_due:
                rec.update(self.validator(self.engine.module))
            if self.step % cfg.log.every_steps == 0 or self.step == stop_at or val_due:
                self.metrics.log(rec)
            preempted, saving = self._agree(self.stop_requested, self.ckpt.busy())
            if self.ckpt.pending and not saving:  # an async save finished on every rank: mark it complete
                self._log(f"checkpoint {self.ckpt.finish()} complete")
            if self._due(cfg.checkpoint.every_steps) or self.step == stop_at or preempted:
                self.save()
            if cfg.sample.every_steps and self.step % cfg.sample.every_steps == 0:
                self.sample_during_training()
            if preempted:
                self._log(f"stopping at step {self.step} on SIGTERM; re-run the same command to resume")
                break
        # the last checkpoint is taken (an async one may still be writing): a SIGTERM from here on has
        # nothing to save and must not kill a rank while its peer waits in the shutdown's collectives
        signal.signal(signal.SIGTERM, sigterm_in_shutdown)
        self.ckpt.close()  # waits for an async save in flight and marks it complete
        self.metrics.close()

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def _agree(self, *flags: bool) -> list[bool]:
        """Each flag, true if true on any rank (one small all-reduce for all of them)."""
        t = torch.tensor([1.0 if f else 0.0 for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def save(self) -> None:
        state = {
            "world_size": self.topo.world_size,
            "data": self.loader.state_dict(),
            "rng": rng_state(),
            "ema": self.ema.state_dict(),
        }
        tag = self.ckpt.save(self.engine, self.step, state, self.layout, self._export_job())
        self._log(f"saved checkpoint {tag}" if not self.ckpt.writer.background else f"saving checkpoint {tag}")

    def _export_job(self):
        """Inference weights as safetensors: RUN/export/model.safetensors (raw) and ema.safetensors.

        Gathers now (a collective); returns the write for the checkpoint writer (rank 0; None elsewhere).
        """
        raw, ema, step = self._gather_raw(), self.ema.gather_full(), self.step
        if not self.is_main:
            return None

        def write() -> list:
            fault_point("export", step)
            meta = {"step": str(step), "signature": str(self.ckpt.signature)}
            export_safetensors(self.run_dir / "export" / "model.safetensors", self.task.export_weights(raw), meta)
            export_safetensors(self.run_dir / "export" / "ema.safetensors", self.task.export_weights(ema), meta)
            return []
        return write

    def _gather_raw(self) -> dict:
        module = self.engine.module
        params = list(module.parameters())
        # under ZeRO-3 parameters are partitioned; gather them for the copy (no-op otherwise)
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}

    def sample_during_training(self) -> None:
        out = self.run_dir / "samples" / f"step{self.step:08d}"
        fault_point("sample", self.step)
        self.task.sample(self.engine.module, out, write=self.is_main)
        self.engine.module.train()
        self._log(f"samples written to {out}")


def sigterm_in_shutdown(*_) -> None:
    """SIGTERM after the last checkpoint: say so and finish the shutdown normally (exit status 0)."""
    rank = os.environ.get("RANK", "0")
    os.write(2, f"[vgen] rank {rank}: SIGTERM during shutdown, after the last checkpoint; nothing to save, "
                f"finishing the shutdown\n".encode())  # os.write: a print here could re-enter a print in progress


def run_training(cfg) -> int:
    """Train `cfg` and shut down; returns the step the run stopped at."""
    trainer = Trainer(cfg)
    trainer.train()
    step = trainer.step
    # leave together and tear the process group down explicitly: a rank still holding gloo threads at
    # interpreter exit can abort ("terminate called without an active exception") after a good run
    fault_point("shutdown_barrier", step)
    dist.barrier()
    fault_point("shutdown_loader", step)
    trainer.loader.close(workers=True)
    fault_point("shutdown_destroy", step)
    dist.destroy_process_group()
    return step
