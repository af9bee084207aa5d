"""CSR sparse linear: y = x Wᵀ (+ b) with W stored CSR (row pointers, column indices, values), by
torch's sparse product (MKL on CPU, cuSPARSE on CUDA); it has no Triton kernel of its own."""
from __future__ import annotations

import warnings

import torch


def _csr_values(values: torch.Tensor) -> torch.Tensor:
    """torch's CSR product on CPU has no half/bf16 kernel (a model cast after compress_csr_, or
    autocast): compute those in fp32."""
    return values.float() if values.device.type == "cpu" and values.dtype in (torch.float16, torch.bfloat16) else values


def csr_weight(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, in_features: int) -> torch.Tensor:
    """The [out, in] sparse CSR tensor of the stored weight (not validated: the stored arrays are)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Sparse CSR tensor support is in beta state"
        return torch.sparse_csr_tensor(crow, col, values, (crow.numel() - 1, in_features), check_invariants=False)


def csr_matmul(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
               bias: torch.Tensor | None, in_features: int) -> torch.Tensor:
    """x [..., in] @ Wᵀ + bias as (W @ xᵀ)ᵀ, in x's dtype."""
    values = _csr_values(values)
    x2 = x.reshape(-1, in_features).to(values.dtype)
    y = (csr_weight(crow, col, values, in_features) @ x2.t()).t().to(x.dtype)
    y = y + bias if bias is not None else y
    return y.contiguous().reshape(*x.shape[:-1], crow.numel() - 1)


def csr_matmul_grad(grad: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                    in_features: int) -> torch.Tensor:
    """d/dx (x Wᵀ) = grad · W = (Wᵀ gradᵀ)ᵀ, in grad's dtype."""
    values = _csr_values(values)
    g2 = grad.reshape(-1, grad.shape[-1]).to(values.dtype)
    gx = (csr_weight(crow, col, values, in_features).t() @ g2.t()).t()
    return gx.to(grad.dtype).contiguous().reshape(*grad.shape[:-1], in_features)
