"""CATS: input-dependent sparsity in gated MLPs (seed 000, "Dynamic Sparsification").

    CATS_t(v) = v if |v| ≥ t else 0,   v = act(x W_gateᵀ),   y = (CATS_t(v) * (x W_upᵀ)) W_downᵀ

`CATSConfig(sparsity=0.5)` targets gated MLP modules (found on the graph, `sparsecc.gated`),
e.g. {"re:.*mlp": CATSConfig(0.7)}. The threshold t of each MLP is the `sparsity`-quantile of
|v| over the calibration tokens, so that fraction of its neurons is zero on average (CATS §3:
thresholds from a histogram of calibration activations). The MLP module is then replaced by
`CATSMLP`, which keeps the same three linears under the same names (state dicts keep their keys,
shapes and values; W_down is stored column-major, see `column_major_down`, so a raw
safetensors.save_file needs .contiguous(), which save_pretrained and save_pruned do) and computes
the MLP as one op, `torch.ops.sparsecc.cats_mlp`.

Thresholds are computed in one forward over the calibration batches after the recipe's weight
pruning has been applied and before any MLP is gated, as the CATS paper calibrates them on the
model's own activations. Composable with weight pruning of the same linears.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..calibration import token_mask
from ..codegen.cats_mlp import ACTIVATIONS
from ..codegen import ops as _ops  # noqa: F401  (registers torch.ops.sparsecc.cats_mlp)
from ..codegen.cats_cpu import column_major, wants_column_major
from ..configs import SparsityConfig, register_technique
from ..errors import CalibrationError, PlanError
from ..gated import GatedMLP
from ..prune.masks import check_sparsity
from ..rewrites import ModuleRewrite, RewriteContext, observe

MAX_SAMPLES = 1 << 20  # |v| values kept per MLP for the quantile (a uniform random subset beyond)


@dataclass(frozen=True)
class CATSConfig(SparsityConfig):
    """Zero the gated-MLP neurons with |act(x W_gate)| below a calibrated threshold."""

    TARGET = "gated_mlp"
    sparsity: float = 0.5

    def validate(self) -> None:
        check_sparsity(self.sparsity)


@register_technique(CATSConfig)
class CATSTechnique(ModuleRewrite):
    requires = ("gate_activations",)  # collected by calibrate_thresholds, not by a linear pass
    what = "gated MLP (down(act(gate(x)) * up(x)), as in Llama or Mistral)"
    order = 20

    def candidates(self, captured) -> dict[str, GatedMLP]:
        return captured.gated

    def rewrite(self, ctx: RewriteContext, specs: dict[str, GatedMLP], configs: dict[str, CATSConfig]) -> list[dict]:
        return apply_cats(ctx.model, specs, configs, ctx.batches, ctx.forward, ctx.on_restore, ctx.progress)

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


def column_major_down(mlp: CATSMLP, on_restore: list | None = None) -> None:
    """Store the MLP's W_down column-major (W_downᵀ contiguous; same values and shape), so that an
    active neuron's column is one contiguous row: codegen/cats_cpu.py reads only those rows at
    decode, and the Triton kernel reads them whole (not for half/bf16 weights on CPU: see
    `wants_column_major`). The undo (row-major again) goes to on_restore."""
    down = getattr(mlp, mlp.spec.down)
    if type(down) is not nn.Linear or not down.weight.is_contiguous() or not wants_column_major(down.weight):
        return
    w = down.weight
    if on_restore is not None:
        on_restore.append(lambda: setattr(w, "data", w.data.contiguous()))
    w.data = wanted_layout(w.data)


def _gate_hook(store: list, generator: torch.Generator, act: str, ctx: dict):
    def hook(module, args, out):
        v = ACTIVATIONS[act](out.detach().float()).abs()
        mask = ctx.get("mask")
        v = v[mask] if mask is not None and mask.shape == v.shape[:-1] else v
        v = v.reshape(-1)
        if not torch.isfinite(v).all():
            raise CalibrationError(f"NaN/Inf in the gate activations of {ctx['name'][id(module)]}: check the "
                                   "calibration batches and the model's dtype")
        budget = MAX_SAMPLES // ctx["batches"]
        if v.numel() > budget:
            v = v[torch.randint(v.numel(), (budget,), generator=generator, device="cpu").to(v.device)]
        store.append(v.cpu())
    return hook


@torch.no_grad()
def calibrate_thresholds(model: nn.Module, gated: dict[str, GatedMLP], configs: dict[str, CATSConfig],
                         batches: list, forward, progress: bool = False) -> dict[str, float]:
    """{mlp: threshold}: the `sparsity`-quantile of |act(x W_gate)| over the calibration tokens."""
    from tqdm.auto import tqdm

    samples: dict[str, list] = {n: [] for n in configs}
    ctx = {"batches": len(batches), "name": {}}
    gen = torch.Generator().manual_seed(0)
    handles = []
    try:
        for name in configs:
            gate = model.get_submodule(f"{name}.{gated[name].gate}")
            ctx["name"][id(gate)] = name
            handles.append(gate.register_forward_hook(_gate_hook(samples[name], gen, gated[name].act, ctx)))
        for batch in tqdm(batches, desc="CATS thresholds", unit="batch", disable=not progress):
            ctx["mask"] = token_mask(batch)
            forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, cfg in configs.items():
        if not samples[name]:
            raise CalibrationError(f"{name}: its gate linear never ran on the calibration batches")
        v = torch.sort(torch.cat(samples[name])).values
        # t = the value below which a `sparsity` fraction of |v| lies (t = 0: nothing is zeroed)
        out[name] = 0.0 if cfg.sparsity == 0 else float(v[min(int(cfg.sparsity * v.numel()), v.numel() - 1)])
    return out


def apply_cats(model: nn.Module, gated: dict[str, GatedMLP], configs: dict[str, CATSConfig], batches: list,
               forward, on_restore: list, progress: bool = False) -> list[dict]:
    """Calibrate thresholds, then swap every targeted MLP for a CATSMLP; returns report rows. The
    undo of each swap is appended to `on_restore` before the swap is made."""
    t0 = time.perf_counter()
    thresholds = calibrate_thresholds(model, gated, configs, batches, forward, progress)
    seconds = (time.perf_counter() - t0) / max(len(configs), 1)
    new = {name: CATSMLP(model.get_submodule(name), gated[name], thresholds[name]) for name in configs}
    rows = []
    for name, module in new.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        on_restore.append(lambda p=parent, c=child, m=getattr(parent, child): setattr(p, c, m))
        setattr(parent, child, module)
        column_major_down(module, on_restore)
        rows.append({"module": name, "param": None, "technique": "CATSConfig", "config": configs[name].to_dict(),
                     "shape": None, "sparsity": configs[name].sparsity, "threshold": thresholds[name],
                     "label": f"t={thresholds[name]:.3g}",
                     "gated": gated[name].to_dict(), "error": None, "error_kind": None, "seconds": seconds})
    return rows


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
