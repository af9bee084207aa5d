"""torch.ops.sparsecc.csr_linear: x @ Wᵀ + bias for a weight stored CSR (packing.CSRLinear), by torch's
sparse product (codegen/csr_linear.py); csr_linear_grad, its input gradient, is an op of its own."""
from __future__ import annotations

import torch

from ..codegen.csr_linear import csr_matmul, csr_matmul_grad
from .dispatch import dispatch, register_ways

register_ways("csr_linear", kernel=csr_matmul, cpu=csr_matmul, reference=csr_matmul)  # the same on every device
register_ways("csr_linear_grad", kernel=csr_matmul_grad, cpu=csr_matmul_grad, reference=csr_matmul_grad)


@torch.library.custom_op("sparsecc::csr_linear", mutates_args=())
def csr_linear(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
               bias: torch.Tensor | None, in_features: int, kernels: str | None = None) -> torch.Tensor:
    """x @ Wᵀ + bias for a weight W stored CSR: torch's sparse product W @ xᵀ (MKL on CPU, cuSPARSE on CUDA)."""
    return dispatch("csr_linear", (), x, lambda fn: fn(x, crow, col, values, bias, in_features), kernels)


@csr_linear.register_fake
def _(x, crow, col, values, bias, in_features, kernels=None):
    return x.new_empty(*x.shape[:-1], crow.shape[0] - 1)


@torch.library.custom_op("sparsecc::csr_linear_grad", mutates_args=())
def csr_linear_grad(grad: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                    in_features: int) -> torch.Tensor:
    """d/dx (x Wᵀ) = grad · W for the CSR weight: an op of its own, as sparse tensors cannot be traced."""
    return dispatch("csr_linear_grad", (), grad, lambda fn: fn(grad, crow, col, values, in_features))


@csr_linear_grad.register_fake
def _(grad, crow, col, values, in_features):
    return grad.new_empty(*grad.shape[:-1], in_features)


def _grad_setup(ctx, inputs, output):
    grad, crow, col, values, in_features = inputs
    ctx.save_for_backward(crow, col, values)


def _grad_backward(ctx, gg):
    """csr_linear_grad is linear in grad: its own gradient is gg · Wᵀ, the forward op (double backward)."""
    crow, col, values = ctx.saved_tensors
    return torch.ops.sparsecc.csr_linear(gg, crow, col, values, None, gg.shape[-1]), None, None, None, None


csr_linear_grad.register_autograd(_grad_backward, setup_context=_grad_setup)


def _setup(ctx, inputs, output):
    x, crow, col, values, bias, in_features, _ = inputs
    ctx.save_for_backward(crow, col, values)
    ctx.in_features, ctx.has_bias = in_features, bias is not None


def _backward(ctx, grad):
    """Gradients for x and the bias; the stored weight is frozen."""
    crow, col, values = ctx.saved_tensors
    grad_x = (torch.ops.sparsecc.csr_linear_grad(grad, crow, col, values, ctx.in_features)
              if ctx.needs_input_grad[0] else None)
    grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
    return grad_x, None, None, None, grad_b, None, None


csr_linear.register_autograd(_backward, setup_context=_setup)
