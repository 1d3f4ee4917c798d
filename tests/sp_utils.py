"""Helpers for the sequence-parallel tests: spawn CPU gloo ranks, build the tiny DiT, and compare one SP
forward/backward with the single-process one.

A case is a dict: mode, degree, ulysses_degree, frames, hw (tokens per frame as (h, w)), batch, and
optionally `broken` (switch without its temporal exchange: the negative control that must fail).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.utils._python_dispatch import TorchDispatchMode

from vgen.models import VideoDiT, resolve_preset

TEXT_LEN, TEXT_DIM = 5, 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args) -> None:
    """Run fn(rank, world, *args) on `world` gloo ranks; fn must be importable (module level)."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)


def tiny_model(seed: int = 0, heads: int = 4) -> VideoDiT:
    """Depth-2 DiT with every parameter random: the zero inits of adaLN-Zero would make the output and
    most gradients exactly zero, and a comparison of zeros proves nothing."""
    torch.manual_seed(seed)
    model = VideoDiT(resolve_preset("tiny", depth=2, hidden=64, heads=heads, text_dim=TEXT_DIM))
    with torch.no_grad():
        for name, p in model.named_parameters():
            # unit-scale QK norms keep attention far from uniform, so a wrong grouping shows
            p.normal_(1.0, 0.3) if name.endswith("norm.weight") else p.normal_(0.0, 0.1)
    return model


def make_inputs(case: dict, in_channels: int, seed: int = 1):
    """Latents, timesteps, text, text mask (some text tokens masked) and the loss weights."""
    g = torch.Generator().manual_seed(seed)
    B, T, (h, w) = case["batch"], case["frames"], case["hw"]
    x = torch.randn(B, in_channels, T, 2 * h, 2 * w, generator=g)  # patch (1, 2, 2)
    t = torch.rand(B, generator=g)
    text = torch.randn(B, TEXT_LEN, TEXT_DIM, generator=g)
    mask = torch.ones(B, TEXT_LEN, dtype=torch.bool)
    mask[0, -2:] = False
    weights = torch.randn(x.shape, generator=g)
    return x, t, text, mask, weights


def sp_config(case: dict):
    return SimpleNamespace(mode=case["mode"], degree=case["degree"], ulysses_degree=case.get("ulysses_degree", 1),
                           shard_loss=bool(case.get("shard_loss")))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error max|a - b| / max|b| (elementwise ratios blow up on near-zero entries)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def forward_backward(model, inputs, scale: float = 1.0, shard_loss: bool = False):
    """Forward and backward of a loss; returns (output or None, loss value). The plain loss weights every
    output element; the shard loss is the flow-matching MSE against `weights` as the target, from this
    rank's tokens (vgen.parallel.sequence.shard_mse)."""
    from vgen.parallel.sequence import shard_mse

    x, t, text, mask, weights = inputs
    model.zero_grad(set_to_none=True)
    out = model(x, t, text, mask)
    loss = shard_mse(model, out, weights) if shard_loss else (out * weights).sum()
    (loss * scale).backward()
    return (None if out.shape != x.shape else out.detach()), float(loss.detach())


def write_result(out_dir: str, rank: int, results) -> None:
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def read_results(out_dir: str, world: int) -> list:
    return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]


class LocalFramesSeam(torch.nn.Module):
    """A plausible bug for the negative control: switch's temporal seam without its exchange, so each
    position attends over the rank's own frames only (the temporal core is the plain one)."""

    def __init__(self, seam):
        super().__init__()
        self.sp_size, self.index = seam.sp_size, seam.index

    def send(self, h, rope, grid):
        from vgen.parallel.comm import shard_plan

        plan = shard_plan(tuple(grid), self.sp_size, "switch")
        return h, rope, (plan.frame_count(self.index), *grid[1:])

    def run(self, layer, sent):
        return layer(*sent)


def break_switch_temporal(model) -> None:
    for block in model.blocks:
        block.temporal_seam = LocalFramesSeam(block.temporal_seam)
        block.temporal.core = block.temporal.core.local


def _reduced_grads(model, group, divide: float) -> dict:
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g, group=group)
        grads[name] = g / divide
    return grads


class OpRecorder(TorchDispatchMode):
    """Names of the collective and attention ops as they dispatch, with the phase (forward/backward) and
    the bytes each all-to-all hands to the wire (its input less the chunk this rank keeps)."""

    WATCH = ("all_to_all_single", "wait_tensor", "scaled_dot_product")

    def __init__(self):
        super().__init__()
        self.ops, self.sent = [], {"forward": 0, "backward": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if any(w in name for w in self.WATCH):
            phase = "forward" if torch._C._current_graph_task_id() == -1 else "backward"
            self.ops.append((name.split("::")[-1], phase))
            if "all_to_all_single" in name:
                inp, in_splits, group = args[0], args[2], _resolve_process_group(args[3])
                self.sent[phase] += (inp.numel() - in_splits[dist.get_rank(group)]) * inp.element_size()
        return func(*args, **(kwargs or {}))


def _stem_rows(model, log: dict) -> None:
    """Record the rows of the patch embedding's output, of its gradient, and of the RoPE tables."""

    def on_embed(module, args, out):
        log["embed"] = out.shape[1]
        out.register_hook(lambda g: log.__setitem__("embed_grad", g.shape[1]))

    def on_block(module, args):
        log["rope"] = args[4][0].shape[0]

    model.patch_embed.register_forward_hook(on_embed)
    model.blocks[0].register_forward_pre_hook(on_block)


def run_case(case: dict) -> dict:
    """One SP forward/backward against the single-process model, on every rank. Returns the errors.
    Optional case keys: shard_loss, checkpointing (a parallel.memory policy applied after SP), trace
    (record the op schedule)."""
    from vgen.parallel.checkpointing import apply_memory_policy
    from vgen.parallel.comm import COUNTER
    from vgen.parallel.sequence import apply_sequence_parallel, sp_loss_scale
    from vgen.parallel.topology import build_topology

    shard_loss = bool(case.get("shard_loss"))
    ref = tiny_model()
    inputs = make_inputs(case, ref.cfg.in_channels)
    ref_out, ref_loss = forward_backward(ref, inputs, shard_loss=shard_loss)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}

    cfg = sp_config(case)
    topo = build_topology(cfg, heads=ref.cfg.heads)
    model = apply_sequence_parallel(tiny_model(), topo, cfg)
    if case.get("broken"):
        break_switch_temporal(model)
    if case.get("checkpointing"):
        apply_memory_policy(model, SimpleNamespace(checkpointing=case["checkpointing"], ratio=1.0, offload=False, mlp_chunks=1))
    stem: dict = {}
    _stem_rows(model, stem)
    scale = sp_loss_scale(topo)
    COUNTER.reset()
    recorder = OpRecorder()
    with recorder:
        out, loss = forward_backward(model, inputs, scale, shard_loss=shard_loss)
    sent = COUNTER.snapshot()
    # the test's contract: SP sum of the (unscaled) partial gradients; the trainer's: world mean of scaled
    sp_sum = _reduced_grads(model, topo.sp_group, scale)
    world_mean = _reduced_grads(model, None, topo.world_size)
    return {
        "case": case,
        "rank": topo.sp_rank,
        "out": rel_err(out, ref_out) if out is not None else abs(loss - ref_loss) / abs(ref_loss),
        "sharded_output": out is None,
        "grad_sp_sum": max(rel_err(sp_sum[n], g) for n, g in ref_grads.items()),
        "grad_world_mean": max(rel_err(world_mean[n], g) for n, g in ref_grads.items()),
        "smallest_ref_grad": min(float(g.abs().max()) for g in ref_grads.values()),
        "params": len(ref_grads),
        "bytes": sent,
        "wire": recorder.sent,
        "ops": recorder.ops if case.get("trace") else None,
        "stem": stem,
        "local_elems": _local_elems(case, model),
    }


def _local_elems(case: dict, model) -> int:
    """Elements of one (B, N_local, hidden) activation on this rank, for the byte formulas."""
    from vgen.parallel.comm import shard_plan

    plan = shard_plan((case["frames"], *case["hw"]), case["degree"], case["mode"])
    return case["batch"] * plan.local * model.cfg.hidden


def sp_worker(rank: int, world: int, cases: list, out_dir: str) -> None:
    write_result(out_dir, rank, [run_case(case) for case in cases])
