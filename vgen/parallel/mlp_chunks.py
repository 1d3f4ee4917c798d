"""MLP chunking: the block's MLP runs a slice of the sequence at a time, in forward and in backward.

The MLP's hidden activations are `mlp_ratio` times the width of its input; chunked, they never exist for
more than one slice. Forward keeps only the MLP's input; backward recomputes each slice through the
module and differentiates it alone.

This works under ZeRO-3, where a parameter holds an empty partition except while its module runs: the
chunked function never captures a weight at forward. In backward each slice is recomputed by calling the
module itself (its `__call__`), so ZeRO-3's gather hooks fire for every slice, and the slice's backward
accumulates the weight gradients through autograd as an unchunked call would. ZeRO (stages 1-3) reduces
a parameter's gradient when autograd reports it accumulated; the parameters are marked not ready
(`ds_grad_is_ready`, DeepSpeed's flag for tiled computations) until the last slice, so each gradient is
reduced once per step with the sum of all slices. That is DeepSpeed ALST's TiledMLP; it is written here
rather than imported because model-side code must not import DeepSpeed (the trainer is the only place that
knows it), and because vgen slices with `even_slices` (a fixed slice count whatever the length), which the
memory simulator's length sweep relies on. The flag is a plain attribute, ignored without DeepSpeed.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn

from vgen.models.lean_ops import even_slices

# `mlp_depth`: how many MLP calls enclose the current op on this thread (the selective policy in
# checkpointing.py reads it); `recomputing`: a chunk's recomputation calls the module, which must then run
# its own forward instead of chunking again
state = threading.local()


@contextlib.contextmanager
def _recomputing():
    previous = getattr(state, "recomputing", False)
    state.recomputing = True
    try:
        yield
    finally:
        state.recomputing = previous


class MLPForward:
    """The MLP's forward, tagged for the selective policy and optionally chunked over the sequence (dim 1).

    Args:
        module: the MLP module; backward recomputes slices through `module(...)`.
        inner: its original forward.
        chunks: slices of the sequence (1: no chunking, only the tag).
    """

    def __init__(self, module: nn.Module, inner, chunks: int):
        self.module, self.inner, self.chunks = module, inner, int(chunks)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        state.mlp_depth = getattr(state, "mlp_depth", 0) + 1
        try:
            # the weights are no inputs of the chunked function (below), so it is differentiable only
            # through x: without a gradient for x (never in the DiT, whose MLP input comes from the
            # residual stream) the plain call keeps the weights' gradients right
            plain = torch.is_grad_enabled() and not x.requires_grad
            if self.chunks <= 1 or x.dim() < 3 or getattr(state, "recomputing", False) or plain:
                return self.inner(x)
            return ChunkedMLP.apply(x, self.module, self.inner, self.chunks)
        finally:
            state.mlp_depth -= 1


class ChunkedMLP(torch.autograd.Function):
    """y = module(x) computed `chunks` slices of the sequence at a time; saves only x.

    The weights are not inputs: passed in at forward, where ZeRO-3 holds them as empty partitions, they
    would get autograd gradient accumulators of that empty shape, which the full gradients of the
    recomputation could not enter. Their gradients reach them through autograd inside backward.
    """

    @staticmethod
    def forward(ctx, x, module, inner, chunks):
        ctx.module, ctx.chunks = module, chunks
        ctx.save_for_backward(x)
        out = None
        with torch.no_grad():
            for sl in even_slices(x.shape[1], chunks):
                y = inner(x[:, sl])  # (B, n_chunk, D_out): the submodules' hooks (ZeRO-3 gathers) fire
                if out is None:
                    out = y.new_empty(x.shape[:-1] + y.shape[-1:])
                out[:, sl] = y
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        params = [p for p in ctx.module.parameters() if p.requires_grad]
        want_x = ctx.needs_input_grad[0]
        grad_x = torch.empty_like(x) if want_x else None
        slices = even_slices(x.shape[1], ctx.chunks)
        try:
            for i, sl in enumerate(slices):
                _mark_ready(params, i == len(slices) - 1)
                xc = x[:, sl].detach().requires_grad_(want_x)
                with torch.enable_grad(), _recomputing():
                    y = ctx.module(xc)  # through __call__: ZeRO-3 gathers this slice's weights again
                if y.requires_grad:  # no `inputs=`: it would rebuild ZeRO-3 weights' accumulators at their empty shape
                    torch.autograd.backward(y, grad_out[:, sl])
                if want_x:
                    grad_x[:, sl] = xc.grad
        finally:
            _mark_ready(params, True)
        return grad_x, None, None, None


def _mark_ready(params, ready: bool) -> None:
    """DeepSpeed's ZeRO reduces a parameter's gradient at its accumulation only while this flag is True."""
    for p in params:
        p.ds_grad_is_ready = ready


def chunk_mlp(mlp: nn.Module, chunks: int) -> None:
    """Replace `mlp.forward` in place (no submodules added: state_dict keys never change; copy.deepcopy
    of the model re-binds the module and its bound forward to the copy)."""
    mlp.forward = MLPForward(mlp, mlp.forward, chunks)
