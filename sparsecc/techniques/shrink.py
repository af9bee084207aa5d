"""Shrinking modules for real: the linear surgery of structured pruning (structured.py).

A *unit* is what structured pruning removes: an intermediate channel of an MLP, or a query head
(or a whole key/value group) of an attention module. Its weights are rows of the *producers*
(gate and up, or q — and k, v for whole groups) and columns of the *consumer* (down, or o):
`width` consecutive ones per unit (1 for a channel, head_dim for a head). Removing units builds
smaller nn.Linears; nothing is masked.
"""
from __future__ import annotations

import torch
from torch import nn

from ..graph.gated import GatedMLP, PlainMLP
from ..graph.heads import AttentionHeads

#: attention-module attributes that count heads (OPT's num_heads, Llama's num_key_value_groups),
#: updated when heads go; those not on a module are skipped
HEAD_ATTRS = ("num_heads", "num_attention_heads")
KV_ATTRS = ("num_key_value_heads", "num_kv_heads")
GROUP_ATTRS = ("num_key_value_groups",)


def producers(spec) -> list[str]:
    """Child names of the linears whose output rows are the units (query heads for attention)."""
    if isinstance(spec, GatedMLP):
        return [spec.gate, spec.up]
    if isinstance(spec, PlainMLP):
        return [spec.up]
    return [spec.q]


def consumer(spec) -> str:
    return spec.o if isinstance(spec, AttentionHeads) else spec.down


def width(spec) -> int:
    return spec.head_dim if isinstance(spec, AttentionHeads) else 1


def columns(units: torch.Tensor, w: int) -> torch.Tensor:
    """The rows/columns of units `units` (ascending) when each spans `w` consecutive ones."""
    return (units[:, None] * w + torch.arange(w, device=units.device)).reshape(-1)


def linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def rows(lin: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    """A new nn.Linear computing only the output features `keep` of `lin`."""
    return linear(lin.weight.detach()[keep], None if lin.bias is None else lin.bias.detach()[keep])


def shrink(model: nn.Module, spec, keep: torch.Tensor, keep_kv: torch.Tensor | None,
           weight: torch.Tensor, bias: torch.Tensor | None, swap) -> None:
    """Replace the spec's linears by ones holding only units `keep` (and, for attention, key/value
    heads `keep_kv`: None keeps all); the consumer gets `weight` [out, kept columns] and `bias`.
    `swap(name, module)` puts a module in place (a Transaction's, to be undone)."""
    module = model.get_submodule(spec.name)
    cols = columns(keep, width(spec))
    for child in producers(spec):
        swap(f"{spec.name}.{child}", rows(getattr(module, child), cols))
    if keep_kv is not None:
        kv_cols = columns(keep_kv, spec.head_dim)
        for child in (spec.k, spec.v):
            swap(f"{spec.name}.{child}", rows(getattr(module, child), kv_cols))
    swap(f"{spec.name}.{consumer(spec)}", linear(weight, bias))


def head_counts(module: nn.Module, spec: AttentionHeads, heads: int, kv_heads: int, set_attr) -> None:
    """Set the attention module's head-count attributes to the new counts (`set_attr(obj, name,
    value)` records the old value); an attribute holding another value is left alone."""
    new = {HEAD_ATTRS: heads, KV_ATTRS: kv_heads, GROUP_ATTRS: heads // kv_heads}
    old = {HEAD_ATTRS: spec.heads, KV_ATTRS: spec.kv_heads, GROUP_ATTRS: spec.groups}
    for names, value in new.items():
        for attr in names:
            if isinstance(getattr(module, attr, None), int) and getattr(module, attr) == old[names]:
                set_attr(module, attr, value)
