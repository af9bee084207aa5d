"""Pack linears for inference: one step stores each pruned or quantized nn.Linear in the form its kernel reads.

    sparsecc.sparsify_(model, {"re:.*mlp.*": sparsecc.SparseGPTConfig(pattern="2:4"),
                               "re:.*self_attn.*": sparsecc.MagnitudeConfig(0.95), "lm_head": None}, batches)
    sparsecc.pack_(model)                     # {"model.layers.0.mlp.up_proj": "nm 2:4", ...: "csr", ...}
    torch.compile(model, backend="sparsecc")  # each packed linear is one op

`pack_(model, format="auto")` decides per nn.Linear (in place; returns {name: form} of what it packed):

  "int4 g128", "int8 row", ...
            QuantLinear: the weight is quantized (GPTQConfig, RTNConfig, SparseGPTConfig(bits=):
            its grid is in `module.__dict__[prune.quantize.QUANTIZED]`) and a fast quantized product
            exists on its device (`quant_way`): on CUDA the Triton kernel, on CPU torch's int4 kernel
            (b <= 4, out % 16 == 0, groups a multiple of 32) or int8 kernel (one group per row,
            in % 16 == 0). Keeps the packed `codes`, `scales` and `zeros` (`sparsecc.prune.int_format`)
            and calls `torch.ops.sparsecc.quant_linear`; b/32 of the fp32 weight's bytes plus the
            groups' scales. Quantization comes first: a quantized weight that is also N:M goes here.
  "nm N:M"  NMLinear: the weight is N:M-sparse (the pattern given, or else the first of
            `NM_PATTERNS` it satisfies: 1:4, 2:4, 4:8). Keeps `values` and the packed `index`
            (`sparsecc.codegen.nm_format`) as buffers and calls `torch.ops.sparsecc.nm_linear`,
            the Triton kernel on CUDA and the reference on CPU (see `sparsecc.ops`).
  "csr"     CSRLinear: at least `min_sparsity` (0.9) of the weight is zero. Keeps the weight as
            CSR (row pointers, int32 column indices, values) and calls `torch.ops.sparsecc.csr_linear`,
            torch's sparse product (MKL on CPU, cuSPARSE on CUDA): on CPU it beats the dense product
            from about 90% unstructured sparsity (`benchmarks/sparse_linear.py`).

format="auto" takes the quantized form where it is fast, else N:M where the weight is N:M (that is
where the kernels pay), else CSR where it is sparse enough, else leaves the nn.Linear dense (a
weight sparse enough for CSR with more zeros than its N:M pattern needs goes CSR, which stores
fewer values); format="nm" / "csr" / "quant" take only that form ("quant" packs every quantized
weight, fast product or not). With `targets`, a chosen layer that does not qualify raises, and
any error leaves the model unchanged (a quantized weight that no longer matches its grid is one).

`compress_nm_(model, "2:4")` and `compress_csr_(model, 0.9)` are pack_'s two sparse fixed forms (they
return the list of names). Outputs equal the pruned nn.Linear's up to float rounding (QuantLinear
on CPU: bf16 rounding of the input, which torch's int4/int8 kernels take). Pack after
`save_pruned`/`load_pruned`: checkpoints hold nn.Linear weights.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops as _ops  # noqa: F401  (registers torch.ops.sparsecc.nm_linear, quant_linear, ...)
from ..codegen import quant_linear as _quant
from ..prune.int_format import dequantize, unpack_codes
from ..codegen.nm_format import compress, decompress
from ..errors import RecipeError
from ..prune.masks import parse_pattern
from ..prune.quantize import QuantGrid, grid_of
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


class QuantLinear(nn.Module):
    """A linear layer whose weight is stored quantized: b-bit `codes` (two per byte for b <= 4),
    float32 `scales` and uint8 `zeros` per group of `group_size` inputs (`prune/int_format.py`):
    W[r, k] = scales[r, k // g] · (codes[r, k] - zeros[r, k // g]).

    On CPU it also keeps, built once here (non-persistent buffers, rebuilt after `.to()` and
    `load_state_dict`, dropped on other devices), the layout of torch's int4/int8 CPU kernels
    where they apply (`codegen.quant_linear.cpu_layout`); the op runs them in kernel mode "auto".
    `scales` stay float32 under `model.half()`/`.to(dtype)`; the layer's dtype (`weight_dtype`,
    the dtype of `.weight`) follows such casts."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                 in_features: int, bias: torch.Tensor | None = None, sym: bool = False,
                 weight_dtype: torch.dtype = torch.float32):
        super().__init__()
        _quant.check_args(in_features, codes, scales, zeros, bits, group_size, in_features)
        self.bits, self.group_size, self.sym = bits, group_size, sym
        self.in_features, self.out_features = in_features, codes.shape[0]
        self.weight_dtype = weight_dtype
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scales", scales.float().contiguous())
        self.register_buffer("zeros", zeros.contiguous())
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.register_buffer("cpu_weight", None, persistent=False)
        self.register_buffer("cpu_scales", None, persistent=False)
        self._build_cpu_layout()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "QuantLinear":
        """The QuantLinear of a quantized nn.Linear (its grid: `prune.quantize.grid_of`)."""
        grid = grid_of(linear)
        if grid is None:
            raise RecipeError(f"{linear} is not quantized (no grid in its __dict__['sparsecc_quant']): quantize it "
                              "first with sparsify_ and GPTQConfig, RTNConfig or SparseGPTConfig(bits=...)")
        _check_grid("this nn.Linear", linear, grid)
        dev = linear.weight.device
        return cls(grid.codes.to(dev), grid.scales.to(dev), grid.zeros.to(dev), grid.bits, grid.group_size,
                   grid.in_features, linear.bias, grid.sym, linear.weight.dtype)

    @property
    def grid(self) -> QuantGrid:
        """The stored weight as a QuantGrid (the same tensors)."""
        return QuantGrid(self.bits, self.group_size, self.sym, self.codes, self.scales, self.zeros, self.in_features)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the layer's dtype (built on each access: for inspection, not compute)."""
        return dequantize(unpack_codes(self.codes, self.bits, self.in_features), self.scales,
                          self.zeros).to(self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.sparsecc.quant_linear(x, self.codes, self.scales, self.zeros, self.bias, self.bits,
                                               self.group_size, self.in_features, self.cpu_weight, self.cpu_scales)

    def _build_cpu_layout(self) -> None:
        layout = _quant.cpu_layout(self.codes, self.scales, self.zeros, self.bits, self.group_size, self.in_features)
        self.cpu_weight, self.cpu_scales = layout if layout is not None else (None, None)

    def _apply(self, fn, recurse=True):
        """Module._apply (`.to()`, `.cuda()`, `.half()`, ...) with scales kept float32 (only moved) and
        the CPU layout rebuilt for the new device rather than converted."""
        scales = self.scales
        self._buffers["scales"] = self._buffers["cpu_weight"] = self._buffers["cpu_scales"] = None
        try:
            super()._apply(fn, recurse)
            probe = fn(torch.empty(0, dtype=self.weight_dtype, device=scales.device))
            scales = scales.to(probe.device)
            if probe.is_floating_point():
                self.weight_dtype = probe.dtype
        finally:
            self._buffers["scales"] = scales
            self._build_cpu_layout()
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._build_cpu_layout()  # the loaded codes, not the old ones

    def extra_repr(self) -> str:
        g = "row" if self.group_size == self.in_features else f"group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, {g}, "
                f"bias={self.bias is not None}, cpu_kernel={self.cpu_weight is not None}")


def _check_grid(name: str, linear: nn.Linear, grid: QuantGrid) -> None:
    """RecipeError unless `grid` still stores `linear`'s weight (`QuantGrid.matches`)."""
    if not grid.matches(linear.weight):
        raise RecipeError(f"{name}: its weight no longer equals its quantization grid ({grid.form}; changed after "
                          "quantizing?); quantize it again, or drop the grid (del module.__dict__['sparsecc_quant']) "
                          "to pack it as a plain weight")


def quant_way(grid: QuantGrid, device: torch.device) -> str | None:
    """None where a fast quantized product exists for `grid` on `device` (CUDA: the Triton kernel;
    CPU: torch's int4/int8 kernels, `codegen.quant_linear.cpu_form`), else why not."""
    device = torch.device(device)
    if device.type == "cuda":
        return None if _quant.triton is not None else "triton is not installed"
    if device.type != "cpu":
        return f"no quantized kernel on {device.type}"
    return _quant.cpu_form(grid.bits, grid.group_size, grid.in_features, grid.codes.shape[0])[1] or None


FORMATS = ("auto", "nm", "csr", "quant")
# N:M patterns pack_ looks for when no pattern is given, in order; the first the weight satisfies
# wins: the sparsest first (1:4 keeps 25%), then at equal density the smaller group (a 2:4 weight is
# also 4:8; 2:4 is what sparse tensor cores run, and its index takes 2 bits per value, not 4).
NM_PATTERNS = ((1, 4), (2, 4), (4, 8))


def pack_(model: nn.Module, format: str = "auto", *, pattern: str | None = None, min_sparsity: float = 0.9,
          targets=None) -> dict[str, str]:
    """Store each nn.Linear of `model` in its packed form, in place; returns {name: form} of those packed.

    format: "auto" (per linear: a quantized weight as QuantLinear, form "int4 g128" / "int8 row",
    where a fast quantized product exists on its device (`quant_way`: CUDA, or on CPU torch's int4/
    int8 kernels); else N:M where the weight is N:M-sparse, else CSR where at least `min_sparsity`
    of it is zero, else left a dense nn.Linear; a weight that qualifies for CSR and has more zeros
    than its N:M pattern needs goes CSR, which stores fewer values: a small weight at 95%
    unstructured zeros often fits 4:8 by chance), "nm" (NMLinear, form "nm N:M"), "csr"
    (CSRLinear, form "csr") or "quant" (QuantLinear for every quantized weight, fast way or not).
    pattern: the N:M pattern ("2:4") for "nm"/"auto"; None detects each weight's pattern: the first
    of `NM_PATTERNS` (1:4, 2:4, 4:8) it satisfies.
    min_sparsity: the fraction of zeros CSR needs, in (0, 1). The default 0.9 is where CSR beat the
    dense product at 1, 16 and 128 tokens on CPU (`benchmarks/sparse_linear.py`; below it, it loses
    at some token counts).
    targets: module names or "re:<regex>" keys choosing the layers (default: every nn.Linear).
    Without it, layers that do not qualify stay dense; with it, a chosen layer that does not
    qualify raises. Everything is checked before any module is swapped: an error changes nothing.
    """
    if not isinstance(format, str) or format not in FORMATS:
        raise RecipeError(f"format must be one of {', '.join(map(repr, FORMATS))}, got {format!r} "
                          "('auto': quantized weights as QuantLinear where fast, else N:M where the weight is N:M, "
                          "else CSR where it is sparse enough)")
    nm = parse_pattern(pattern)
    if nm is not None and format in ("csr", "quant"):
        raise RecipeError(f"pattern={pattern!r} is for format='nm' or 'auto'; "
                          + ("CSR stores any zeros" if format == "csr" else "quantized weights keep every code")
                          + " (drop pattern, or use format='nm')")
    if not isinstance(min_sparsity, (int, float)) or not 0.0 < float(min_sparsity) < 1.0:
        raise RecipeError(f"min_sparsity must be in (0, 1), got {min_sparsity!r} (0.9: layers with ≥ 90% zeros)")
    linears = {name: mod for name, mod in model.named_modules() if type(mod) is nn.Linear}
    if not linears:
        raise RecipeError(f"{type(model).__name__} has no nn.Linear layers to pack")
    names = sorted(linears) if targets is None else \
        sorted(select([targets] if isinstance(targets, str) else targets, sorted(linears)))
    patterns = [nm] if nm is not None else list(NM_PATTERNS)
    forms, zeros, slow = {}, {}, {}
    for name in names:
        w = linears[name].weight.detach()
        grid = grid_of(linears[name]) if format in ("auto", "quant") else None
        if grid is not None:
            _check_grid(name, linears[name], grid)
            why = None if format == "quant" else quant_way(grid, w.device)
            if why is None:
                forms[name] = grid.form
                continue
            slow[name] = f"{grid.form}: {why}"  # auto: no fast quantized way here; N:M or CSR may still fit
        if format == "quant":
            continue
        fit = None if format == "csr" else next(((n, m) for n, m in patterns if _is_nm(w, n, m)), None)
        if fit is not None and (format == "nm" or not _csr_beats_nm(w, *fit, min_sparsity)):
            forms[name] = f"nm {fit[0]}:{fit[1]}"
        elif format != "nm":
            zeros[name] = _zero_count(w) / max(w.numel(), 1)
            if zeros[name] >= min_sparsity:
                forms[name] = "csr"
    if targets is not None:
        _refuse_unqualified([n for n in names if n not in forms], zeros, format, pattern, min_sparsity, slow)
    for name, form in forms.items():
        w = linears[name].weight
        if form == "csr" and w.device.type == "cpu" and w.dtype not in (torch.float32, torch.float64):
            raise RecipeError(f"{name}: torch's CSR product on CPU needs float32 or float64 weights, not "
                              f"{str(w.dtype).replace('torch.', '')} (call model.float() first"
                              + (", or pack only the N:M layers with format='nm')" if format == "auto" else ")"))
    built = {}  # all before any swap
    for name, form in forms.items():
        if form == "csr":
            built[name] = CSRLinear.from_linear(linears[name])
        elif form.startswith("nm "):
            n, m = parse_pattern(form.split()[1])
            built[name] = NMLinear.from_linear(linears[name], n, m)
        else:
            built[name] = QuantLinear.from_linear(linears[name])
    for name, new in built.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return forms


def _zero_count(weight: torch.Tensor) -> int:
    return int((weight == 0).sum())  # int64: exact at any size


def _csr_beats_nm(weight: torch.Tensor, n: int, m: int, min_sparsity: float) -> bool:
    """auto's exception to N:M first: the weight qualifies for CSR and has more zeros than n:m needs
    (a 95%-sparse weight that fits 4:8 by chance, as small ones do): CSR stores fewer values."""
    zeros, size = _zero_count(weight), weight.numel()
    return zeros / max(size, 1) >= min_sparsity and zeros * m > (m - n) * size


def _refuse_unqualified(bad: list[str], zeros: dict[str, float], format: str, pattern: str | None,
                        min_sparsity: float, slow: dict[str, str] | None = None) -> None:
    if not bad:
        return
    if format == "quant":
        raise RecipeError(f"not quantized, cannot pack as QuantLinear: {', '.join(bad)} (quantize them first with "
                          "sparsify_ and GPTQConfig, RTNConfig or SparseGPTConfig(bits=...), or leave them out of "
                          "targets)")
    nm = repr(pattern) if pattern is not None else "'2:4'"
    nm_what = f"{pattern}-sparse" if pattern is not None else \
        f"N:M-sparse in any of {', '.join(f'{n}:{m}' for n, m in NM_PATTERNS)}"
    if format == "nm":
        raise RecipeError(f"not {nm_what}, cannot pack: {', '.join(bad)} (prune them with pattern={nm} first"
                          + (", pass the pattern they have" if pattern is None else "")
                          + ", or leave them out of targets)")
    listed = ", ".join(f"{name} ({zeros[name]:.0%})" for name in bad)
    if format == "csr":
        raise RecipeError(f"less than {min_sparsity:.0%} zeros, CSR would be slower than dense: {listed} "
                          "(prune them further, lower min_sparsity, or leave them out of targets)")
    quantized = [f"{name} ({slow[name]})" for name in bad if slow and name in slow]
    raise RecipeError(f"neither {nm_what} nor with at least {min_sparsity:.0%} zeros, nothing to pack them as: "
                      f"{listed} (prune them with pattern={nm} or to ≥ {min_sparsity:.0%} sparsity, lower "
                      "min_sparsity, or leave them out of targets)"
                      + (f"; quantized, but without a fast quantized product on their device: {', '.join(quantized)} "
                         "(format='quant' packs them anyway)" if quantized else ""))


def compress_nm_(model: nn.Module, pattern: str = "2:4", targets=None) -> list[str]:
    """pack_'s N:M form: each nn.Linear whose weight is `pattern`-sparse becomes an NMLinear (in
    place); `pattern=None` detects each weight's. Returns the names replaced (see pack_ for `targets`)."""
    return list(pack_(model, "nm", pattern=pattern, targets=targets))


def compress_csr_(model: nn.Module, min_sparsity: float = 0.9, targets=None) -> list[str]:
    """pack_'s CSR form: each nn.Linear with at least `min_sparsity` of its weight zero becomes a
    CSRLinear (in place). Returns the names replaced (see pack_ for `min_sparsity` and `targets`)."""
    return list(pack_(model, "csr", min_sparsity=min_sparsity, targets=targets))


def compressed_linears(model: nn.Module) -> dict[str, str]:
    """{name: class name} of the linears pack_ (or compress_nm_/compress_csr_) replaced (no nn.Linear any more)."""
    return {name: type(mod).__name__ for name, mod in model.named_modules()
            if isinstance(mod, (NMLinear, CSRLinear, QuantLinear))}
