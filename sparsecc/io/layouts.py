"""How one pruned or quantized weight is stored in a compressed checkpoint (`io/checkpoint.py`).

Each layout is a few tensors plus a sparsecc.json entry (shape [out, in], dtype, transposed, and the
layout's own fields), always in [out, in] orientation:

    nm           kept values [out, in·N/M] + packed positions (`codegen/nm_format.py`)
    bitmask      kept values (row-major, 1-D) + bitmask [out, ceil(in/8)] (`codegen/bitmask.py`)
    int          packed codes + scales + zeros (`prune/int_format.py`)
    int-bitmask  packed codes of the kept weights only + scales + zeros + bitmask
    int-nm       packed codes of the N kept per group + scales + zeros + packed positions

`compress_weight` picks the smallest layout that fits; `expand_weight` rebuilds the weight bit for
bit (pruned zeros as +0.0) and its QuantGrid (`read_grid`: a grid alone); `entry_error` validates
an entry read from disk.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..codegen.bitmask import pack_bits, packed_cols, unpack_bits
from ..codegen.nm_format import compress as nm_compress
from ..codegen.nm_format import decompress as nm_decompress
from ..errors import PlanError
from ..prune.int_format import BITS, pack_codes, packed_width, unpack_codes
from ..prune.masks import parse_pattern
from ..prune.quantize import QuantGrid

LAYOUTS = ("nm", "bitmask", "int", "int-bitmask", "int-nm")


def weight_entry(p: torch.Tensor, row: dict) -> dict:
    """What every stored form records: the [out, in] shape, the dtype, whether the parameter is [in, out]."""
    transposed = bool(row.get("transposed"))
    return {"shape": list(p.shape[::-1] if transposed else p.shape), "dtype": _dtype_name(p.dtype),
            "transposed": transposed}


def grid_fields(grid: QuantGrid) -> dict:
    return {"bits": grid.bits, "group_size": grid.group_size, "sym": bool(grid.sym)}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def compress_weight(p: torch.Tensor, row: dict, grid: QuantGrid | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(sparsecc.json entry, tensors) of one weight stored compressed, in [out, in] orientation."""
    entry = weight_entry(p, row)
    nm = parse_pattern((row.get("config") or {}).get("pattern"))
    if grid is None:
        w = p.detach().cpu()
        w = w.t() if entry["transposed"] else w
        if nm is not None:  # _check_row made sure it is N:M
            values, index = nm_compress(w, *nm)
            return entry | {"layout": "nm", "n": nm[0], "m": nm[1]}, {"values": values, "index": index}
        keep = w != 0
        return entry | {"layout": "bitmask"}, {"values": w[keep], "bitmask": pack_bits(keep)}
    entry |= grid_fields(grid)
    rows, cols = entry["shape"]
    codes = grid.unpacked()
    keep = codes != grid.zeros.repeat_interleave(grid.group_size, dim=1)  # code == zero point: exactly 0
    base = {"scales": grid.scales, "zeros": grid.zeros}
    if nm is not None and _fits_nm(keep, *nm):  # the N kept codes of each group + their positions
        n, m = nm
        _, index = nm_compress(keep.to(torch.uint8), n, m)
        sel = _nm_selected(index, rows, cols, n, m)
        kept = codes[sel].reshape(rows, cols * n // m)
        return entry | {"layout": "int-nm", "n": n, "m": m}, base | {"codes": pack_codes(kept, grid.bits), "index": index}
    nnz = int(keep.sum())
    if packed_width(grid.bits, nnz) + rows * packed_cols(cols) < rows * packed_width(grid.bits, cols):
        kept = pack_codes(codes[keep][None], grid.bits)  # one row: the kept codes in row-major order
        return entry | {"layout": "int-bitmask"}, base | {"codes": kept, "bitmask": pack_bits(keep)}
    return entry | {"layout": "int"}, base | {"codes": grid.codes}


def _fits_nm(keep: torch.Tensor, n: int, m: int) -> bool:
    rows, cols = keep.shape
    return cols % m == 0 and (keep.numel() == 0 or int(keep.reshape(rows, -1, m).sum(-1).max()) <= n)


def _nm_selected(index: torch.Tensor, rows: int, cols: int, n: int, m: int) -> torch.Tensor:
    """bool [rows, cols]: the positions a packed N:M index selects (N per group, in row-major order)."""
    ones = torch.ones(rows, cols * n // m, dtype=torch.uint8)
    return nm_decompress(ones, index, n, m, cols).bool()


def entry_error(info, compressed: bool) -> str | None:
    """What is wrong with a format-2 "compressed" (or "quantized") entry, None if nothing."""
    if not isinstance(info, dict):
        return f"must be a dict, not {type(info).__name__}"
    shape, layout = info.get("shape"), info.get("layout") if compressed else "int"
    if layout not in LAYOUTS:
        return f"has layout {layout!r}; expected one of {', '.join(LAYOUTS)}"
    if not is_shape(shape):
        return f"has a bad 'shape' {shape!r} (expected [out, in])"
    if not isinstance(info.get("transposed"), bool):
        return f"has a bad 'transposed' {info.get('transposed')!r}"
    if not isinstance(info.get("dtype"), str) or not float_dtype(info["dtype"]):
        return f"has dtype {info.get('dtype')!r}; expected a floating-point torch dtype such as 'float32'"
    if layout.endswith("nm"):
        n, m = info.get("n"), info.get("m")
        if not (type(n) is int and type(m) is int and 0 < n <= m <= 256 and shape[1] % m == 0):
            return f"must have N:M ints n <= m <= 256 with m dividing the width {shape[1]}, not n={n!r}, m={m!r}"
    if layout.startswith("int"):
        bits, g, sym = info.get("bits"), info.get("group_size"), info.get("sym")
        if bits not in BITS or type(bits) is not int:
            return f"has bits {bits!r}; expected one of {', '.join(map(str, BITS))}"
        if not (type(g) is int and g > 0 and shape[1] % g == 0) or not isinstance(sym, bool):
            return f"must have a group_size dividing the width {shape[1]} and a bool sym, not {g!r}, {sym!r}"
    return None


def float_dtype(name: str) -> torch.dtype | None:
    dtype = getattr(torch, name, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def is_shape(shape) -> bool:
    return isinstance(shape, list) and len(shape) == 2 and all(type(v) is int and v >= 0 for v in shape)


def getter(file: Path, name: str, tensors: dict[str, torch.Tensor]):
    def get(key: str) -> torch.Tensor:
        try:
            return tensors[f"{name}.{key}"]
        except KeyError:
            raise PlanError(f"{str(file)!r} lacks {f'{name}.{key}'!r}") from None
    return get


def expand_weight(file: Path, name: str, info: dict, tensors: dict[str, torch.Tensor]):
    """(dense weight as the model stores it, QuantGrid or None) of a compressed parameter."""
    get = getter(file, name, tensors)
    layout = info.get("layout", "nm")  # format 1: N:M only, no shape or dtype recorded
    rows, cols = info["shape"] if "shape" in info else (None, info["in_features"])
    dtype = float_dtype(info["dtype"]) if "dtype" in info else None
    grid = None
    try:
        if layout.startswith("int"):
            grid, w = read_grid(info, get)
        elif layout == "nm":
            values = get("values")
            if values.dim() != 2 or not values.is_floating_point() or dtype not in (None, values.dtype):
                raise PlanError(f"values are {values.dtype} {list(values.shape)}; expected a 2-D "
                                f"{dtype or 'floating-point'} tensor")
            w = nm_decompress(values, get("index"), info["n"], info["m"], cols)
        else:  # bitmask
            values, keep = get("values"), unpack_bits(get("bitmask"), cols)
            if values.dtype != dtype or values.dim() != 1 or values.numel() != int(keep.sum()):
                raise PlanError(f"values are {values.dtype} {list(values.shape)}; expected {dtype} "
                                f"[{int(keep.sum())}] (one per set bit of the bitmask)")
            w = torch.zeros(keep.shape, dtype=dtype)
            w[keep] = values
        if rows is not None and list(w.shape) != [rows, cols]:
            raise PlanError(f"it unpacks to {list(w.shape)}, not the recorded {[rows, cols]}")
    except PlanError as e:
        raise PlanError(f"compressed {name!r}: {e}; re-save the checkpoint") from None
    return (w.t() if info["transposed"] else w), grid


def read_grid(info: dict, get) -> tuple[QuantGrid, torch.Tensor]:
    """(QuantGrid, its dequantized weight [out, in] in the entry's dtype) of a quantized parameter
    (layout "int" for a grid kept beside a dense weight)."""
    layout, (rows, cols) = info.get("layout", "int"), info["shape"]
    bits, g = info["bits"], info["group_size"]
    scales, zeros = get("scales"), get("zeros")
    want = [rows, cols // g]
    if (scales.dtype, zeros.dtype) != (torch.float32, torch.uint8) or [list(scales.shape), list(zeros.shape)] != [want] * 2:
        raise PlanError(f"scales {scales.dtype} {list(scales.shape)} and zeros {zeros.dtype} {list(zeros.shape)} "
                        f"must be torch.float32 and torch.uint8 {want}")
    if layout == "int":
        codes = unpack_codes(get("codes"), bits, cols)
        if codes.shape[0] != rows:
            raise PlanError(f"codes have {codes.shape[0]} rows, not {rows}")
    else:
        codes = zeros.repeat_interleave(g, dim=1)  # the code of a pruned weight is its zero point
        if layout == "int-bitmask":
            keep = unpack_bits(get("bitmask"), cols)
            if keep.shape[0] != rows:
                raise PlanError(f"the bitmask has {keep.shape[0]} rows, not {rows}")
            count = int(keep.sum())
            codes[keep] = unpack_codes(get("codes"), bits, count).reshape(count)
        else:  # int-nm
            n, m = info["n"], info["m"]
            sel = _nm_selected(get("index"), rows, cols, n, m)
            codes[sel] = unpack_codes(get("codes"), bits, cols * n // m).reshape(-1)
    if codes.numel() and max(int(codes.max()), int(zeros.max())) >= 2 ** bits:
        raise PlanError(f"codes or zero points exceed {bits} bits")
    grid = QuantGrid(bits, g, info["sym"], pack_codes(codes, bits), scales, zeros, cols)
    return grid, grid.dequantize().to(float_dtype(info["dtype"]))
