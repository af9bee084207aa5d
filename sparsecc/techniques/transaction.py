"""One undo log for every change a run makes to a model.

A transform records what it is about to change *before* changing it: `save(param)` keeps a
parameter's value, `swap(name, module)` replaces a submodule and remembers the old one, and
`on_undo(fn)` takes any other undo (a hook to remove, a layout to put back). `rollback()` undoes
everything (module swaps and other undos in reverse order, then the saved parameter values), so a
failed or trial run leaves the model as it was; `commit()` forgets the log.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class Transaction:
    def __init__(self, model: nn.Module):
        self.model = model
        self._params: dict[str, torch.Tensor] = {}
        self._undo: list[Callable[[], None]] = []
        self.swapped: list[str] = []   # module names replaced so far
        #: parameters not to copy (sequential onloading: a block's are in its source files, and a
        #: failed run discards the model, so the undo copy would only double the block's memory)
        self.unsaved: Callable[[str], bool] = lambda name: False

    def save(self, *params) -> None:
        """Keep the current value of each parameter (a name, or anything with a `.param` name)."""
        for p in params:
            name = p if isinstance(p, str) else p.param
            if name not in self._params and not self.unsaved(name):
                self._params[name] = self.model.get_parameter(name).detach().clone()

    def on_undo(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def set_attr(self, obj, name: str, value) -> None:
        """Set attribute `name` of `obj` (a module's head count, a config field), the undo recorded first."""
        old = getattr(obj, name)
        self.on_undo(lambda: setattr(obj, name, old))
        setattr(obj, name, value)

    def swap(self, name: str, module: nn.Module) -> None:
        """Put `module` in place of submodule `name` (the undo recorded first)."""
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        old = getattr(parent, child)
        self.on_undo(lambda: setattr(parent, child, old))
        setattr(parent, child, module)
        self.swapped.append(name)

    @torch.no_grad()
    def rollback(self) -> None:
        """Undo everything; an undo that fails does not stop the others (the first error is raised
        after all of them ran)."""
        errors = []
        for undo in reversed(self._undo):  # module swaps first, then the weights inside them
            try:
                undo()
            except Exception as e:  # noqa: PERF203  (keep undoing)
                errors.append(e)
        for name, value in self._params.items():
            try:
                self.model.get_parameter(name).copy_(value)
            except Exception as e:  # noqa: PERF203
                errors.append(e)
        self.commit()
        if errors:
            raise errors[0]

    def commit(self) -> None:
        self._params.clear()
        self._undo.clear()
        self.swapped.clear()
