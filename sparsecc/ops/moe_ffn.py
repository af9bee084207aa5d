"""torch.ops.sparsecc.moe_ffn: a mixture-of-experts FFN (codegen/moe_ffn.py: reference and grouped Triton
kernel); moe_ffn_backward, its gradients, is an op of its own."""
from __future__ import annotations

import torch

from ..codegen.moe_ffn import moe_ffn_backward as moe_ffn_gradients
from ..codegen.moe_ffn import moe_ffn_reference, moe_ffn_triton
from ..codegen.tuning import bucket
from .dispatch import dispatch, register_ways

register_ways("moe_ffn", kernel=moe_ffn_triton, cpu=moe_ffn_reference, reference=moe_ffn_reference)
register_ways("moe_ffn_backward", kernel=moe_ffn_gradients, cpu=moe_ffn_gradients, reference=moe_ffn_gradients)


@torch.library.custom_op("sparsecc::moe_ffn", mutates_args=())
def moe_ffn(x: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor | None, w_gate: torch.Tensor,
            b_gate: torch.Tensor | None, w_up: torch.Tensor, b_up: torch.Tensor | None, w_down: torch.Tensor,
            b_down: torch.Tensor | None, top_k: int, capacity_factor: float, act: str, mode: str,
            kernels: str | None = None) -> torch.Tensor:
    """Σ over the top_k experts (fp32 router) of w_e · down_e(act(gate_e(x)) * up_e(x)) + b_down; w_e = 1
    (mode "sum") or softmax over the top_k logits ("softmax_topk"); capacity_factor <= 0: no capacity."""
    args = (x, router_weight, router_bias, w_gate, b_gate, w_up, b_up, w_down, b_down, top_k, capacity_factor, act,
            mode)
    key = (x.dtype, bucket(x.numel() // max(1, x.shape[-1])), tuple(w_gate.shape), top_k, capacity_factor, act)
    return dispatch("moe_ffn", key, x, lambda fn: fn(*args), kernels)


@moe_ffn.register_fake
def _(x, router_weight, router_bias, w_gate, b_gate, w_up, b_up, w_down, b_down, top_k, capacity_factor, act, mode,
      kernels=None):
    return x.new_empty(*x.shape[:-1], w_down.shape[1])


@torch.library.custom_op("sparsecc::moe_ffn_backward", mutates_args=())
def moe_ffn_backward(grad: torch.Tensor, x: torch.Tensor, router_weight: torch.Tensor,
                     router_bias: torch.Tensor | None, w_gate: torch.Tensor, b_gate: torch.Tensor | None,
                     w_up: torch.Tensor, b_up: torch.Tensor | None, w_down: torch.Tensor,
                     b_down: torch.Tensor | None, top_k: int, capacity_factor: float, act: str,
                     mode: str) -> list[torch.Tensor]:
    """The gradients of moe_ffn w.r.t. its nine tensor inputs (an empty tensor for an absent bias):
    an op of its own, as its routing is data-dependent and cannot be traced."""
    args = (grad, x, router_weight, router_bias, w_gate, b_gate, w_up, b_up, w_down, b_down, top_k, capacity_factor,
            act, mode)
    grads = dispatch("moe_ffn_backward", (), x, lambda fn: fn(*args))
    return [g if g is not None else x.new_empty(0) for g in grads]


@moe_ffn_backward.register_fake
def _(grad, x, router_weight, router_bias, w_gate, b_gate, w_up, b_up, w_down, b_down, top_k, capacity_factor, act,
      mode):
    return [torch.empty_like(t) if t is not None else x.new_empty(0)
            for t in (x, router_weight, router_bias, w_gate, b_gate, w_up, b_up, w_down, b_down)]


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*(t for t in inputs[:9] if t is not None))
    ctx.present = [t is not None for t in inputs[:9]]
    ctx.args = inputs[9:13]  # top_k, capacity_factor, act, mode (not kernels: the backward has one way)


def _backward(ctx, grad):
    saved = iter(ctx.saved_tensors)
    tensors = [next(saved) if p else None for p in ctx.present]
    grads = torch.ops.sparsecc.moe_ffn_backward(grad, *tensors, *ctx.args)
    return (*(g if p else None for g, p in zip(grads, ctx.present)), None, None, None, None, None)


moe_ffn.register_autograd(_backward, setup_context=_setup)
