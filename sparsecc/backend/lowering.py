"""The backend's FX rewrites: a data-free recipe's linears and attention calls, and the kernel mode.

- `rewrite_linears`: each targeted linear's weight operand becomes `weight * mask`, the mask planned
  once by the config's technique from the weight dynamo hands over.
- `lower_attention`: each targeted scaled_dot_product_attention call becomes
  torch.ops.sparsecc.window_attention, the op `sparsify_` runs, with the config's window.
- `lower_kernels`: the `kernels` argument of every sparsecc op node is set to the forced mode.
- `sparse_ops`: what the graph runs as sparsecc ops, for the debug log and the dump.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..errors import RecipeError
from ..graph.capture import LinearSite, graph_linears, module_path
from ..ops import implementation
from ..techniques.configs import technique_for
from ..techniques.pruning import check_finite


def rewrite_linears(gm: fx.GraphModule, example_inputs, assignments) -> tuple[list[torch.Tensor], list[dict]]:
    """Replace the weight operand of each targeted linear by `weight * mask`.

    Masks are computed once from the weights dynamo passed in and become extra graph inputs
    (appended after the existing ones); the caller feeds them on every call.
    """
    linears = [gl for gl in graph_linears(gm) if gl.module]
    last_input = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    masks, rewritten = [], []
    for gl in linears:
        config = assignments.get(gl.module)
        if config is None:
            continue
        w = example_inputs[gl.input_index]
        out_f, in_f = (w.shape[1], w.shape[0]) if gl.transposed else tuple(w.shape)
        site = LinearSite(gl.module, gl.module + ".weight", int(out_f), int(in_f), gl.transposed)
        view = w.detach().t() if gl.transposed else w.detach()
        check_finite(gl.module, view)
        mask = technique_for(config).plan(config, site, view, {})["mask"]
        masks.append((mask.t() if gl.transposed else mask).to(w.dtype).contiguous())
        weight_node = gl.node.args[gl.arg_index]
        with gm.graph.inserting_after(last_input):
            last_input = gm.graph.placeholder(f"sparsecc_mask_{len(masks) - 1}")
        with gm.graph.inserting_before(gl.node):
            masked = gm.graph.call_function(torch.mul, (weight_node, last_input))
        gl.node.replace_input_with(weight_node, masked)
        rewritten.append({"module": gl.module, "technique": type(config).__name__,
                          "shape": [int(out_f), int(in_f)], "sparsity": float(1 - mask.float().mean())})
    gm.graph.lint()
    gm.recompile()
    return masks, rewritten


def sdpa_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes
            if n.op == "call_function" and n.target is torch.nn.functional.scaled_dot_product_attention]


_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def sdpa_positions(q: torch.Tensor, k: torch.Tensor, is_causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_pos, k_pos) of an SDPA call: keys at 0..N-1; queries at the last T of them (a call with a
    KV cache, causal bottom-right: the window forms' assumption), or with is_causal=True at
    0..T-1 (torch's causal mask is upper-left)."""
    t, n = q.shape[-2], k.shape[-2]
    k_pos = torch.arange(n, device=q.device)
    return (torch.arange(t, device=q.device) if is_causal else k_pos[n - t:]), k_pos


def sdpa_key_mask(attn_mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """An SDPA boolean attn_mask (broadcastable to [B, H, T, N], the same for every head) as the
    window op's key_mask: [B, N] where it is the same for every query (key padding), else [B, T, N]."""
    b, t, n = q.shape[0], q.shape[-2], k.shape[-2]
    m = attn_mask[(None,) * (4 - attn_mask.dim())][:, 0]  # [B|1, T|1, N|1]
    return m[:, 0].expand(b, n) if m.shape[1] == 1 else m.expand(b, t, n)


def _mask_error(module: str, attn_mask) -> str | None:
    """Why the model's own attn_mask cannot be handed to the window op exactly (None: it can).

    Handled: no mask; a boolean mask broadcastable to [B, 1, T, N] (causal, padding, a model's own
    sliding window: the op ANDs it with the window per query and key). Refused: an additive (float)
    mask, whose values the op cannot add to the scores, and a mask that differs per head."""
    if not isinstance(attn_mask, fx.Node):
        return None
    value = attn_mask.meta["example_value"]
    if value.dtype != torch.bool:
        return (f"{module}: its scaled_dot_product_attention gets an additive {value.dtype} attn_mask, which the "
                "window attention op cannot apply; give the model a boolean mask, or apply the form with "
                "sparsecc.sparsify_(model, recipe) before compiling")
    if ([1] * (4 - value.dim()) + list(value.shape))[1] != 1:  # SDPA aligns its dims to [B, H, T, N] from the right
        return (f"{module}: its scaled_dot_product_attention gets a different attn_mask per head {list(value.shape)}, "
                "which the window attention op cannot apply; apply the form with sparsecc.sparsify_(model, recipe) "
                "before compiling")
    return None


def lower_attention(gm: fx.GraphModule, assignments) -> list[dict]:
    """Replace each targeted scaled_dot_product_attention call by torch.ops.sparsecc.window_attention
    with its config's window, dilation and sinks: positions as `sdpa_positions`, the model's own
    mask as the op's key_mask (`sdpa_key_mask`, `_mask_error`), the call's scale (default
    1/sqrt(head_dim)); grouped-query keys (enable_gqa, or fewer key heads) go to the op as they are.
    Dropout is refused: the forms are inference rewrites."""
    done = []
    for node in sdpa_nodes(gm):
        module = module_path(node)
        config = assignments.get(module)
        if config is None:
            continue
        call = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                **dict(zip(_SDPA_PARAMS, node.args)), **node.kwargs}
        q, k, v, attn_mask = call["query"], call["key"], call["value"], call["attn_mask"]
        query = q.meta["example_value"]
        if query.dim() != 4:
            raise RecipeError(f"{module}: scaled_dot_product_attention on {query.dim()}-d queries; the window "
                              "attention op takes [batch, heads, tokens, head_dim]")
        if call["dropout_p"] != 0.0:
            raise RecipeError(f"{module}: attention dropout {call['dropout_p']!r} has no window form (an inference "
                              "rewrite): compile the model in eval mode")
        reason = _mask_error(module, attn_mask)
        if reason:
            raise RecipeError(reason)
        window, dilation, sinks, _ = config.form()
        scale = call["scale"] if call["scale"] is not None else float(query.shape[-1]) ** -0.5
        with gm.graph.inserting_before(node):
            pos = gm.graph.call_function(sdpa_positions, (q, k, call["is_causal"]))
            q_pos = gm.graph.call_function(operator.getitem, (pos, 0))
            k_pos = gm.graph.call_function(operator.getitem, (pos, 1))
            key_mask = None if attn_mask is None else gm.graph.call_function(sdpa_key_mask, (attn_mask, q, k))
            out = gm.graph.create_node("call_function", torch.ops.sparsecc.window_attention,
                                       (q, k, v, q_pos, k_pos, key_mask, window, dilation, sinks, scale, None),
                                       name="window_attention")
        out.meta = dict(node.meta)  # the same value, module and source line as the call it replaces
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        done.append({"module": module, "technique": type(config).__name__, "window": window, "dilation": dilation,
                     "sinks": sinks, "op": "window_attention", "model_mask": attn_mask is not None})
    gm.graph.lint()
    gm.recompile()
    return done


def sparsecc_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The graph's torch.ops.sparsecc.* calls."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("sparsecc.")]


def _kernels_index(node: fx.Node) -> int | None:
    """Where the op of `node` takes its `kernels` argument (None: the op has one way, no argument)."""
    names = [a.name for a in getattr(node.target, "default", node.target)._schema.arguments]
    return names.index("kernels") if "kernels" in names else None


def _kernels(node: fx.Node) -> str | None:
    """The kernel mode a sparsecc op node is given (None: the ambient one at run time)."""
    i = _kernels_index(node)
    return None if i is None else (node.args[i] if len(node.args) > i else node.kwargs.get("kernels"))


def lower_kernels(gm: fx.GraphModule, mode: str) -> None:
    """Set the `kernels` argument of every sparsecc op node to `mode`, so the compiled graph runs
    that mode's way whatever the ambient mode at call time ("auto" still picks per shape then)."""
    for node in sparsecc_nodes(gm):
        i = _kernels_index(node)
        if i is None:
            continue
        if len(node.args) > i:
            node.args = (*node.args[:i], mode, *node.args[i + 1:])
        else:
            node.kwargs = {**node.kwargs, "kernels": mode}
    gm.graph.lint()
    gm.recompile()


def sparse_ops(gm: fx.GraphModule) -> list[dict]:
    """The torch.ops.sparsecc.* calls in a graph: node, op, input shapes, the kernel mode the node
    sets (None: the ambient mode) and the function it will run in that mode."""
    found = []
    for node in sparsecc_nodes(gm):
        values = [a.meta["example_value"] for a in node.args
                  if isinstance(a, fx.Node) and isinstance(a.meta.get("example_value"), torch.Tensor)]
        op, mode = str(node.target).split(".")[1], _kernels(node)
        found.append({"node": node.name, "module": module_path(node), "op": op,
                      "shapes": [list(v.shape) for v in values],
                      "dtype": str(values[0].dtype).replace("torch.", "") if values else None, "kernels": mode,
                      "runs": implementation(op, values[0].device if values else "cpu", mode)})
    return found


_PACKED = {"nm_linear": "it is compressed (NMLinear)", "csr_linear": "it is compressed (CSRLinear)",
           "quant_linear": "it is quantized (QuantLinear)", "cats_mlp": "its linears run inside the CATS MLP op"}


def packed_linears(gm: fx.GraphModule) -> dict[str, str]:
    """{module: why} of the linears the graph runs as sparsecc ops (compressed ones, CATS MLPs):
    a recipe reaching them is refused, as sparsify_ refuses it, rather than leaving them dense."""
    return {o["module"]: _PACKED[o["op"]] for o in sparse_ops(gm) if o["op"] in _PACKED and o["module"]}
