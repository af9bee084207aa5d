"""torch.ops.sparsecc.nm_linear: x @ Wᵀ + bias for an N:M weight stored compressed (codegen/nm_linear.py)."""
from __future__ import annotations

import torch

from ..codegen import semi_structured
from ..codegen.nm_format import decompress
from ..codegen.nm_linear import nm_linear_reference, nm_linear_triton
from ..codegen.tuning import bucket
from .dispatch import pick, register_ways

register_ways("nm_linear", kernel=nm_linear_triton, cpu=nm_linear_reference, reference=nm_linear_reference,
              others={semi_structured.NAME: "2:4, fp16/bf16"})


@torch.library.custom_op("sparsecc::nm_linear", mutates_args=())
def nm_linear(x: torch.Tensor, values: torch.Tensor, index: torch.Tensor, bias: torch.Tensor | None,
              n: int, m: int, in_features: int, kernels: str | None = None) -> torch.Tensor:
    """x @ Wᵀ + bias for an N:M weight W stored compressed (values, packed index). On the GPU,
    torch's semi-structured 2:4 product (semi_structured.py) is timed as a third way where it applies."""
    def offer() -> dict:
        if not semi_structured.applies(x, values, bias, n, m, in_features):
            return {}
        return {semi_structured.NAME: lambda: semi_structured.linear(x, values, index, bias, in_features)}

    kept = semi_structured.kept(values)
    way, run = pick("nm_linear", (x.dtype, bucket(x.numel() // max(1, x.shape[-1])), tuple(values.shape), n, m), x,
                    lambda fn: fn(x, values, index, n, m, in_features, bias), kernels, offer)
    if way != semi_structured.NAME and not kept:
        semi_structured.forget(values)  # built while timing this shape, not chosen: free its memory
    return run()


@nm_linear.register_fake
def _(x, values, index, bias, n, m, in_features, kernels=None):
    return x.new_empty(*x.shape[:-1], values.shape[0])


def _setup_context(ctx, inputs, output):
    x, values, index, bias, n, m, in_features, _ = inputs
    ctx.save_for_backward(values, index)
    ctx.nm = (n, m, in_features)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    """d/dx (x Wᵀ + b) = grad · W with W decompressed; the compressed weight itself is frozen."""
    values, index = ctx.saved_tensors
    n, m, in_features = ctx.nm
    w = decompress(values, index, n, m, in_features, check=False).to(grad.dtype)
    grad_x = grad @ w if ctx.needs_input_grad[0] else None
    grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return grad_x, None, None, grad_b, None, None, None, None


nm_linear.register_autograd(_backward, setup_context=_setup_context)
