"""Compressed N:M storage: the N kept values of every group of M inputs plus their positions.

A weight [out, in] with exactly N nonzeros per group of M (fewer only where kept weights are
exactly zero) becomes `values` [out, in·N/M] (the kept weights in input order) and `index`,
the position 0..M-1 of each kept value inside its group, packed into uint8 with
ceil(log2 M) bits each rounded up to 1, 2, 4 or 8 (2 bits per value for 2:4, as the hardware
format of seed 004 stores its metadata).
"""
from __future__ import annotations

import math

import torch

from ..errors import PlanError


def index_bits(m: int) -> int:
    bits = max(1, math.ceil(math.log2(m)))
    for b in (1, 2, 4, 8):
        if bits <= b:
            return b
    raise PlanError(f"N:M with M={m} is too wide for the compressed format (M <= 256)")


def compress(weight: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, packed index) of an N:M-sparse `weight`; raises if a group has more than N nonzeros."""
    rows, cols = weight.shape
    if cols % m:
        raise PlanError(f"cannot compress {n}:{m}: input width {cols} is not a multiple of {m}")
    groups = weight.reshape(rows, cols // m, m)
    nonzero = groups != 0
    if nonzero.numel() and int(nonzero.sum(-1).max()) > n:
        raise PlanError(f"weight is not {n}:{m} sparse (a group of {m} has more than {n} nonzeros)")
    # positions of the kept entries: nonzeros first, then (for short groups) the lowest zero slots
    order = torch.argsort((~nonzero).to(torch.int8) * m + torch.arange(m, device=weight.device), dim=-1, stable=True)[..., :n]
    index = order.sort(dim=-1).values                                  # [rows, groups, n], ascending
    values = groups.gather(-1, index).reshape(rows, -1)
    return values.contiguous(), _pack(index.reshape(rows, -1).to(torch.uint8), index_bits(m))


def decompress(values: torch.Tensor, packed: torch.Tensor, n: int, m: int, in_features: int,
               check: bool = True) -> torch.Tensor:
    """The dense [out, in_features] weight back from `compress`'s output (`check=False` skips the
    data-dependent index check, for code that torch.compile traces)."""
    rows = values.shape[0]
    if values.shape[1] * m != in_features * n:
        raise PlanError(f"compressed {n}:{m} values of width {values.shape[1]} do not fit {in_features} inputs")
    if check:  # an untrusted index (a checkpoint): the dtype and shape compress gives it
        want = [rows, -(-values.shape[1] // (8 // index_bits(m)))]
        if packed.dtype != torch.uint8 or list(packed.shape) != want:
            raise PlanError(f"compressed {n}:{m} index has dtype {packed.dtype} and shape {list(packed.shape)}; "
                            f"expected torch.uint8 of shape {want}")
    index = _unpack(packed, index_bits(m), values.shape[1]).long().reshape(rows, in_features // m, n)
    if check and index.numel() and int(index.max()) >= m:
        raise PlanError(f"corrupt {n}:{m} index (position >= {m})")
    dense = torch.zeros(rows, in_features // m, m, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, index, values.reshape(rows, in_features // m, n))
    return dense.reshape(rows, in_features)


def _pack(index: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    rows, width = index.shape
    pad = (-width) % per
    x = torch.nn.functional.pad(index, (0, pad)).reshape(rows, -1, per).to(torch.int32)
    shifts = torch.arange(per, dtype=torch.int32, device=index.device) * bits
    return (x << shifts).sum(-1).to(torch.uint8)


def _unpack(packed: torch.Tensor, bits: int, width: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    x = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return x.reshape(packed.shape[0], -1)[:, :width]
