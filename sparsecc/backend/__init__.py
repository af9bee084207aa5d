"""The `sparsecc` torch.compile backend.

    torch.compile(model, backend="sparsecc", options={"recipe": {...}, "kernels": "triton", "debug": True})

Registered on import and through the `torch_dynamo_backends` entry point, so no import is
needed. It lowers the graph dynamo hands over (lowering.py), then gives it to Inductor
(`compile_fx`), which also provides the CPU path:
- the linear calls a data-free recipe targets: the weight operand becomes `weight * mask`, the
  mask computed once from the weights;
- the scaled_dot_product_attention calls a SlidingWindowConfig (or an AttentionSinkConfig with
  absolute positions) targets: torch.ops.sparsecc.window_attention, the op sparsify_ runs, with
  the model's own boolean mask as its key mask;
- option "kernels": every sparsecc op node (`torch.ops.sparsecc.*`, e.g. the N:M linear of
  `sparsecc.compress_nm_`) gets that kernel mode as its `kernels` argument, so the graph itself
  says which way each op runs (`sparsecc.ops`); without it the ops follow the ambient mode.
sparsecc's ops stay single nodes through Inductor. Calibrated techniques, module rewrites, and
the rolling KV cache with positions within the cache belong before compile:
`sparsecc.sparsify_(model, recipe, batches)`; the compiled model keeps what they did.
"debug" logs the graphs and the sparsecc ops with their shapes and what each runs; "dump" writes
each graph before and after (graph-<k>.before.py / .after.py) and that list (graph-<k>.json).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch.fx as fx
from torch._dynamo import register_backend

from .. import techniques as _techniques  # noqa: F401  (registers the built-in techniques by name)
from ..errors import RecipeError
from ..graph.capture import graph_linears, module_path
from ..techniques.targeting import resolve
from .lowering import lower_attention, lower_kernels, packed_linears, rewrite_linears, sdpa_nodes, sparse_ops
from .options import OPTIONS, BackendOptions

__all__ = ["OPTIONS", "BackendOptions", "sparsecc_backend"]

log = logging.getLogger("sparsecc")


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph)


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


def _apply_recipe(gm: fx.GraphModule, example_inputs, recipe: dict) -> tuple[list, list[dict]]:
    """Mask the linears and lower the attention calls `recipe` assigns (lowering.py): (masks, rewrites)."""
    packed = packed_linears(gm)
    assignments = resolve(recipe, {"linear": sorted({gl.module for gl in graph_linears(gm) if gl.module} | set(packed)),
                                   "attention": sorted({module_path(n) for n in sdpa_nodes(gm)} - {""})})
    hit = [n for n in packed if n in assignments]
    if hit:
        raise RecipeError(f"{hit[0]}{f' and {len(hit) - 1} more' if len(hit) > 1 else ''} cannot be pruned at "
                          f"compile time: {packed[hit[0]]}, run as one sparsecc op with no weight to mask; prune "
                          f"before compressing or rewriting (sparsify_), or skip it with {{{hit[0]!r}: None}}")
    masks, done = rewrite_linears(gm, example_inputs, assignments)
    return masks, done + lower_attention(gm, assignments)


def sparsecc_backend(gm: fx.GraphModule, example_inputs, options=None, mode=None):
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    opts = BackendOptions.parse(options)
    patches = dict(list_mode_options(mode)) if mode else {}
    patches.update(opts.inductor)
    masks: list = []
    before, done = gm.code, []
    if opts.recipe or opts.kernels:
        if opts.debug:
            log.warning("sparsecc: graph before lowering:\n%s", gm.graph)
        gm = _copy(gm)  # dynamo still reads its own graph after we return: lower a copy
        if opts.recipe:
            masks, done = _apply_recipe(gm, example_inputs, opts.recipe)
        if opts.kernels:
            lower_kernels(gm, opts.kernels)
        if opts.debug:
            log.warning("sparsecc: rewrote %d calls: %s\ngraph after:\n%s", len(done), done, gm.graph)
    ops = sparse_ops(gm)
    if opts.debug:
        log.warning("sparsecc: sparsecc ops in the graph:%s",
                    "".join(f"\n  {o['module'] or o['node']}: {o['op']} {o['dtype']} {o['shapes']} "
                            f"kernels={o['kernels'] or 'ambient'} -> {o['runs']}" for o in ops) or " none")
    if opts.dump:
        log.warning("sparsecc: graph dumped to %s", _dump(opts.dump, before, gm, done, ops))
    compiled = compile_fx(gm, list(example_inputs) + masks, config_patches=patches or None)
    if not masks:
        return compiled
    return lambda *args: compiled(*args, *masks)


def _register() -> None:
    from torch._dynamo.backends import registry

    # Skip when already registered, or when dynamo found our entry point and is importing us to
    # register it itself (registering twice raises "duplicate name").
    if "sparsecc" in registry._COMPILER_FNS or registry._BACKENDS.get("sparsecc") is not None:
        return
    register_backend(sparsecc_backend, name="sparsecc")


_register()
