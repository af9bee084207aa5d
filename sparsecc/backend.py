"""The `sparsecc` torch.compile backend.

    torch.compile(model, backend="sparsecc", options={"recipe": {...}, "debug": True})

Registered on import and through the `torch_dynamo_backends` entry point, so no import is
needed. It rewrites the linear calls a data-free recipe targets (the weight operand becomes
`weight * mask`, the mask computed once from the weights dynamo hands over) and the attention
calls a SlidingWindowConfig (or an AttentionSinkConfig with absolute positions) targets (the
scaled_dot_product_attention gets the window mask, ANDed with the model's own), and gives the
graph to Inductor (`compile_fx`), which also provides the CPU path. Calibrated techniques, and
the rolling KV cache with positions within the cache, belong before compile:
`sparsecc.sparsify_(model, recipe, batches)`; the compiled model keeps what they did.

sparsecc's own ops (`torch.ops.sparsecc.*`, e.g. the N:M linear of `sparsecc.compress_nm_`)
stay single nodes through Inductor and run their Triton kernel or reference at call time
(option "kernels"; `sparsecc.codegen.ops`). "debug" logs them with their shapes and what each
runs; "dump" writes each graph before and after, with that list, into a folder.
"""
from __future__ import annotations

import difflib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx
from torch._dynamo import register_backend

from . import techniques as _techniques  # noqa: F401  (registers the built-in techniques by name)
from .capture import LinearSite, graph_linears, module_path
from .codegen.window_attention import allowed
from .codegen.ops import MODES, implementation, use_kernels
from .configs import technique_for
from .errors import RecipeError
from .targeting import normalize_recipe, resolve
from .techniques.pruning import check_finite

log = logging.getLogger("sparsecc")

OPTIONS = {
    "recipe": "data-free configs applied at compile time: {module name | 're:<regex>' | 'default': config}",
    "debug": "log the graph before and after the rewrite, what was rewritten and what each sparsecc op runs",
    "dump": "a folder: write each graph's code before/after the rewrite and a JSON of the rewrites and of "
            "the sparsecc ops (node, shapes, dtype, the kernel or reference it runs)",
    "inductor": "dict of Inductor config overrides passed to compile_fx",
    "kernels": "'auto' (Triton kernels on CUDA, references elsewhere), 'triton' (kernels on any device; on CPU "
               "under TRITON_INTERPRET=1) or 'reference' for the sparsecc ops in this model",
}


@dataclass
class BackendOptions:
    recipe: dict | None = None
    debug: bool = False
    dump: str | None = None
    inductor: dict = field(default_factory=dict)
    kernels: str | None = None

    @classmethod
    def parse(cls, options) -> "BackendOptions":
        options = dict(options or {})
        for key in options:
            if key not in OPTIONS:
                near = difflib.get_close_matches(key, list(OPTIONS), n=1)
                hint = f"did you mean {near[0]!r}? " if near else ""
                raise RecipeError(f"unknown sparsecc backend option {key!r}; {hint}known options: "
                                  + "; ".join(f"{k}: {v}" for k, v in OPTIONS.items()))
        opts = cls(**options)
        if opts.recipe is not None:
            opts.recipe = normalize_recipe(opts.recipe)
            for key, cfg in opts.recipe.items():
                if cfg is not None and technique_for(cfg).needs_data(cfg):
                    raise RecipeError(f"recipe[{key!r}]: {cfg} needs calibration data, which torch.compile "
                                      "cannot provide; run sparsecc.sparsify_(model, recipe, batches) before compiling")
                if cfg is not None and cfg.TARGET not in ("linear", "attention"):
                    raise RecipeError(f"recipe[{key!r}]: {type(cfg).__name__} replaces modules; apply it with "
                                      "sparsecc.sparsify_(model, recipe, batches) before compiling")
                if cfg is not None and cfg.TARGET == "attention" and cfg.form()[3] and cfg.form()[2] > 0:
                    raise RecipeError(f"recipe[{key!r}]: positions within the cache (shift_positions=True) and the "
                                      "rolling KV cache come from sparsecc.sparsify_(model, recipe) before compiling; "
                                      "at compile time use shift_positions=False or SlidingWindowConfig")
        if not isinstance(opts.debug, bool):
            raise RecipeError(f"option 'debug' must be True or False, got {opts.debug!r}")
        if opts.dump is not None and not isinstance(opts.dump, (str, os.PathLike)):
            raise RecipeError(f"option 'dump' must be a folder path, got {opts.dump!r}")
        if opts.kernels is not None and opts.kernels not in MODES:
            raise RecipeError(f"option 'kernels' must be one of {', '.join(MODES)}, got {opts.kernels!r}")
        if not isinstance(opts.inductor, dict):
            raise RecipeError(f"option 'inductor' must be a dict of Inductor config overrides, got {opts.inductor!r}")
        return opts


def _sdpa_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes
            if n.op == "call_function" and n.target is torch.nn.functional.scaled_dot_product_attention]


def windowed_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
                  window: int, dilation: int, sinks: int):
    """scaled_dot_product_attention restricted to a window (codegen/window_attention.py `allowed`):
    queries are the last q.size(-2) of the k.size(-2) positions (a cache that has evicted nothing)."""
    t, n = q.shape[-2], k.shape[-2]
    pos = torch.arange(n, device=q.device)
    keep = allowed(pos[n - t:], pos, window, dilation, sinks)  # includes causality
    if attn_mask is not None:
        keep = keep & attn_mask if attn_mask.dtype == torch.bool else torch.where(keep, attn_mask, float("-inf"))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p,
                                                            scale=scale, enable_gqa=enable_gqa)


def rewrite_attention(gm: fx.GraphModule, assignments) -> list[dict]:
    """Point each targeted scaled_dot_product_attention call at `windowed_sdpa` with its config."""
    done = []
    for node in _sdpa_nodes(gm):
        config = assignments.get(module_path(node))
        if config is None:
            continue
        window, dilation, sinks, _ = config.form()
        node.target = windowed_sdpa
        node.kwargs = {**node.kwargs, "window": window, "dilation": dilation, "sinks": sinks}
        done.append({"module": module_path(node), "technique": type(config).__name__, "window": window,
                     "dilation": dilation, "sinks": sinks})
    gm.graph.lint()
    gm.recompile()
    return done


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


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph)


def sparse_ops(gm: fx.GraphModule, kernels: str | None = None) -> list[dict]:
    """The torch.ops.sparsecc.* calls in a graph: node, op, input shapes and the function each will
    run (its Triton kernel or its CPU path) under kernel mode `kernels` (None: the current mode)."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("sparsecc."):
            values = [a.meta["example_value"] for a in node.args
                      if isinstance(a, fx.Node) and isinstance(a.meta.get("example_value"), torch.Tensor)]
            op = str(node.target).split(".")[1]
            found.append({"node": node.name, "module": module_path(node), "op": op,
                          "shapes": [list(v.shape) for v in values],
                          "dtype": str(values[0].dtype).replace("torch.", "") if values else None,
                          "runs": implementation(op, values[0].device if values else "cpu", kernels)})
    return found


def _dump(folder: str, before: str, gm: fx.GraphModule, rewrites: list[dict], ops: list[dict]) -> Path:
    """Write graph-<k>.before.py / .after.py (the graph's code) and graph-<k>.json (what was rewritten
    and lowered) into `folder`; k counts the graphs dumped there."""
    out = Path(folder).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    k = len(list(out.glob("graph-*.json")))
    (out / f"graph-{k}.before.py").write_text(before)
    (out / f"graph-{k}.after.py").write_text(gm.code)
    path = out / f"graph-{k}.json"
    path.write_text(json.dumps({"rewrites": rewrites, "sparsecc_ops": ops}, indent=1, default=str))
    return path


_PACKED = {"nm_linear": "it is compressed (NMLinear)", "csr_linear": "it is compressed (CSRLinear)",
           "cats_mlp": "its linears run inside the CATS MLP op"}


def _packed_linears(gm: fx.GraphModule) -> dict[str, str]:
    """{module: why} of the linears the graph runs as sparsecc ops (compressed ones, CATS MLPs):
    a recipe reaching them is refused, as sparsify_ refuses it, rather than leaving them dense."""
    return {o["module"]: _PACKED[o["op"]] for o in sparse_ops(gm) if o["op"] in _PACKED and o["module"]}


def sparsecc_backend(gm: fx.GraphModule, example_inputs, options=None, mode=None):
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    opts = BackendOptions.parse(options)
    patches = dict(list_mode_options(mode)) if mode else {}
    patches.update(opts.inductor)
    masks: list[torch.Tensor] = []
    before, done = gm.code, []
    if opts.recipe:
        if opts.debug:
            log.warning("sparsecc: graph before rewrite:\n%s", gm.graph)
        gm = _copy(gm)  # dynamo still reads its own graph after we return: rewrite a copy
        packed = _packed_linears(gm)
        assignments = resolve(opts.recipe, {"linear": sorted({gl.module for gl in graph_linears(gm) if gl.module}
                                                             | set(packed)),
                                            "attention": sorted({module_path(n) for n in _sdpa_nodes(gm)} - {""})})
        hit = [n for n in packed if n in assignments]
        if hit:
            raise RecipeError(f"{hit[0]}{f' and {len(hit) - 1} more' if len(hit) > 1 else ''} cannot be pruned at "
                              f"compile time: {packed[hit[0]]}, run as one sparsecc op with no weight to mask; prune "
                              f"before compressing or rewriting (sparsify_), or skip it with {{{hit[0]!r}: None}}")
        masks, done = rewrite_linears(gm, example_inputs, assignments)
        done += rewrite_attention(gm, assignments)
        if opts.debug:
            log.warning("sparsecc: rewrote %d calls: %s\ngraph after:\n%s", len(done), done, gm.graph)
    ops = sparse_ops(gm, opts.kernels)
    if opts.debug:
        log.warning("sparsecc: sparsecc ops in the graph (kernels=%s):%s", opts.kernels or "auto",
                    "".join(f"\n  {o['module'] or o['node']}: {o['op']} {o['dtype']} {o['shapes']} -> {o['runs']}"
                            for o in ops)
                    or " none")
    if opts.dump:
        log.warning("sparsecc: graph dumped to %s", _dump(opts.dump, before, gm, done, ops))
    compiled = compile_fx(gm, list(example_inputs) + masks, config_patches=patches or None)
    if not masks and opts.kernels is None:
        return compiled

    def run(*args):
        if opts.kernels is None:
            return compiled(*args, *masks)
        with use_kernels(opts.kernels):
            return compiled(*args, *masks)

    return run


def _register() -> None:
    from torch._dynamo.backends import registry

    # Skip when already registered, or when dynamo found our entry point and is importing us to
    # register it itself (registering twice raises "duplicate name").
    if "sparsecc" in registry._COMPILER_FNS or registry._BACKENDS.get("sparsecc") is not None:
        return
    register_backend(sparsecc_backend, name="sparsecc")


_register()
