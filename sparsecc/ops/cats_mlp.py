"""torch.ops.sparsecc.cats_mlp: a CATS-gated MLP (codegen/cats_mlp.py; on CPU codegen/cats_cpu.py)."""
from __future__ import annotations

import torch

from ..codegen.cats_cpu import cats_mlp_cpu
from ..codegen.cats_mlp import cats_mlp_backward, cats_mlp_reference, cats_mlp_triton
from ..codegen.tuning import bucket
from .dispatch import dispatch, register_ways

register_ways("cats_mlp", kernel=cats_mlp_triton, cpu=cats_mlp_cpu, reference=cats_mlp_reference)


@torch.library.custom_op("sparsecc::cats_mlp", mutates_args=())
def cats_mlp(x: torch.Tensor, w_gate: torch.Tensor, b_gate: torch.Tensor | None, w_up: torch.Tensor,
             b_up: torch.Tensor | None, w_down: torch.Tensor, b_down: torch.Tensor | None, threshold: float,
             act: str, kernels: str | None = None) -> torch.Tensor:
    """down((act(gate(x)) thresholded at |.| >= threshold) * up(x)): a CATS-gated MLP."""
    return dispatch("cats_mlp", (x.dtype, bucket(x.numel() // max(1, x.shape[-1])), tuple(w_gate.shape), act), x,
                    lambda fn: fn(x, w_gate, b_gate, w_up, b_up, w_down, b_down, threshold, act), kernels)


@cats_mlp.register_fake
def _(x, w_gate, b_gate, w_up, b_up, w_down, b_down, threshold, act, kernels=None):
    return x.new_empty(*x.shape[:-1], w_down.shape[0])


def _setup(ctx, inputs, output):
    x, w_gate, b_gate, w_up, b_up, w_down, b_down, threshold, act, _ = inputs
    ctx.save_for_backward(x, w_gate, b_gate, w_up, b_up, w_down)
    ctx.threshold, ctx.act, ctx.has_b_down = threshold, act, b_down is not None


def _backward(ctx, grad):
    """The reference's gradient (cats_mlp_backward) for whichever way ran forward."""
    x, w_gate, b_gate, w_up, b_up, w_down = ctx.saved_tensors
    dx, dwg, dbg, dwu, dbu, dwd, dbd = cats_mlp_backward(grad, x, w_gate, b_gate, w_up, b_up, w_down,
                                                         ctx.threshold, ctx.act)
    return dx, dwg, dbg, dwu, dbu, dwd, dbd if ctx.has_b_down else None, None, None, None


cats_mlp.register_autograd(_backward, setup_context=_setup)
