"""Gated MLPs found on the dynamo graph: y = down(act(gate(x)) * up(x)); and plain ones, y = down(act(up(x))).

Llama, Mistral, Qwen, Gemma and the experts of Mixtral compute their MLP this way (SwiGLU when
act is SiLU; seed 000, "Dynamic Sparsification"). The pattern is matched on the graph — a linear
whose input is the product of act(linear G) and linear U, G and U reading the same tensor — so
no model family or attribute name is assumed. The MLP module is the common parent of the three
linears; they must be its direct children, so the module can be swapped as a whole.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

_MULS = {operator.mul, torch.mul}


@dataclass(frozen=True)
class GatedMLP:
    name: str   # the MLP module
    gate: str   # child names of its three linears
    up: str
    down: str
    act: str    # a key of codegen.cats_mlp.ACTIVATIONS

    def to_dict(self) -> dict:
        return {"name": self.name, "gate": self.gate, "up": self.up, "down": self.down, "act": self.act}


@dataclass(frozen=True)
class PlainMLP:
    """down(act(up(x))) (OPT's fc1/fc2): `down`'s input channels are `up`'s outputs, elementwise
    (channels.py found the path), with no other use."""

    name: str
    up: str
    down: str

    def to_dict(self) -> dict:
        return {"kind": "mlp", "name": self.name, "up": self.up, "down": self.down}


def plain_mlp(up: str, down: str) -> PlainMLP | None:
    """The PlainMLP if the two linears are direct children of one (non-root) module, else None."""
    parents = {n.rpartition(".")[0] for n in (up, down)}
    if len(parents) != 1 or parents == {""}:
        return None
    return PlainMLP(parents.pop(), up.rpartition(".")[2], down.rpartition(".")[2])


def _act_name(node: fx.Node) -> str | None:
    if node.op != "call_function":
        return None
    if node.target is F.silu:
        return "silu"
    if node.target is F.relu or node.target is torch.relu:
        return "relu"
    if node.target is F.gelu:
        return "gelu_tanh" if node.kwargs.get("approximate", "none") == "tanh" else "gelu"
    return None


def find_gated(linears) -> list[tuple[str, str, str, str]]:
    """(gate module, up module, down module, act) for every gated MLP among a graph's GraphLinears."""
    by_node = {gl.node: gl for gl in linears}
    found = []
    for down in linears:
        x = down.node.args[down.x_index]
        if not (isinstance(x, fx.Node) and x.op == "call_function" and x.target in _MULS and len(x.args) == 2):
            continue
        for a, b in (x.args, x.args[::-1]):
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node) and b in by_node):
                continue
            act = _act_name(a)
            if act is None or not a.args or a.args[0] not in by_node:
                continue
            gate, up = by_node[a.args[0]], by_node[b]
            if gate.node.args[gate.x_index] is not up.node.args[up.x_index] or len(a.users) != 1:
                continue
            found.append((gate.module, up.module, down.module, act))
            break
    return found


def gated_mlp(gate: str, up: str, down: str, act: str) -> GatedMLP | None:
    """The GatedMLP if the three linears are direct children of one module, else None."""
    parents = {n.rpartition(".")[0] for n in (gate, up, down)}
    if len(parents) != 1 or parents == {""}:  # not siblings, or the MLP is the root module
        return None
    parent = parents.pop()
    child = lambda n: n.rpartition(".")[2]  # noqa: E731
    return GatedMLP(parent, child(gate), child(up), child(down), act)
