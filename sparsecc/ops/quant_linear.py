"""torch.ops.sparsecc.quant_linear: x @ Wᵀ + bias for a weight stored as b-bit codes with per-group
scales and zero points (prune/int_format.py, codegen/quant_linear.py)."""
from __future__ import annotations

import torch

from ..prune.int_format import dequantize, unpack_codes
from ..codegen.quant_linear import quant_linear_cpu, quant_linear_reference, quant_linear_triton
from ..codegen.tuning import bucket
from .dispatch import WAYS, pick, register_ways

register_ways("quant_linear", kernel=quant_linear_triton, cpu=quant_linear_cpu, reference=quant_linear_reference)


@torch.library.custom_op("sparsecc::quant_linear", mutates_args=())
def quant_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bias: torch.Tensor | None, bits: int, group_size: int, in_features: int,
                 cpu_weight: torch.Tensor | None = None, cpu_scales: torch.Tensor | None = None,
                 kernels: str | None = None) -> torch.Tensor:
    """x @ Wᵀ + bias, W[r, k] = scales[r, k // g] · (codes[r, k] - zeros[r, k // g]). `cpu_weight`,
    `cpu_scales`: the layout of torch's CPU kernels (`codegen.quant_linear.cpu_layout`, built once
    by QuantLinear), used by the CPU way in mode "auto"; without them it runs the reference."""
    def call(fn):
        if fn is WAYS["quant_linear"].cpu:  # the CPU way also takes the layout built for it
            return fn(x, codes, scales, zeros, bits, group_size, in_features, bias, cpu_weight, cpu_scales)
        return fn(x, codes, scales, zeros, bits, group_size, in_features, bias)

    tokens = x.numel() // max(1, x.shape[-1])
    return pick("quant_linear", (x.dtype, bucket(tokens), tuple(codes.shape), bits, group_size), x, call,
                kernels)[1]()


@quant_linear.register_fake
def _(x, codes, scales, zeros, bias, bits, group_size, in_features, cpu_weight=None, cpu_scales=None, kernels=None):
    return x.new_empty(*x.shape[:-1], codes.shape[0])


def _setup_context(ctx, inputs, output):
    x, codes, scales, zeros, bias, bits, group_size, in_features, *_ = inputs
    ctx.save_for_backward(codes, scales, zeros)
    ctx.quant = (bits, in_features)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    """d/dx (x Wᵀ + b) = grad · W with W dequantized; the stored weight itself is frozen."""
    codes, scales, zeros = ctx.saved_tensors
    bits, in_features = ctx.quant
    w = dequantize(unpack_codes(codes, bits, in_features), scales, zeros).to(grad.dtype)
    grad_x = grad @ w if ctx.needs_input_grad[0] else None
    grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
    return grad_x, None, None, None, grad_b, None, None, None, None, None, None


quant_linear.register_autograd(_backward, setup_context=_setup_context)
