"""The trainer: the one place that knows DeepSpeed.

Start-up order matters for "nothing already saved is lost": everything that can fail on bad input (config,
data path, model preset, checkpoint compatibility) is checked before the run directory is written to.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from vgen.config import to_yaml
from vgen.data.loader import build_loader
from vgen.parallel.parallelize import parallelize
from vgen.train import setup
from vgen.train.checkpoint import CheckpointManager, export_safetensors, rng_state, set_rng_state
from vgen.train.ds_config import build_ds_config, start_lr_schedule
from vgen.train.ema import ShardedEMA
from vgen.train.metrics import MetricsLogger, gpu_peak_flops, truncate_after
from vgen.train.tasks import build_task


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        self.device, self.topo = setup.init_distributed(cfg)
        self.is_main = dist.get_rank() == 0
        self.run_dir = Path(cfg.run.dir)
        setup.set_determinism(cfg)
        self.loader = build_loader(cfg.data, self.topo.dp_rank, self.topo.dp_size, cfg.run.seed)
        if cfg.data.kind == "latents":
            from vgen.data.latents import check_compatible

            check_compatible(self.loader.meta, cfg)  # latents from another autoencoder/text setting
        self.task = build_task(cfg, self.device, self.loader)
        model = self.task.build_model()
        self.ckpt = CheckpointManager(self.run_dir, cfg.checkpoint.keep, self.task.signature(model))
        self.resume_tag = self.ckpt.latest_complete()
        if self.resume_tag:
            self.ckpt.check_compatible(self.resume_tag)
        self._plan_memory(model)
        parallelize(model, cfg, self.topo)
        if self.device.type == "cpu":
            setup.disable_deepspeed_shm_allreduce()
        num_params = sum(p.numel() for p in model.parameters())
        ds_config = build_ds_config(cfg, self.topo.world_size, self.device.type == "cuda", num_params)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        start_lr_schedule(self.engine.lr_scheduler)  # a resume then loads the saved schedule over it
        self.ema = ShardedEMA(self.engine.module, cfg.train.ema_decay)
        self.step = self._resume() if self.resume_tag else 0
        self._write_run_files()
        self.metrics = MetricsLogger(self.run_dir, cfg, self.is_main, cfg.train.max_steps, self.step)
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

    # ---- resume and run files -------------------------------------------------------------------------
    def _resume(self) -> int:
        tag = self.resume_tag
        self.engine.load_checkpoint(str(self.ckpt.dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        state = self.ckpt.load_rank_state(tag)
        if state is None or state["world_size"] != self.topo.world_size:
            self._log(f"checkpoint {tag} was written by another world size: data position and EMA restart")
        else:
            self.loader.load_state_dict(state["data"])
            set_rng_state(state["rng"])
            if not self.ema.load_state_dict(state["ema"]):
                self._log("EMA sharding changed: EMA restarts from the current weights")
        step = int(self.engine.global_steps)
        self._log(f"resumed from {self.ckpt.dir / tag} at step {step}")
        return step

    def _write_run_files(self) -> None:
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
            truncate_after(self.run_dir / "metrics.jsonl", self.step)
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
        losses, tokens = [], 0
        for micro in range(self.cfg.train.grad_accum):
            loss, tokens = self.task.loss(self.engine, next(self.loader), step, self.topo.dp_rank, micro)
            # SP ranks each hold partial-sum gradients and ZeRO averages over all ranks: scale back up
            self.engine.backward(loss * self.topo.sp_size)
            self.engine.step()
            losses.append(loss.detach().float())
        self.ema.update()
        self.step = step
        loss = torch.stack(losses).mean()
        dist.all_reduce(loss)  # every rank of an SP group holds the same loss, so the mean over all
        loss = loss / self.topo.world_size  # ranks is the mean over data-parallel ranks
        return self._record(step, loss.item(), time.perf_counter() - start, tokens)

    def _record(self, step: int, loss: float, seconds: float, tokens: int) -> dict:
        samples = self.cfg.data.micro_batch * self.cfg.train.grad_accum * self.topo.dp_size
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
            if self.step % cfg.log.every_steps == 0 or self.step == stop_at:
                self.metrics.log(rec)
            preempted = self._agree(self.stop_requested)
            if self._due(cfg.checkpoint.every_steps) or self.step == stop_at or preempted:
                self.save()
            if cfg.sample.every_steps and self.step % cfg.sample.every_steps == 0:
                self.sample_during_training()
            if preempted:
                self._log(f"stopping at step {self.step} on SIGTERM; re-run the same command to resume")
                break
        self.metrics.close()

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def _agree(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def save(self) -> None:
        state = {
            "world_size": self.topo.world_size,
            "data": self.loader.state_dict(),
            "rng": rng_state(),
            "ema": self.ema.state_dict(),
        }
        tag = self.ckpt.save(self.engine, self.step, state)
        self.export()
        self._log(f"saved checkpoint {tag}")

    def export(self) -> None:
        """Inference weights as safetensors: RUN/export/model.safetensors (raw) and ema.safetensors."""
        raw = self._gather_raw()
        ema = self.ema.gather_full()
        if self.is_main:
            meta = {"step": str(self.step), "signature": str(self.ckpt.signature)}
            export_safetensors(self.run_dir / "export" / "model.safetensors", self.task.export_weights(raw), meta)
            export_safetensors(self.run_dir / "export" / "ema.safetensors", self.task.export_weights(ema), meta)
        dist.barrier()

    def _gather_raw(self) -> dict:
        module = self.engine.module
        params = list(module.parameters())
        # under ZeRO-3 parameters are partitioned; gather them for the copy (no-op otherwise)
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}

    def sample_during_training(self) -> None:
        out = self.run_dir / "samples" / f"step{self.step:08d}"
        self.task.sample(self.engine.module, out, write=self.is_main)
        self.engine.module.train()
        self._log(f"samples written to {out}")


def run_training(cfg) -> None:
    trainer = Trainer(cfg)
    trainer.train()
    # leave together and tear the process group down explicitly: a rank still holding gloo threads at
    # interpreter exit can abort ("terminate called without an active exception") after a good run
    dist.barrier()
    trainer.loader.close()
    dist.destroy_process_group()
