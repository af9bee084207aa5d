"""Store N:M-pruned linears compressed, so inference reads N/M of the weight bytes.

    sparsecc.sparsify_(model, {"default": sparsecc.SparseGPTConfig(pattern="2:4"), "lm_head": None}, batches)
    sparsecc.compress_nm_(model, "2:4")      # nn.Linear -> NMLinear where the weight is 2:4
    torch.compile(model, backend="sparsecc")  # NMLinear is one op: Triton kernel on GPU

`NMLinear` keeps `values` and the packed `index` (`sparsecc.nm_format`) as buffers and calls
`torch.ops.sparsecc.nm_linear`, which runs the Triton kernel on CUDA and the reference on CPU
(see `sparsecc.codegen.ops`). Outputs equal the pruned nn.Linear's up to float rounding.
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
