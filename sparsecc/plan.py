"""Plan: what calibration found, keyed by module name, saved as JSON + safetensors (never pickle).

A plan holds, per targeted module, the config, the decision its technique computed (masks,
updated weights) and the layer's shape/fingerprint; per analysis artefact, the statistics;
and the calibration setup. `sparsify_(model, plan)` replays the decisions without data.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .capture import LinearSite
from .configs import SparsityConfig, config_from_dict
from .errors import PlanError
from .passes.stats import STAT_TYPES

FORMAT = 1
JSON_NAME, TENSORS_NAME = "plan.json", "tensors.safetensors"


def fingerprint(w: torch.Tensor) -> list[float]:
    """Cheap identity check of a weight: (sum, sum of squares) in fp64."""
    w = w.detach().double()
    return [float(w.sum()), float((w * w).sum())]


@dataclass
class Plan:
    sites: dict[str, LinearSite]
    configs: dict[str, SparsityConfig]
    decisions: dict[str, dict[str, torch.Tensor]]
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    setup: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)   # versions, model class, fingerprints of the original weights

    def save(self, path: str | os.PathLike) -> Path:
        """Write `path/plan.json` and `path/tensors.safetensors` atomically (a temp dir, then rename)."""
        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        for site, dec in self.decisions.items():
            for k, t in dec.items():
                tensors[f"decision/{site}/{k}"] = t.detach().contiguous().cpu()
        for art, table in self.stats.items():
            for site, stat in table.items():
                for k, t in stat.tensors().items():
                    tensors[f"stats/{art}/{site}/{k}"] = t.detach().contiguous().cpu()
        doc = {"format": FORMAT, "sites": {n: s.to_dict() for n, s in self.sites.items()},
               "configs": {n: c.to_dict() for n, c in self.configs.items()},
               "order": list(self.decisions), "setup": self.setup, "rows": self.rows, "meta": self.meta}
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / JSON_NAME).write_text(json.dumps(doc, indent=1, default=str))
        save_file(tensors, str(tmp / TENSORS_NAME), metadata={"format": str(FORMAT)})
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
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
        if doc.get("format") != FORMAT:
            raise PlanError(f"plan at {path} has format {doc.get('format')!r}; this sparsecc reads format {FORMAT}")
        sites = {n: LinearSite.from_dict(d) for n, d in doc["sites"].items()}
        configs = {n: config_from_dict(d) for n, d in doc["configs"].items()}
        decisions: dict[str, dict[str, torch.Tensor]] = {}
        raw_stats: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        for key, t in tensors.items():
            kind, rest = key.split("/", 1)
            if kind == "decision":
                site, k = rest.rsplit("/", 1)
                decisions.setdefault(site, {})[k] = t
            else:
                art, rest = rest.split("/", 1)
                site, k = rest.rsplit("/", 1)
                raw_stats.setdefault(art, {}).setdefault(site, {})[k] = t
        stats = {art: {s: STAT_TYPES[art].from_tensors(t) for s, t in table.items()}
                 for art, table in raw_stats.items() if art in STAT_TYPES}
        order = doc.get("order", [])
        decisions = {n: decisions[n] for n in order if n in decisions} | decisions  # the order they were made
        missing = set(configs) - set(decisions)
        if missing:
            raise PlanError(f"plan at {path} is missing decisions for {sorted(missing)[:3]}")
        return cls(sites, configs, decisions, stats, doc.get("setup", {}), doc.get("rows", []), doc.get("meta", {}))


def plan_meta(model: torch.nn.Module, sites: dict[str, LinearSite]) -> dict:
    import sparsecc

    return {"sparsecc": sparsecc.__version__, "torch": torch.__version__, "model_class": type(model).__name__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "fingerprints": {n: fingerprint(s.weight(model)) for n, s in sites.items()}}
