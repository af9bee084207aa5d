"""Which linears feed a linear's input channel for channel (for N:M channel permutation).

Permuting the input columns of a linear C changes nothing in the model's function if the
output rows of every linear P that produces C's input are permuted the same way -- provided
the path from the Ps to C is elementwise (activations, gating products, casts, reshapes that
keep the last dimension) and the Ps' outputs go nowhere else. Llama's gate/up -> down_proj,
GPT-2's c_fc -> c_proj and OPT's fc1 -> fc2 qualify; o_proj (its input mixes heads through
attention) and anything fed by the residual stream do not. Found on the dynamo graph, so no
model family is named here.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

_FUNCS = {F.silu, F.gelu, F.relu, F.leaky_relu, F.elu, F.mish, F.dropout, torch.relu, torch.tanh, torch.sigmoid,
          torch.mul, torch.add, torch.sub, torch.div, torch.pow, torch.neg, torch.erf, torch.exp,
          operator.mul, operator.add, operator.sub, operator.truediv, operator.neg, operator.pow}
_METHODS = {"mul", "add", "sub", "div", "pow", "tanh", "sigmoid", "relu", "neg", "exp", "erf", "to", "float",
            "half", "bfloat16", "type_as", "contiguous", "__mul__", "__add__", "__rmul__", "__radd__"}
_RESHAPES = {"view", "reshape"}


def _val(node):
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


def _width(node) -> int | None:
    v = _val(node)
    return int(v.shape[-1]) if isinstance(v, torch.Tensor) and v.dim() > 0 else None


def feeding_linears(consumer: fx.Node, x: fx.Node, linear_nodes: set[fx.Node]) -> list[fx.Node] | None:
    """The linear nodes whose outputs reach `x` (the consumer's input) channel for channel, or
    None if the path is not purely elementwise or leaks to other users."""
    channels = _width(x)
    if channels is None:
        return None
    visited: set[fx.Node] = set()
    producers: list[fx.Node] = []

    def walk(node) -> bool:
        if node in visited:
            return True
        visited.add(node)
        if node in linear_nodes:
            producers.append(node)
            return True
        if node.op == "call_function" and node.target in _FUNCS:
            pass
        elif node.op == "call_method" and node.target in _METHODS:
            pass
        elif (node.op == "call_method" and node.target in _RESHAPES
              or node.op == "call_function" and node.target is torch.reshape):
            if _width(node.args[0]) != channels:
                return False
            return walk(node.args[0])
        else:
            return False
        for a in list(node.args) + list(node.kwargs.values()):
            if isinstance(a, fx.Node):
                v = _val(a)
                if not isinstance(v, torch.Tensor):
                    continue
                if v.dim() == 0:
                    continue  # a scalar tensor: unaffected by permutation
                if v.shape[-1] != channels or not walk(a):
                    return False
        return True

    if not walk(x) or not producers:
        return None
    allowed = visited | {consumer}
    if any(u not in allowed and isinstance(_val(u), torch.Tensor) for n in visited for u in n.users):
        return None  # some intermediate (or a producer's output) is used elsewhere
    return producers
