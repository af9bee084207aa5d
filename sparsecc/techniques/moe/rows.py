"""What MoEMLP rewrites record in report rows, and how a loaded checkpoint gets its MoEMLPs back."""
from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import PlanError, RecipeError
from ..configs import SparsityConfig
from .module import MoEMLP


def check_capacity(cf, config: str) -> None:
    if cf is not None and (isinstance(cf, bool) or not isinstance(cf, (int, float)) or not cf > 0 or math.isinf(cf)):
        raise RecipeError(f"{config}.capacity_factor must be None (no capacity limit) or a number > 0 "
                          f"(Switch uses 1.0-2.0), got {cf!r}")


def moe_row(name: str, cfg: SparsityConfig, moe: MoEMLP, **extra) -> dict:
    """The report row of a MoEMLP swapped in at `name`: enough to rebuild it (`restore_moe`)."""
    e, m, hidden = moe.w_gate.shape
    return {"module": name, "param": None, "technique": type(cfg).__name__, "config": cfg.to_dict(), "shape": None,
            "sparsity": 1 - moe.top_k / e, "experts": e, "top_k": moe.top_k, "capacity_factor": moe.capacity_factor,
            "active_neurons": moe.top_k / e, **extra, "hidden": hidden, "expert_size": m, "act": moe.act,
            "mode": moe.mode, "bias": [getattr(moe, b) is not None for b in ("b_gate", "b_up", "b_down")],
            "router_bias": moe.router_bias is not None, "dtype": str(moe.w_gate.dtype).removeprefix("torch."),
            "error": None, "error_kind": None}


def restore_moe(model: nn.Module, rows: list[dict], technique: str = "MoEConfig") -> list[str]:
    """Put back, in place of each module a `technique` row names, a MoEMLP of the row's shapes
    (zero weights: load the checkpoint's state dict into the model afterwards). Checks all rows
    before swapping any module."""
    todo = []
    for row in rows:
        if row.get("technique") != technique:
            continue
        name = row["module"]
        try:
            old = model.get_submodule(name)
            module = MoEMLP(int(row["hidden"]), int(row["expert_size"]), int(row["experts"]), int(row["top_k"]),
                            row["capacity_factor"], row["act"], row["mode"], tuple(row["bias"]), row["router_bias"],
                            getattr(torch, row["dtype"]), next(old.parameters(), torch.empty(0)).device)
        except AttributeError:
            raise PlanError(f"MoE row {name!r}: the model has no such module (or a bad dtype {row.get('dtype')!r})") \
                from None
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"MoE row {name!r} is malformed: {e!r}") from None
        todo.append((name, module))
    for name, module in todo:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
    return [name for name, _ in todo]
