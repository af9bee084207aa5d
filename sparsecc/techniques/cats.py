"""CATS: input-dependent sparsity in gated MLPs (seed 000, "Dynamic Sparsification").

    CATS_t(v) = v if |v| ≥ t else 0,   v = act(x W_gateᵀ),   y = (CATS_t(v) * (x W_upᵀ)) W_downᵀ

`CATSConfig(sparsity=0.5)` targets gated MLP modules (found on the graph, `sparsecc.graph.gated`),
e.g. {"re:.*mlp": CATSConfig(0.7)}. The threshold t of each MLP is the `sparsity`-quantile of
|v| over the calibration tokens, so that fraction of its neurons is zero on average (CATS §3:
thresholds from a histogram of calibration activations). The MLP module is then replaced by
`CATSMLP`, which keeps the same three linears under the same names (state dicts keep their keys,
shapes and values; W_down is stored column-major, see `column_major_down`, so a raw
safetensors.save_file needs .contiguous(), which save_pretrained and save_pruned do) and computes
the MLP as one op, `torch.ops.sparsecc.cats_mlp`.

Block by block, a threshold is calibrated after the block's weight pruning, on the outputs of the
already-gated blocks before it (the CATS paper calibrates on the model's own activations); the
samples of |v| come from passes/analysis/gate_activations.py and the threshold is the decision a
Plan stores. Composable with weight pruning of the same linears.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..codegen.cats_mlp import ACTIVATIONS
from .. import ops as _ops  # noqa: F401  (registers torch.ops.sparsecc.cats_mlp)
from ..codegen.cats_cpu import column_major, wants_column_major
from .configs import SparsityConfig, register_technique
from ..errors import PlanError
from ..graph.gated import GatedMLP
from ..prune.masks import check_sparsity
from .rewrites import ModuleRewrite, observe


@dataclass(frozen=True)
class CATSConfig(SparsityConfig):
    """Zero the gated-MLP neurons with |act(x W_gate)| below a calibrated threshold."""

    TARGET = "gated_mlp"
    sparsity: float = 0.5

    def validate(self) -> None:
        check_sparsity(self.sparsity)


@register_technique(CATSConfig)
class CATSTechnique(ModuleRewrite):
    requires = ("gate_activations",)
    what = "gated MLP (down(act(gate(x)) * up(x)), as in Llama or Mistral)"
    order = 20

    def candidates(self, captured) -> dict[str, GatedMLP]:
        return captured.gated

    def spec_from_dict(self, data) -> GatedMLP:
        return GatedMLP(**data)

    def plan(self, config, model, name, spec, stats):
        """{threshold}: the `sparsity`-quantile of the sampled |act(x W_gate)|."""
        return {"threshold": torch.tensor(stats["gate_activations"].quantile(config.sparsity), dtype=torch.float64)}

    def check_decision(self, config, spec, decision):
        t = decision.get("threshold")
        if t is None or t.numel() != 1 or not t.is_floating_point() or not 0 <= float(t) < float("inf"):
            return f"needs a threshold, one finite number >= 0, got {t!r}"
        return None

    def apply(self, config, model, name, spec, decision, tx):
        problem = self.check_decision(config, spec, decision)
        if problem:
            raise PlanError(f"{name}: the CATS decision {problem}")
        t = float(decision["threshold"])
        mlp = CATSMLP(model.get_submodule(name), spec, t)
        tx.swap(name, mlp)
        column_major_down(mlp, tx)
        return {"module": name, "param": None, "technique": "CATSConfig", "config": config.to_dict(), "shape": None,
                "sparsity": config.sparsity, "threshold": t, "label": f"t={t:.3g}", "gated": spec.to_dict(),
                "error": None, "error_kind": None}

    def restore(self, model: nn.Module, rows: list[dict]) -> list[str]:
        return restore_cats(model, rows)


class CATSMLP(nn.Module):
    """A gated MLP with CATS thresholding; holds the original linears under their own names."""

    def __init__(self, mlp: nn.Module, spec: GatedMLP, threshold: float):
        super().__init__()
        self.spec, self.threshold = spec, float(threshold)
        for child in (spec.gate, spec.up, spec.down):
            setattr(self, child, getattr(mlp, child))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, c) for c in (self.spec.gate, self.spec.up, self.spec.down))
        if all(type(m) is nn.Linear for m in (gate, up, down)):
            return torch.ops.sparsecc.cats_mlp(x, gate.weight, gate.bias, up.weight, up.bias, down.weight, down.bias,
                                               self.threshold, self.spec.act)
        v = ACTIVATIONS[self.spec.act](gate(x))  # e.g. N:M-compressed linears: same math, op by op
        return down(v * (v.abs() >= self.threshold) * up(x))

    def _apply(self, fn, recurse=True):
        """After .to()/.half()/.cuda(): W_down in the layout its new dtype and device want."""
        out = super()._apply(fn, recurse)
        down = getattr(self, self.spec.down)
        if type(down) is nn.Linear:
            down.weight.data = wanted_layout(down.weight.data)
        return out

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:.4g}, act={self.spec.act}"


def wanted_layout(w: torch.Tensor) -> torch.Tensor:
    """W_down column-major where `wants_column_major` asks for it, else row-major (w itself when
    already so)."""
    if wants_column_major(w):
        return w if column_major(w) else w.t().contiguous().t()
    return w.contiguous()


def column_major_down(mlp: CATSMLP, tx=None) -> None:
    """Store the MLP's W_down column-major (W_downᵀ contiguous; same values and shape), so that an
    active neuron's column is one contiguous row: codegen/cats_cpu.py reads only those rows at
    decode, and the Triton kernel reads them whole (not for half/bf16 weights on CPU: see
    `wants_column_major`). The undo (row-major again) goes to the transaction `tx`."""
    down = getattr(mlp, mlp.spec.down)
    if type(down) is not nn.Linear or not down.weight.is_contiguous() or not wants_column_major(down.weight):
        return
    w = down.weight
    if tx is not None:
        tx.on_undo(lambda: setattr(w, "data", w.data.contiguous()))
    w.data = wanted_layout(w.data)


def restore_cats(model: nn.Module, rows: list[dict]) -> list[str]:
    """Re-gate the MLPs named by CATS report rows (a loaded checkpoint); checks before swapping."""
    todo = []
    for row in rows:
        if row.get("technique") != "CATSConfig":
            continue
        spec = GatedMLP(**row["gated"])
        try:
            mlp = model.get_submodule(spec.name)
            for child in (spec.gate, spec.up, spec.down):
                mlp.get_submodule(child)
        except AttributeError:
            raise PlanError(f"CATS row {spec.name!r}: the model has no such gated MLP") from None
        if spec.act not in ACTIVATIONS or not float(row["threshold"]) >= 0:
            raise PlanError(f"CATS row {spec.name!r}: bad activation {spec.act!r} or threshold {row['threshold']!r}")
        todo.append((spec, mlp, float(row["threshold"])))
    for spec, mlp, t in todo:
        parent, _, child = spec.name.rpartition(".")
        setattr(model.get_submodule(parent), child, CATSMLP(mlp, spec, t))
        column_major_down(getattr(model.get_submodule(parent), child))
    return [spec.name for spec, _, _ in todo]



@torch.no_grad()
def activation_sparsity(model: nn.Module, batches) -> dict[str, float]:
    """Measured fraction of zeroed gate activations of every CATSMLP over the tokens of `batches`
    (e.g. held-out text: how close the calibrated thresholds come to their target)."""
    counts: dict[str, list] = {}

    def hook(name, ctx):
        def fn(mod, args, out):  # the fused op never calls the gate module: recompute its activation
            v = ACTIVATIONS[mod.spec.act](getattr(mod, mod.spec.gate)(args[0]).float()).abs()
            mask = ctx.get("mask")
            v = v[mask] if mask is not None and mask.shape == v.shape[:-1] else v
            c = counts.setdefault(name, [0, 0])
            c[0] += int((v < mod.threshold).sum())
            c[1] += v.numel()
        return fn

    observe(model, CATSMLP, hook, batches, "CATSConfig")
    return {n: z / max(t, 1) for n, (z, t) in counts.items()}
