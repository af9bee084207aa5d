"""How each sparsecc op chooses what runs: its Triton kernel or a fallback (kernel modes, ways, tuning).

Every op file registers its ways once (`register_ways`): the kernel, the fallback off the GPU in
mode "auto" (`cpu`), and the fallback in mode "reference" and on the GPU (`reference`). The op's
body runs what `pick` chooses from that registry, and the lowering report (`implementation`)
names the same functions, so the two cannot disagree.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..codegen.tuning import choose
from ..codegen.tuning import enabled as tuning_enabled

MODES = ("auto", "triton", "reference")
_mode: contextvars.ContextVar[str | None] = contextvars.ContextVar("sparsecc_kernels", default=None)


def check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"kernel mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def kernel_mode(forced: str | None = None) -> str:
    """`forced` (an op's `kernels` argument) if given, else the ambient mode: `use_kernels`, else
    $SPARSECC_KERNELS, else "auto"."""
    if forced is not None:
        return check_mode(forced)
    mode = _mode.get()
    return mode if mode is not None else check_mode(os.environ.get("SPARSECC_KERNELS", "auto"))


@contextlib.contextmanager
def use_kernels(mode: str):
    """Within the block, sparsecc ops called without `kernels=` use `mode` ("auto", "triton" or "reference")."""
    token = _mode.set(check_mode(mode))
    try:
        yield
    finally:
        _mode.reset(token)


def on_gpu(x: torch.Tensor) -> bool:
    """Where mode "auto" considers the Triton kernels: tensors on a CUDA device."""
    return x.is_cuda


@dataclass
class Ways:
    """What an op can run: its Triton `kernel`; its fallback off the GPU in mode "auto" (`cpu`); its
    fallback in mode "reference" and, timed against the kernel, on the GPU (`reference`); `others`:
    {name: where it applies} of further GPU ways mode "auto" times (e.g. torch's 2:4 product)."""

    kernel: Callable
    cpu: Callable
    reference: Callable
    others: dict[str, str] = field(default_factory=dict)


WAYS: dict[str, Ways] = {}


def register_ways(op: str, *, kernel: Callable, cpu: Callable, reference: Callable,
                  others: dict[str, str] | None = None) -> None:
    """Record what op `op` runs (each op file calls this beside its torch.library registration)."""
    WAYS[op] = Ways(kernel, cpu, reference, dict(others or {}))


last_way: dict[str, str] = {}  # op -> the way mode "auto" last ran it on the GPU (for benchmarks)


def pick(op: str, key: tuple, x: torch.Tensor, call: Callable, kernels: str | None = None,
         others: Callable[[], dict] | None = None) -> tuple[str, Callable]:
    """(name, thunk) of the way op `op` runs on input x; call(fn) runs a registered way with the op's
    arguments. Mode (`kernel_mode(kernels)`) "triton": the kernel; "reference": the reference;
    "auto" off the GPU: the CPU fallback. "auto" on the GPU: of the kernel ("kernel"), the reference
    ("fallback") and others() ({name: thunk}: the registered other ways that apply to this call),
    the one the tuner (codegen/tuning.py) timed fastest for this shape, so a kernel is never chosen
    where it would be slower. The names of the other ways are part of the tuning key: a choice
    cached before a way existed is not reused."""
    ways, mode = WAYS[op], kernel_mode(kernels)
    if mode == "triton":
        return "kernel", lambda: call(ways.kernel)
    if mode == "reference" or not on_gpu(x):
        fallback = ways.reference if mode == "reference" else ways.cpu
        return "fallback", lambda: call(fallback)
    run = {"kernel": lambda: call(ways.kernel), "fallback": lambda: call(ways.reference),
           **(others() if others else {})}
    if ways.kernel is ways.reference and len(run) == 2:  # one way only (csr_linear): nothing to time
        return "kernel", run["kernel"]
    names = tuple(name for name in run if name not in ("kernel", "fallback"))
    choice = choose(f"{op}/dispatch", (*key, *names), [{"run": name} for name in run],
                    lambda c: run[c["run"]](), x.device)["run"]
    last_way[op] = choice
    return choice, run[choice]


def dispatch(op: str, key: tuple, x: torch.Tensor, call: Callable, kernels: str | None = None):
    """Run op `op` on input x the way `pick` chooses."""
    return pick(op, key, x, call, kernels)[1]()


def implementation(op: str, device: torch.device | str, mode: str | None = None) -> str:
    """What op `op` ("nm_linear", ...) runs on `device` in kernel mode `mode` (None: the ambient
    one): the name of the registered function, or on the GPU in mode "auto" the ways timed."""
    ways, mode = WAYS[op], kernel_mode(mode)
    if mode == "triton":
        return ways.kernel.__name__
    if mode == "reference":
        return ways.reference.__name__
    if torch.device(device).type != "cuda":
        return ways.cpu.__name__
    if not tuning_enabled(torch.device(device)) or (ways.kernel is ways.reference and not ways.others):
        return ways.kernel.__name__
    timed = [ways.kernel.__name__, ways.reference.__name__, *(f"{n} ({where})" for n, where in ways.others.items())]
    return f"{', '.join(timed)}: whichever is timed fastest for the shape"
