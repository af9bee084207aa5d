"""Store pruned linears compressed, so inference reads only the kept weights.

    sparsecc.sparsify_(model, {"default": sparsecc.SparseGPTConfig(pattern="2:4"), "lm_head": None}, batches)
    sparsecc.compress_nm_(model, "2:4")      # nn.Linear -> NMLinear where the weight is 2:4
    sparsecc.compress_csr_(model)            # nn.Linear -> CSRLinear where ≥ 90% of the weight is zero
    torch.compile(model, backend="sparsecc")  # each is one op

`NMLinear` keeps `values` and the packed `index` (`sparsecc.nm_format`) as buffers and calls
`torch.ops.sparsecc.nm_linear`, which runs the Triton kernel on CUDA and the reference on CPU
(see `sparsecc.codegen.ops`). `CSRLinear` keeps the weight as CSR (row pointers, int32 column
indices, values) and calls `torch.ops.sparsecc.csr_linear`, torch's sparse product (MKL on CPU,
cuSPARSE on CUDA): on CPU it beats the dense product from about 90% unstructured sparsity
(`benchmarks/sparse_linear.py`). Outputs equal the pruned nn.Linear's up to float rounding.
Compress after `save_pruned`/`load_pruned`: checkpoints hold nn.Linear weights.
"""
from __future__ import annotations

import torch
from torch import nn

from .codegen import ops as _ops  # noqa: F401  (registers torch.ops.sparsecc.nm_linear)
from .errors import RecipeError
from .nm_format import compress, decompress
from .prune.masks import parse_pattern
from .targeting import select


class NMLinear(nn.Module):
    """A linear layer whose weight is stored N:M-compressed."""

    def __init__(self, values: torch.Tensor, index: torch.Tensor, n: int, m: int, in_features: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.n, self.m, self.in_features, self.out_features = n, m, in_features, values.shape[0]
        self.register_buffer("values", values)
        self.register_buffer("index", index)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, n: int, m: int) -> "NMLinear":
        values, index = compress(linear.weight.detach(), n, m)
        return cls(values, index, n, m, linear.in_features, linear.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (decompressed on each access: for inspection, not for compute)."""
        return decompress(self.values, self.index, self.n, self.m, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.sparsecc.nm_linear(x, self.values, self.index, self.bias, self.n, self.m, self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.n}:{self.m}, "
                f"bias={self.bias is not None}")


def compress_nm_(model: nn.Module, pattern: str = "2:4", targets=None) -> list[str]:
    """Replace every nn.Linear whose weight is `pattern`-sparse by an NMLinear (in place).

    `targets` (optional): module names or "re:<regex>" keys choosing the layers; then a chosen
    layer that is not N:M raises and nothing is replaced. Without it, the layers that are not N:M
    are left dense. Returns the names replaced.
    """
    n, m = parse_pattern(pattern)
    linears = {name: mod for name, mod in model.named_modules() if type(mod) is nn.Linear}
    if not linears:
        raise RecipeError(f"{type(model).__name__} has no nn.Linear layers to compress")
    if targets is None:
        chosen = {name: lin for name, lin in linears.items() if _is_nm(lin.weight, n, m)}
    else:
        chosen = {name: linears[name] for name in sorted(select([targets] if isinstance(targets, str) else targets,
                                                                  sorted(linears)))}
        bad = [name for name, lin in chosen.items() if not _is_nm(lin.weight, n, m)]
        if bad:
            raise RecipeError(f"not {pattern}-sparse, cannot compress: {', '.join(bad)} (prune them with "
                              f"pattern={pattern!r} first, or leave them out of targets)")
    built = {name: NMLinear.from_linear(lin, n, m) for name, lin in chosen.items()}  # all before any swap
    for name, new in built.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return sorted(built)


def _is_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    rows, cols = weight.shape
    return cols % m == 0 and bool(((weight.detach().reshape(rows, cols // m, m) != 0).sum(-1) <= n).all())


class CSRLinear(nn.Module):
    """A linear layer whose weight is stored as CSR: row pointers, column indices, values."""

    def __init__(self, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, in_features: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, crow.numel() - 1
        self.register_buffer("crow", crow)
        self.register_buffer("col", col)
        self.register_buffer("values", values)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "CSRLinear":
        w = linear.weight.detach()
        keep = w != 0
        crow = torch.zeros(w.shape[0] + 1, dtype=torch.int32, device=w.device)
        crow[1:] = keep.sum(1).cumsum(0)
        col = keep.nonzero()[:, 1].to(torch.int32)  # row-major order: row by row, columns ascending
        return cls(crow, col, w[keep], linear.in_features, linear.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (built on each access: for inspection, not for compute)."""
        w = self.values.new_zeros(self.out_features, self.in_features)
        rows = torch.repeat_interleave(torch.arange(self.out_features, device=w.device), self.crow.diff())
        w[rows, self.col.long()] = self.values
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.sparsecc.csr_linear(x, self.crow, self.col, self.values, self.bias, self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"nonzeros={self.values.numel()}, bias={self.bias is not None}")


def compress_csr_(model: nn.Module, min_sparsity: float = 0.9, targets=None) -> list[str]:
    """Replace every nn.Linear with at least `min_sparsity` of its weight zero by a CSRLinear (in
    place). The default 0.9 is where CSR beat the dense product at 1, 16 and 128 tokens on CPU
    (`benchmarks/sparse_linear.py`; below it, it loses at some token counts).

    `targets` (optional): module names or "re:<regex>" keys choosing the layers; then a chosen
    layer below `min_sparsity` raises and nothing is replaced. Returns the names replaced.
    """
    if not isinstance(min_sparsity, (int, float)) or not 0.0 < float(min_sparsity) < 1.0:
        raise RecipeError(f"min_sparsity must be in (0, 1), got {min_sparsity!r} (0.9: layers with ≥ 90% zeros)")
    linears = {name: mod for name, mod in model.named_modules() if type(mod) is nn.Linear}
    if not linears:
        raise RecipeError(f"{type(model).__name__} has no nn.Linear layers to compress")
    zeros = {name: float((lin.weight == 0).float().mean()) for name, lin in linears.items()}
    if targets is None:
        chosen = [name for name in linears if zeros[name] >= min_sparsity]
    else:
        chosen = sorted(select([targets] if isinstance(targets, str) else targets, sorted(linears)))
        bad = [f"{name} ({zeros[name]:.0%})" for name in chosen if zeros[name] < min_sparsity]
        if bad:
            raise RecipeError(f"less than {min_sparsity:.0%} zeros, CSR would be slower than dense: {', '.join(bad)} "
                              "(prune them further, lower min_sparsity, or leave them out of targets)")
    for name in chosen:
        w = linears[name].weight
        if w.device.type == "cpu" and w.dtype not in (torch.float32, torch.float64):
            raise RecipeError(f"{name}: torch's CSR product on CPU needs float32 or float64 weights, not "
                              f"{str(w.dtype).replace('torch.', '')} (call model.float() first)")
    built = {name: CSRLinear.from_linear(linears[name]) for name in chosen}  # all before any swap
    for name, new in built.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return sorted(built)


def compressed_linears(model: nn.Module) -> dict[str, str]:
    """{name: class name} of the linears compress_nm_/compress_csr_ replaced (no nn.Linear any more)."""
    return {name: type(mod).__name__ for name, mod in model.named_modules() if isinstance(mod, (NMLinear, CSRLinear))}
