"""The transform passes that rewrite modules (techniques/rewrites.py), block by block.

Two stages: `first=True` rewrites (the attention forms, data-free) at the start of each block,
so that the block's statistics see them; the others after the block's pruning, on the
statistics collected there (CATS thresholds, MoE routers), in increasing technique `order`.
"""
from __future__ import annotations

import time

from ...errors import CalibrationError, RecipeError
from ...prune.masks import follows_nm, parse_pattern, zero_share
from ...techniques.configs import technique_for
from ...techniques.rewrites import mark
from ..base import TransformPass


class RewriteModules(TransformPass):
    def __init__(self, assignments: dict, specs: dict, first: bool = False, decisions: dict | None = None):
        self.targets, self.specs, self.decisions = dict(assignments), dict(specs), decisions
        self.name = "rewrite_module_forms" if first else "rewrite_modules"
        self.produces = ("module_forms",) if first else ("modules",)
        self.after = () if first else ("module_forms", "weights")
        self.requires = () if decisions is not None else tuple(sorted(
            {a for c in self.targets.values() for a in technique_for(c).needs(c)}))

    def run(self, ctx, sites):
        todo = [n for n in self.targets if sites.holds(n)]
        todo.sort(key=lambda n: technique_for(self.targets[n]).order)  # stable: recipe order within one
        for name in todo:
            config, spec = self.targets[name], self.specs[name]
            tech = technique_for(config)
            t0 = time.perf_counter()
            if self.decisions is not None:
                decision = self.decisions.get(name, {})
            else:
                stats = {}
                for art in tech.needs(config):
                    stats[art] = ctx.stats.get(art, {}).get(name)
                    if stats[art] is None:
                        raise CalibrationError(f"{name}: no {art} were collected for it (its module never ran on "
                                               "the calibration batches)")
                decision = tech.plan(config, ctx.model, name, spec, stats)
            row = tech.apply(config, ctx.model, name, spec, decision, ctx.tx)
            mark(ctx.model, name, config, ctx.tx)
            _refresh_rows(ctx, name, config)
            ctx.decisions[name], ctx.configs[name], ctx.specs[name] = decision, config, spec
            ctx.rows.append({**row, "seconds": time.perf_counter() - t0})
        return bool(todo)


def _refresh_rows(ctx, name: str, config) -> None:
    """The rows pruning recorded for the linears inside module `name`, as its rewrite left them:
    a shrunk linear's shape and sparsity (what it kept of its pruned weights); a linear the rewrite
    replaced (an MoE split, whose experts' tensors carry its zeros) marked `replaced_by` it, kept in
    the report but no parameter to save. An N:M pattern whose groups a shrink cut (inputs removed
    from a consumer) is refused: prune N:M after it."""
    params = dict(ctx.model.named_parameters())
    rows = []
    for r in ctx.rows:
        if r["module"].startswith(name + ".") and r.get("param") and r.get("shape") is not None:
            p = params.get(r["param"])
            if p is None:
                rows.append({**r, "replaced_by": name})
                continue
            w = p.detach().t() if r.get("transposed") else p.detach()
            if list(w.shape) != list(r["shape"]):
                nm = parse_pattern((r.get("config") or {}).get("pattern"))
                if nm is not None and not follows_nm(w, *nm):
                    raise RecipeError(f"{type(config).__name__} on {name} removed inputs of {r['module']}, pruned "
                                      f"{nm[0]}:{nm[1]}, which breaks its groups: apply it first, then prune {nm[0]}:"
                                      f"{nm[1]} (two sparsify_ calls)")
                r = {**r, "shape": list(w.shape), "sparsity": zero_share(w)}
        rows.append(r)
    ctx.rows[:] = rows
