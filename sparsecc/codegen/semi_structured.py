"""torch's semi-structured 2:4 tensors (cuSPARSELt, or CUTLASS) as a second GPU lowering of
sparsecc::nm_linear.

In kernel mode "auto" on a CUDA device, the nm_linear op times its ways of running per shape
(the Triton kernel, the reference, and — where `applies` — torch's 2:4 product) and runs the
fastest (sparsecc.ops.dispatch.pick). torch's tensor is built from the decompressed weight on
first use and kept while the stored weight lives (keyed by its `values` tensor, rebuilt if values
or index change in place); built only to be timed and then not chosen, it is dropped again (`forget`),
so only weights that run on it pay its memory (about 9/16 of the dense fp16 weight).

It applies where torch supports it: pattern 2:4, a non-empty input on the weight's (CUDA)
device, input, weight and bias of one dtype the backend takes (cuSPARSELt: fp16/bf16; CUTLASS:
also fp32), and both weight dimensions multiples of the backend's minimum sparse tile
(cuSPARSELt 16 x 16 for fp16/bf16). The dense input's rows are
padded by torch itself. Nothing here runs off the GPU: on CPU the tests check the plumbing with
a stand-in `build`; on a GPU they also compare the real product with F.linear.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from .nm_format import decompress

NAME = "torch_semi_structured"  # what lowering reports call this way
_built: WeakIdKeyDictionary = WeakIdKeyDictionary()  # values tensor -> (_stamp, torch's 2:4 tensor)


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
    """Whether torch's 2:4 product can run this nm_linear call (see the module docstring); the
    caller has checked that x is on a CUDA device."""
    cls = backend()
    if cls is None or (n, m) != (2, 4) or x.numel() == 0 or values.device != x.device:
        return False
    if x.dtype != values.dtype or (bias is not None and bias.dtype != x.dtype):
        return False
    dtypes = (torch.float16, torch.bfloat16) + ((torch.float32,) if cls.BACKEND == "cutlass" else ())
    limits = cls._DTYPE_SHAPE_CONSTRAINTS.get(values.dtype)  # int8/fp8 entries are left out by `dtypes`
    out_features = values.shape[0]
    return values.dtype in dtypes and limits is not None and out_features > 0 and \
        out_features % limits.sparse_min_rows == 0 and in_features % limits.sparse_min_cols == 0


def build(dense: torch.Tensor) -> torch.Tensor:
    """torch's 2:4 tensor for a dense 2:4-sparse weight [out, in] (on the GPU)."""
    from torch.sparse import to_sparse_semi_structured
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's "prototype feature" notice
        return to_sparse_semi_structured(dense.contiguous())


def _stamp(values: torch.Tensor, index: torch.Tensor) -> tuple:
    """What must not change for a kept tensor to stay valid: storage and in-place versions
    (inference tensors have no version counter, and cannot be changed in place outside inference mode)."""
    return tuple((t.data_ptr(), t.dtype, t.device, 0 if t.is_inference() else t._version) for t in (values, index))


def weight(values: torch.Tensor, index: torch.Tensor, in_features: int) -> torch.Tensor:
    """torch's 2:4 tensor for the stored weight (values, index), built once per stored weight."""
    stamp = _stamp(values, index)
    hit = _built.get(values)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    semi = build(decompress(values, index, 2, 4, in_features, check=False))
    _built[values] = (stamp, semi)
    return semi


def kept(values: torch.Tensor) -> bool:
    """Whether a 2:4 tensor is kept for this stored weight."""
    return values in _built


def forget(values: torch.Tensor) -> None:
    """Drop torch's 2:4 tensor kept for this stored weight, if any."""
    _built.pop(values, None)


def linear(x: torch.Tensor, values: torch.Tensor, index: torch.Tensor, bias: torch.Tensor | None,
           in_features: int) -> torch.Tensor:
    """x @ Wᵀ + bias through torch's 2:4 product."""
    # cuSPARSELt reads the dense operand as contiguous rows: a strided view would be read wrong
    y = F.linear(x.reshape(-1, in_features).contiguous(), weight(values, index, in_features), bias)
    return y.contiguous().reshape(*x.shape[:-1], values.shape[0])  # CUTLASS returns a transposed view
