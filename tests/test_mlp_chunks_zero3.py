"""MLP chunking under DeepSpeed ZeRO-3 on 2 CPU ranks (the real `deepspeed` launcher, gloo) gives the
gradients of no chunking, and those of one process without DeepSpeed.

ZeRO-3 holds each weight as an empty partition outside its module's call; the chunked MLP must gather
them for every slice it recomputes in backward and hand each gradient to ZeRO once (see
vgen/parallel/mlp_chunks.py). This file is both the test and, run as a script, the worker.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

POLICIES = {  # name -> memory settings; each is run with and without MLP chunks
    "chunks": dict(),
    "block+chunks": dict(checkpointing="block"),
    "nested+chunks": dict(checkpointing="nested"),
}
CHUNKS = 3


@pytest.mark.slow
def test_mlp_chunks_under_zero3_match_no_chunking(tmp_path):
    from e2e_utils import check, env, launcher_cmd, run_group

    proc = run_group(launcher_cmd("deepspeed", __file__) + [str(tmp_path)], env(), timeout=600)
    check(proc)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["partitioned"], "ZeRO-3 did not partition the MLP weights: the test would prove nothing"
        for name in POLICIES:
            # chunked vs unchunked, both under ZeRO-3; and ZeRO-3 vs one process averaging both ranks' batches
            assert result[name]["vs_unchunked"] <= 1e-6, (rank, name, result[name])
            assert result[name]["vs_single_process"] <= 1e-5, (rank, name, result[name])
            assert result[name]["mlp_grad_norm"] > 0
            assert result[name]["chunked_backwards"] == result[name]["blocks"]  # every block's MLP ran chunked


def _worker(out_dir: Path) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    from test_memory import batch, loss_and_grads, mem_cfg, rel_err, tiny_model
    from vgen.parallel.checkpointing import apply_memory_policy
    from vgen.train.setup import disable_deepspeed_shm_allreduce

    from vgen.parallel import mlp_chunks

    backward = mlp_chunks.ChunkedMLP.backward
    calls = []

    def counted(ctx, grad):  # proves the chunked path ran (not the plain call) in each chunked step
        calls.append(1)
        return backward(ctx, grad)

    mlp_chunks.ChunkedMLP.backward = staticmethod(counted)
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    disable_deepspeed_shm_allreduce()
    rank, world = dist.get_rank(), dist.get_world_size()
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW", "params": {"lr": 0.0, "torch_adam": True}},
                 "steps_per_print": 10**9}

    def zero3_grads(settings):
        model = apply_memory_policy(tiny_model(), mem_cfg(**settings))
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        x, t, text, mask, target = batch(seed=1 + rank)  # each rank its own batch: ZeRO must average them
        loss = (engine(x, t, text, mask) - target).pow(2).mean()
        engine.backward(loss)
        fc1 = engine.module.blocks[0].mlp.fc1.weight
        grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
        return grads, fc1.data.numel() == 0  # outside a call, a ZeRO-3 weight is an empty partition

    # one process, no DeepSpeed: the mean of the gradients of both ranks' batches
    single = [loss_and_grads(tiny_model(), batch(seed=1 + r))[1] for r in range(world)]
    single = {n: sum(g[n] for g in single) / world for n in single[0]}
    result = {"partitioned": True}
    for name, settings in POLICIES.items():
        plain, partitioned = zero3_grads(settings)
        calls.clear()
        chunked, partitioned_too = zero3_grads(dict(settings, mlp_chunks=CHUNKS))
        chunked_backwards = len(calls)
        result["partitioned"] &= partitioned and partitioned_too
        nonzero = [n for n, g in single.items() if g.abs().sum() > 0]
        result[name] = {
            "vs_unchunked": max(rel_err(chunked[n], plain[n]) for n in nonzero),
            "vs_single_process": max(rel_err(chunked[n], single[n]) for n in nonzero),
            "mlp_grad_norm": float(sum(chunked[n].norm() for n in nonzero if ".mlp." in n)),
            "chunked_backwards": chunked_backwards,
            "blocks": len(tiny_model().blocks),
        }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    print(f"rank {rank}: {json.dumps(result)}", flush=True)


if __name__ == "__main__":
    _worker(Path(next(a for a in sys.argv[1:] if not a.startswith("--local_rank"))))
