"""Memory estimate for Hessian-based pruning, checked before any work starts.

SparseGPT and OBS hold H (in × in) for every targeted linear of one decoder block at a time
(block-sequential calibration), then, per layer, a damped inverse and its Cholesky factor
(2 more in × in) and fp32 working copies of W. If that peak exceeds the memory available on
the model's device, the run would die hours in; we refuse up front and say how much is needed.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from ..errors import CalibrationError

GiB = 2 ** 30


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device` (CUDA: mem_get_info; CPU: MemAvailable of /proc/meminfo), or None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def hessian_peak_bytes(captured, names, hessian_bytes: int = 4) -> tuple[int, str]:
    """Peak bytes for the Hessians of `names` (grouped by decoder block) plus one layer's solve,
    and a description of where the peak is."""
    per_scope: dict[int | None, int] = defaultdict(int)
    solve = 0
    for name in names:
        site = captured.sites[name]
        per_scope[captured.block_of(name)] += site.in_features ** 2 * hessian_bytes
        solve = max(solve, (2 * site.in_features ** 2 + 2 * site.out_features * site.in_features) * 4)
    if not per_scope:
        return 0, ""
    scope, held = max(per_scope.items(), key=lambda kv: kv[1])
    where = "outside the decoder blocks" if scope is None else f"decoder block {captured.blocks[scope]}"
    return held + solve, where


def check_hessian_memory(captured, names, device: torch.device, hessian_bytes: int = 4) -> None:
    """Raise CalibrationError before calibration if the Hessians of `names` cannot fit."""
    need, where = hessian_peak_bytes(captured, names, hessian_bytes)
    free = available_bytes(device)
    if need and free is not None and need > free:
        raise CalibrationError(
            f"Hessian-based pruning needs ~{need / GiB:.2f} GiB at its peak ({where}: the Hessians of its "
            f"targeted linears plus one layer's inverse), but only {free / GiB:.2f} GiB is available on {device}; "
            "free memory, target fewer modules per run in the recipe, or use WandaConfig (no Hessian)")
