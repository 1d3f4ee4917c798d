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
    return SimpleNamespace(mode=case["mode"], degree=case["degree"], ulysses_degree=case.get("ulysses_degree", 1))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error max|a - b| / max|b| (elementwise ratios blow up on near-zero entries)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def forward_backward(model, inputs, scale: float = 1.0):
    x, t, text, mask, weights = inputs
    model.zero_grad(set_to_none=True)
    out = model(x, t, text, mask)
    ((out * weights).sum() * scale).backward()
    return out.detach()


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


def run_case(case: dict) -> dict:
    """One SP forward/backward against the single-process model, on every rank. Returns the errors."""
    from vgen.parallel.comm import COUNTER
    from vgen.parallel.sequence import apply_sequence_parallel, sp_loss_scale
    from vgen.parallel.topology import build_topology

    ref = tiny_model()
    inputs = make_inputs(case, ref.cfg.in_channels)
    ref_out = forward_backward(ref, inputs)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}

    cfg = sp_config(case)
    topo = build_topology(cfg, heads=ref.cfg.heads)
    model = apply_sequence_parallel(tiny_model(), topo, cfg)
    if case.get("broken"):
        break_switch_temporal(model)
    scale = sp_loss_scale(topo)
    COUNTER.reset()
    out = forward_backward(model, inputs, scale)
    sent = COUNTER.snapshot()
    # the test's contract: SP sum of the (unscaled) partial gradients; the trainer's: world mean of scaled
    sp_sum = _reduced_grads(model, topo.sp_group, scale)
    world_mean = _reduced_grads(model, None, topo.world_size)
    return {
        "case": case,
        "out": rel_err(out, ref_out),
        "grad_sp_sum": max(rel_err(sp_sum[n], g) for n, g in ref_grads.items()),
        "grad_world_mean": max(rel_err(world_mean[n], g) for n, g in ref_grads.items()),
        "smallest_ref_grad": min(float(g.abs().max()) for g in ref_grads.values()),
        "params": len(ref_grads),
        "bytes": sent,
        "local_elems": _local_elems(case, model),
    }


def _local_elems(case: dict, model) -> int:
    """Elements of one (B, N_local, hidden) activation on this rank, for the byte formulas."""
    from vgen.parallel.comm import shard_plan

    plan = shard_plan((case["frames"], *case["hw"]), case["degree"], case["mode"])
    return case["batch"] * plan.local * model.cfg.hidden


def sp_worker(rank: int, world: int, cases: list, out_dir: str) -> None:
    write_result(out_dir, rank, [run_case(case) for case in cases])
