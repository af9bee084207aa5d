"""torch's semi-structured 2:4 tensors (cuSPARSELt, or CUTLASS) as a second GPU lowering of
sparsecc::nm_linear.

In kernel mode "auto" on a CUDA device, the nm_linear op times its ways of running per shape
(the Triton kernel, the reference, and — where `applies` — torch's 2:4 product) and runs the
fastest (ops.dispatch). torch's tensor is built from the decompressed weight on first use and
kept while the stored weight lives (keyed by its `values` tensor, rebuilt if values or index
change in place); where the tuner picks another way it is dropped again (`forget`), so only
weights that run on it pay its memory (about 9/16 of the dense fp16 weight).

It applies where torch supports it: pattern 2:4, input, weight and bias of one dtype the backend
takes (cuSPARSELt: fp16/bf16; CUTLASS: also fp32), and both weight dimensions multiples of the
backend's minimum sparse tile (cuSPARSELt 16 x 16 for fp16/bf16). The dense input's rows are
padded by torch itself. Nothing here runs off the GPU; the tests check the plumbing with a
stand-in `build`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from ..nm_format import decompress

NAME = "torch_semi_structured"  # what lowering reports call this way
_built: WeakIdKeyDictionary = WeakIdKeyDictionary()  # values tensor -> (versions, torch's 2:4 tensor)


def backend() -> type | None:
    """The class torch.sparse.to_sparse_semi_structured would build, or None where there is none."""
    sparse = torch.sparse
    if not hasattr(sparse, "SparseSemiStructuredTensor"):
        return None
    if sparse.SparseSemiStructuredTensor._FORCE_CUTLASS:
        return sparse.SparseSemiStructuredTensorCUTLASS
    return sparse.SparseSemiStructuredTensorCUSPARSELT if torch.backends.cusparselt.is_available() else None


def applies(x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, n: int, m: int,
            in_features: int) -> bool:
    """Whether torch's 2:4 product can run this nm_linear call (see the module docstring)."""
    cls = backend()
    if cls is None or (n, m) != (2, 4) or x.dtype != values.dtype or (bias is not None and bias.dtype != x.dtype):
        return False
    limits = cls._DTYPE_SHAPE_CONSTRAINTS.get(values.dtype)
    out_features = values.shape[0]
    return limits is not None and out_features % limits.sparse_min_rows == 0 and \
        in_features % limits.sparse_min_cols == 0 and out_features > 0 and in_features > 0


def build(dense: torch.Tensor) -> torch.Tensor:
    """torch's 2:4 tensor for a dense 2:4-sparse weight [out, in] (on the GPU)."""
    from torch.sparse import to_sparse_semi_structured
    return to_sparse_semi_structured(dense.contiguous())


def weight(values: torch.Tensor, index: torch.Tensor, in_features: int) -> torch.Tensor:
    """torch's 2:4 tensor for the stored weight (values, index), built once per stored weight."""
    versions = (values._version, index._version)
    hit = _built.get(values)
    if hit is not None and hit[0] == versions:
        return hit[1]
    semi = build(decompress(values, index, 2, 4, in_features, check=False))
    _built[values] = (versions, semi)
    return semi


def forget(values: torch.Tensor) -> None:
    """Drop torch's 2:4 tensor kept for this stored weight, if any."""
    _built.pop(values, None)


def linear(x: torch.Tensor, values: torch.Tensor, index: torch.Tensor, bias: torch.Tensor | None,
           in_features: int) -> torch.Tensor:
    """x @ Wᵀ + bias through torch's 2:4 product."""
    y = F.linear(x.reshape(-1, in_features), weight(values, index, in_features), bias)
    return y.reshape(*x.shape[:-1], values.shape[0])
