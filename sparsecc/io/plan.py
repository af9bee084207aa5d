"""Plan: what calibration found, keyed by module name, saved as JSON + safetensors (never pickle).

A plan holds, per targeted module, the config and the decision its technique computed (masks
and updated weights of linears; CATS thresholds, MoE splits and routers of rewritten modules; the
blocks a layer drop removes, its earlier stage replayed first: `stages()`; nothing for data-free
forms), the linear's site or the rewritten module's spec, and a
fingerprint of its weights; per analysis artefact kept, the statistics; and the calibration
setup. `sparsify_(model, plan)` replays the decisions without data (Pipeline.from_plan).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .. import techniques as _techniques  # noqa: F401  (registers the built-in techniques by name)
from ..graph.capture import LinearSite
from ..techniques.configs import SparsityConfig, config_from_dict, technique_for
from ..techniques.rewrites import ModuleRewrite
from ..errors import PlanError, RecipeError
from ..passes.analysis import STAT_TYPES
from ..passes.build import fingerprint, module_fingerprint
from .folders import check_output_dir, writing_folder

FORMAT = 1
JSON_NAME, TENSORS_NAME = "plan.json", "tensors.safetensors"


@dataclass
class Plan:
    sites: dict[str, LinearSite]
    configs: dict[str, SparsityConfig]
    decisions: dict[str, dict[str, torch.Tensor]]
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    setup: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)   # versions, model class, fingerprints of the original weights
    modules: dict[str, Any] = field(default_factory=dict)  # rewritten module -> its spec (JSON data)

    @classmethod
    def from_result(cls, result, meta: dict, stats: dict | None = None, setup: dict | None = None) -> "Plan":
        """The plan of a pipeline run (passes.PipelineResult): its configs, decisions and rows."""
        sites = {n: result.sites[n] for n in result.configs if n not in result.specs and n in result.sites}
        modules = {n: technique_for(result.configs[n]).spec_to_dict(s) for n, s in result.specs.items()
                   if n in result.configs}
        return cls(sites, dict(result.configs), dict(result.decisions), result.stats if stats is None else stats,
                   result.setup if setup is None else setup, list(result.rows), meta, modules)

    @classmethod
    def combine(cls, plans: list["Plan"]) -> "Plan":
        """One plan of a recipe calibrated in stages (passes.build.recipe_stages: layer drop first), each
        stage's entries named as on the model it ran on; `stages()` splits it again to replay them in order."""
        if len(plans) == 1:
            return plans[0]
        out = cls({}, {}, {}, {}, plans[0].setup, [], dict(plans[0].meta), {})
        out.meta["fingerprints"], out.meta["timings"] = {}, {}
        for plan in plans:
            again = set(out.configs) & set(plan.configs)
            if again:
                raise PlanError(f"{sorted(again)[0]} is targeted in two stages of one recipe")
            out.sites |= plan.sites
            out.configs |= plan.configs
            out.decisions |= plan.decisions
            out.modules |= plan.modules
            out.rows += plan.rows
            for art, table in plan.stats.items():
                out.stats.setdefault(art, {}).update(table)
            out.meta["fingerprints"] |= plan.meta.get("fingerprints", {})
            for name, secs in plan.meta.get("timings", {}).items():
                out.meta["timings"][name] = out.meta["timings"].get(name, 0.0) + secs
        return out

    def stages(self) -> list["Plan"]:
        """The plan split by technique stage, in the order the stages replay (one plan: itself)."""
        by_stage: dict[int, set[str]] = {}
        for name, config in self.configs.items():
            by_stage.setdefault(technique_for(config).stage, set()).add(name)
        if len(by_stage) < 2:
            return [self]
        return [self._only(by_stage[s]) for s in sorted(by_stage)]

    def _only(self, names: set[str]) -> "Plan":
        def pick(table: dict) -> dict:
            return {n: v for n, v in table.items() if n in names}

        meta = {**self.meta, "fingerprints": pick(self.meta.get("fingerprints", {}))}
        return Plan(pick(self.sites), pick(self.configs), pick(self.decisions),
                    {art: pick(table) for art, table in self.stats.items()}, self.setup,
                    [r for r in self.rows if r.get("module") in names], meta, pick(self.modules))

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write `path/plan.json` and `path/tensors.safetensors`. An existing `path` is refused unless
        `overwrite=True`; the plan is written to a temporary sibling folder and renamed into place, so
        a failed save leaves no stray folder and whatever was at `path` as it was."""
        path = Path(path)
        check_output_dir(path, overwrite)
        tensors: dict[str, torch.Tensor] = {}
        stored: set[int] = set()

        def own(t: torch.Tensor) -> torch.Tensor:  # safetensors stores no two names on one storage
            t = t.detach().contiguous().cpu()      # (linears reading one input share one Hessian)
            if t.untyped_storage().data_ptr() in stored:
                t = t.clone()
            stored.add(t.untyped_storage().data_ptr())
            return t

        for site, dec in self.decisions.items():
            for k, t in dec.items():
                tensors[f"decision/{site}/{k}"] = own(t)
        for art, table in self.stats.items():
            for site, stat in table.items():
                for k, t in stat.tensors().items():
                    tensors[f"stats/{art}/{site}/{k}"] = own(t)
        doc = {"format": FORMAT, "sites": {n: s.to_dict() for n, s in self.sites.items()},
               "modules": self.modules, "configs": {n: c.to_dict() for n, c in self.configs.items()},
               "order": list(self.decisions), "setup": self.setup, "rows": self.rows, "meta": self.meta}
        with writing_folder(path) as tmp:
            (tmp / JSON_NAME).write_text(json.dumps(doc, indent=1, default=str))
            save_file(tensors, str(tmp / TENSORS_NAME), metadata={"format": str(FORMAT)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        """Read a plan written by `save`, checking every entry (types, shapes, dtypes, finiteness)."""
        path = Path(path)
        jpath, tpath = path / JSON_NAME, path / TENSORS_NAME
        if not jpath.is_file() or not tpath.is_file():
            raise PlanError(f"{path} is not a sparsecc plan: expected {JSON_NAME} and {TENSORS_NAME} inside "
                            "(written by Plan.save)")
        try:
            doc = json.loads(jpath.read_text())
            tensors = load_file(str(tpath))
        except Exception as e:
            raise PlanError(f"plan at {path} is corrupt or truncated: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            found = doc.get("format") if isinstance(doc, dict) else None
            raise PlanError(f"plan at {path} has format {found!r}; this sparsecc reads format {FORMAT}")
        bad = _Complaint(f"plan at {path}")
        for key, kind in (("sites", dict), ("modules", dict), ("configs", dict), ("order", list), ("setup", dict),
                          ("rows", list), ("meta", dict)):
            if key in ("sites", "configs") and key not in doc:
                raise bad(f"{JSON_NAME} lacks {key!r}")
            if not isinstance(doc.get(key, kind()), kind):
                raise bad(f"{key!r} in {JSON_NAME} must be a {kind.__name__}, not {type(doc[key]).__name__}")
        sites = {n: _site(n, d, bad) for n, d in doc["sites"].items()}
        modules = doc.get("modules", {})
        configs = {n: _config(n, d, sites, modules, bad) for n, d in doc["configs"].items()}
        _check_json_rest(doc, bad)
        decisions: dict[str, dict[str, torch.Tensor]] = {}
        raw_stats: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        for key, t in tensors.items():
            parts = key.split("/")
            if parts[0] == "decision" and len(parts) == 3:
                site, k = parts[1:]
                if site not in configs:
                    raise bad(f"tensor {key!r} names no such site with a config in {JSON_NAME}")
                if site in sites:
                    _check_decision(key, k, t, sites[site], bad)
                decisions.setdefault(site, {})[k] = t
            elif parts[0] == "stats" and len(parts) == 4:
                raw_stats.setdefault(parts[1], {}).setdefault(parts[2], {})[parts[3]] = t
            else:
                raise bad(f"unexpected tensor {key!r} in {TENSORS_NAME}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise bad(f"tensor {key!r} is not finite (NaN or Inf)")
        stats = {}
        for art, table in raw_stats.items():
            if art in STAT_TYPES:  # statistics of kinds this sparsecc does not know are dropped
                try:
                    stats[art] = {s: STAT_TYPES[art].from_tensors(t) for s, t in table.items()}
                except (KeyError, TypeError, ValueError, RuntimeError) as e:
                    raise bad(f"statistics {art!r} are incomplete or malformed ({e!r})") from None
        order = doc.get("order", [])
        missing = set(sites) & set(configs) - set(decisions)
        if missing:
            raise PlanError(f"plan at {path} is missing decisions for {sorted(missing)[:3]}")
        decisions |= {n: {} for n in configs if n not in decisions}  # data-free rewrites decide nothing
        for name in modules:
            tech = technique_for(configs[name])
            problem = tech.check_decision(configs[name], tech.spec_from_dict(modules[name]), decisions[name])
            if problem:
                raise bad(f"the decision of {name!r} ({type(configs[name]).__name__}) {problem}")
        decisions = {n: decisions[n] for n in order if n in decisions} | decisions  # the order they were made
        configs = {n: configs[n] for n in decisions}
        return cls(sites, configs, decisions, stats, doc.get("setup", {}), doc.get("rows", []), doc.get("meta", {}),
                   modules)


class _Complaint:
    """PlanError factory: 'plan at P: <what>; re-create it with calibrate and Plan.save'."""

    def __init__(self, where: str):
        self.where = where

    def __call__(self, what: str) -> PlanError:
        return PlanError(f"{self.where}: {what}; re-create it with calibrate and Plan.save")


def _site(name: str, d, bad: _Complaint) -> LinearSite:
    try:
        site = LinearSite.from_dict(d)
        ok = (site.name == name and isinstance(site.param, str) and isinstance(site.transposed, bool)
              and all(type(v) is int and v > 0 for v in (site.out_features, site.in_features))
              and all(isinstance(t, str) for t in site.tied)
              and all(len(f) == 2 and isinstance(f[0], str) and isinstance(f[1], bool) for f in site.feeders))
    except (TypeError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise bad(f"site {name!r} is malformed ({str(d)[:120]})")
    return site


def _config(name: str, d, sites: dict, modules: dict, bad: _Complaint) -> SparsityConfig:
    if name not in sites and name not in modules:
        raise bad(f"config of {name!r} has no site or module in {JSON_NAME}")
    try:
        config = config_from_dict(d)
    except (RecipeError, TypeError, ValueError, AttributeError, KeyError) as e:
        raise bad(f"config of {name!r} is invalid ({e})") from None
    if (name in modules) != isinstance(technique_for(config), ModuleRewrite):
        raise bad(f"{name!r}: {type(config).__name__} {'rewrites modules' if name in modules else 'prunes linears'}, "
                  f"but the plan lists it as a {'module' if name in modules else 'linear site'}")
    if name in modules:
        try:
            technique_for(config).spec_from_dict(modules[name])
        except (TypeError, ValueError, KeyError) as e:
            raise bad(f"the spec of module {name!r} is malformed ({e})") from None
    return config


def _check_json_rest(doc: dict, bad: _Complaint) -> None:
    """The parts of plan.json that sparsify_ reads besides sites and configs."""
    if not all(isinstance(n, str) for n in doc.get("order", [])):
        raise bad("'order' must list module names")
    for i, row in enumerate(doc.get("rows", [])):
        if not isinstance(row, dict) or not isinstance(row.get("module"), str):
            raise bad(f"rows[{i}] must be a dict with a 'module' name")
    prints = doc.get("meta", {}).get("fingerprints", {})
    if not isinstance(prints, dict) or not all(
            isinstance(v, list) and len(v) == 2 and all(type(x) in (int, float) for x in v) for v in prints.values()):
        raise bad("meta 'fingerprints' must map module names to [sum, sum of squares]")


def _check_decision(key: str, k: str, t: torch.Tensor, site: LinearSite, bad: _Complaint) -> None:
    """A decision tensor fits its site: mask bool [out, in], weight float [out, in], perm a permutation."""
    shape = [site.out_features, site.in_features]
    if k == "mask":
        ok, want = t.dtype == torch.bool and list(t.shape) == shape, f"a torch.bool {shape}"
    elif k == "weight":
        ok, want = t.is_floating_point() and list(t.shape) == shape, f"a floating-point {shape}"
    elif k == "perm":
        want = f"a permutation of range({site.in_features})"
        ok = (t.dtype in (torch.int32, torch.int64) and list(t.shape) == [site.in_features]
              and torch.equal(t.sort().values, torch.arange(site.in_features, dtype=t.dtype)))
    else:  # technique-specific extras (e.g. retained_score): only checked for finiteness
        return
    if not ok:
        raise bad(f"tensor {key!r} is {t.dtype} {list(t.shape)}; expected {want}")


def plan_meta(model: torch.nn.Module, sites: dict[str, LinearSite], targets) -> dict:
    """Versions, the model class and a fingerprint of each target's weights (a linear's, or all of
    a rewritten module's), taken before anything changes."""
    import sparsecc

    prints = {n: fingerprint(sites[n].weight(model)) if n in sites else module_fingerprint(model.get_submodule(n))
              for n in targets}
    return {"sparsecc": sparsecc.__version__, "torch": torch.__version__, "model_class": type(model).__name__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "fingerprints": prints}
