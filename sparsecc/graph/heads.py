"""Attention heads found on the dynamo graph, for structured pruning of heads.

For each scaled_dot_product_attention call, the linears whose outputs reach its query, key and
value (walking back through reshapes, RoPE, norms: anything but another linear) and the linear
that first consumes its output (o_proj) are the head projections, if each is one distinct linear
and the four are children of one module. The SDPA query is [B, H, T, D]: D (head_dim) comes from
the graph; H = q.out_features / D and H_kv = k.out_features / D from the weights. A fused QKV
projection (GPT-2's c_attn) reaches all three operands through one linear, so it is not found.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

SDPA = torch.nn.functional.scaled_dot_product_attention
_MAX_WALK = 256  # nodes visited per operand: the path from a projection to SDPA is short


@dataclass(frozen=True)
class AttentionHeads:
    name: str       # the attention module
    q: str          # child names of its four projections
    k: str
    v: str
    o: str
    heads: int      # query heads
    kv_heads: int   # key/value heads (grouped-query attention: heads // kv_heads queries per group)
    head_dim: int

    @property
    def groups(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads

    def to_dict(self) -> dict:
        return {"kind": "heads", "name": self.name, "q": self.q, "k": self.k, "v": self.v, "o": self.o,
                "heads": self.heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim}


def _walk(start: fx.Node, linear_nodes, forward: bool) -> set[fx.Node] | None:
    """The linear nodes nearest `start` (backwards through inputs, or forwards through users)."""
    found, seen, todo = set(), set(), [start]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if len(seen) > _MAX_WALK:
            return None
        if node is not start and node in linear_nodes:
            found.add(node)
            continue
        if forward:
            todo += list(node.users)
        else:
            todo += [a for a in node.all_input_nodes if a.op != "placeholder"]
    return found


def find_heads(gm: fx.GraphModule, linears) -> list[tuple[str, str, str, str, int]]:
    """(q, k, v, o module, head_dim) for each SDPA call whose projections are distinct linears."""
    by_node = {gl.node: gl for gl in linears}
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not SDPA:
            continue
        operands = [node.kwargs.get(k, node.args[i] if len(node.args) > i else None)
                    for i, k in enumerate(("query", "key", "value"))]
        if not all(isinstance(a, fx.Node) for a in operands):
            continue
        q_val = operands[0].meta.get("example_value")
        if not isinstance(q_val, torch.Tensor) or q_val.dim() != 4:
            continue
        projections = [_walk(a, by_node, forward=False) for a in operands] + [_walk(node, by_node, forward=True)]
        if not all(p is not None and len(p) == 1 for p in projections):
            continue
        nodes = [p.pop() for p in projections]
        out = by_node[nodes[3]]
        if len(set(nodes)) != 4 or not _consumes(out, node):
            continue
        found.append((*(by_node[n].module for n in nodes), int(q_val.shape[-1])))
    return found


def _consumes(gl, sdpa: fx.Node) -> bool:
    """Whether the attention output reaches the linear as its input (not as its weight)."""
    x = gl.node.args[gl.x_index]
    return isinstance(x, fx.Node) and (x is sdpa or bool(_walk(sdpa, {x}, forward=True)))


def attention_heads(q: str, k: str, v: str, o: str, head_dim: int, sites) -> AttentionHeads | None:
    """The AttentionHeads if the four projections are sites, children of one module, with whole
    heads and whole groups; else None."""
    names = (q, k, v, o)
    parents = {n.rpartition(".")[0] for n in names}
    if len(parents) != 1 or parents == {""} or not all(n in sites for n in names):
        return None
    qs, ks, vs, os_ = (sites[n] for n in names)
    if head_dim < 1 or qs.out_features % head_dim or ks.out_features % head_dim:
        return None
    heads, kv_heads = qs.out_features // head_dim, ks.out_features // head_dim
    if vs.out_features != ks.out_features or os_.in_features != qs.out_features or heads % kv_heads:
        return None
    child = lambda n: n.rpartition(".")[2]  # noqa: E731
    return AttentionHeads(parents.pop(), *(child(n) for n in names), heads, kv_heads, head_dim)
