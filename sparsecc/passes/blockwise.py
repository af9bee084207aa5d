"""Block-sequential execution (the SparseGPT/Wanda calibration setup).

One dense forward per calibration batch records how every decoder block is called (its
arguments and keyword arguments: masks, position embeddings, ...). Then block k runs alone on
the hidden states that blocks < k produced *after* they were transformed, so statistics of
block k reflect the already-sparsified prefix and only one block's activations are held at a
time. Linears outside the blocks (e.g. lm_head) are handled last by whole-model forwards.

Nothing here knows a model family: blocks come from `capture.find_blocks`; the hidden state is
the block's first tensor argument (or its `hidden_states` keyword) and the first element of
its output. On the first batch the probe checks that block k's output *is* block k+1's input;
if not, the model is calibrated as a whole instead (correct, but not memory-sequential).
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import CalibrationError
from ..graph.calibration import token_mask
from ..graph.capture import Captured, forward_model


class _Stop(Exception):
    pass


def hidden_slot(args, kwargs):
    """Where a block's call holds its hidden states: ("arg", 0) or ("kw", "hidden_states"); None."""
    if args and isinstance(args[0], torch.Tensor):
        return ("arg", 0)
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return ("kw", "hidden_states")
    return None


def slot_value(slot, args, kwargs):
    """The value at a `hidden_slot`."""
    return args[slot[1]] if slot[0] == "arg" else kwargs[slot[1]]


def _with_hidden(slot, args, kwargs, hidden):
    if slot[0] == "arg":
        args = (hidden,) + tuple(args[1:])
    else:
        kwargs = {**kwargs, slot[1]: hidden}
    return args, kwargs


def _same(a, b) -> bool:
    return a is not None and b is not None and (a is b or (a.shape == b.shape and torch.equal(a, b)))


def hidden_of(out):
    """A block's output hidden states (blocks return a tensor, or a tuple starting with it)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


class Sites(list):
    """A scope's linear sites; `holds(name)` says whether module `name` lies in the scope."""

    def __init__(self, sites, holds: Callable[[str], bool]):
        super().__init__(sites)
        self.holds = holds


@dataclass
class Scope:
    """A unit of calibration: the sites it holds and how to run it over all batches."""

    name: str
    sites: Sites
    run: Callable[[], None]   # one forward over all calibration batches

    def holds(self, module: str) -> bool:
        return self.sites.holds(module)


class BlockRunner:
    """Yields scopes: each decoder block in order, then the rest of the model.

    With `ctx.source` (sequential onloading: the blocks are on the meta device until loaded), the
    probe runs the model with every block replaced by a stub that records its call and passes the
    hidden states on; block k is then `source.load`ed before its scope and `source.done` after its
    outputs were computed (written and freed); what the pipeline held for it (statistics, decisions,
    the undo log: the modules rewrites replaced) is forgotten before those outputs are computed. A sweep
    that is not `final` (the whole-model sweep over the dense model before the one that transforms:
    OWL's) only observes: each block is `source.drop`ped after it, freed without being written."""

    def __init__(self, ctx, needs_data: bool = True, relevant: set[str] | None = None,
                 done_with_blocks: bool = False, final: bool = True):
        self.ctx = ctx
        self.final = final  # the last sweep over the blocks: the one whose blocks an onloading source writes
        # the sweep transforms: once a block's scope is over, what `ctx.keep` does not name may go
        self.forget = done_with_blocks and getattr(ctx, "keep", None) is not None
        self.needs_data = needs_data
        self.relevant = relevant  # sites some pass cares about (None: all)
        cap: Captured = ctx.captured
        self.model = ctx.model
        self.source = getattr(ctx, "source", None)
        self.blocks = [self.model.get_submodule(b) for b in cap.blocks]
        self.calls: list[list] = []
        self.hidden = ctx.activations.fresh()  # the current block's inputs, per batch (activations.py)
        try:
            self._start(needs_data)
        except BaseException:
            self.close()
            raise
        if needs_data and cap.blocks and not self.sequential:
            warnings.warn(f"{type(self.model).__name__}: blocks {cap.blocks[0]}... do not feed each other "
                          "directly; calibrating the whole model at once instead of block by block")

    def _start(self, needs_data: bool) -> None:
        if self.source is not None:
            if not self.blocks:
                raise CalibrationError(f"{type(self.model).__name__} has no decoder blocks to load one at a time; "
                                       "prune it whole (sparsify_, or sparsecc prune --no-onload)")
            self.sequential = True
            if needs_data:
                self.source.rest()  # the embeddings, if a sweep before this one left them on disk
                self._probe_stubs()
            return
        self.sequential = needs_data and bool(self.blocks) and self._probe()

    def close(self) -> None:
        """Free the hidden states kept (on disk: delete their files)."""
        self.hidden.close()

    @torch.no_grad()  # the hidden states kept must not hold the embeddings through an autograd graph
    def _probe(self) -> bool:
        n = len(self.blocks)
        self.calls = [[None] * len(self.ctx.batches) for _ in range(n)]
        first_in: dict[int, torch.Tensor] = {}
        first_out: dict[int, torch.Tensor] = {}
        state = {"b": 0}
        handles = []

        def pre(k):
            def hook(mod, args, kwargs):
                slot = hidden_slot(args, kwargs)
                if slot is None:
                    raise _Stop("no hidden-state argument")
                h = slot_value(slot, args, kwargs)
                if state["b"] == 0:
                    first_in[k] = h
                if k == 0:
                    self.hidden.append(h)
                args, kwargs = _with_hidden(slot, args, kwargs, None)
                self.calls[k][state["b"]] = (slot, args, kwargs)
            return hook

        def post(k):
            def hook(mod, args, kwargs, out):
                if state["b"] == 0:
                    first_out[k] = hidden_of(out)
                if k == n - 1:
                    raise _Stop()
            return hook

        for k, blk in enumerate(self.blocks):
            handles.append(blk.register_forward_pre_hook(pre(k), with_kwargs=True))
            handles.append(blk.register_forward_hook(post(k), with_kwargs=True))
        try:
            for b, batch in enumerate(self.ctx.batches):
                state["b"] = b
                try:
                    forward_model(self.model, batch)
                except _Stop as s:
                    if s.args:
                        return False
                else:
                    return False  # the last block never ran
        finally:
            for h in handles:
                h.remove()
        return all(_same(first_out.get(k), first_in.get(k + 1)) for k in range(n - 1))

    @torch.no_grad()
    def _probe_stubs(self) -> None:
        """The onloading probe: one forward per batch through stubs (no block is loaded) recording
        each block's call; the blocks must feed each other directly."""
        n = len(self.blocks)
        self.calls = [[None] * len(self.ctx.batches) for _ in range(n)]
        first_in: dict[int, torch.Tensor] = {}

        def record(k, b, args, kwargs):
            slot = hidden_slot(args, kwargs)
            if slot is None:
                raise CalibrationError(f"{self.ctx.captured.blocks[k]} takes no hidden-state tensor; its model cannot "
                                       "be loaded block by block: prune it whole (sparsify_, or sparsecc prune --no-onload)")
            h = slot_value(slot, args, kwargs)
            if b == 0:
                first_in[k] = h
            if k == 0:
                self.hidden.append(h)
            args, kwargs = _with_hidden(slot, args, kwargs, None)
            self.calls[k][b] = (slot, args, kwargs)
            if k == n - 1:
                raise _Stop()
            return h

        with self._stubbed(record) as state:
            for b, batch in enumerate(self.ctx.batches):
                state["b"] = b
                try:
                    forward_model(self.model, batch)
                except _Stop:
                    continue
                raise CalibrationError(f"the last decoder block of {type(self.model).__name__} never ran; its model "
                                       "cannot be loaded block by block: prune it whole (sparsify_, or sparsecc prune --no-onload)")
        # a stub returns its input: the model must hand it on to the next block unchanged
        if not all(first_in[k] is first_in.get(k + 1) for k in range(n - 1)):
            raise CalibrationError(f"{type(self.model).__name__} changes the hidden states between its decoder blocks; "
                                   "it cannot be loaded block by block: prune it whole (sparsify_, or sparsecc prune --no-onload)")

    @contextmanager
    def _stubbed(self, fn):
        """Replace every block by a stub calling fn(k, batch, args, kwargs) -> hidden states, which
        it returns in the form the block's own forward has (run on the meta device once)."""
        names = self.ctx.captured.blocks
        state = {"b": 0, "form": None}
        runner = self

        class Stub(nn.Module):
            def __init__(self, k):
                super().__init__()
                self.k = k

            def forward(self, *args, **kwargs):
                if state["form"] is None:
                    state["form"] = runner._output_form(args, kwargs)
                h = fn(self.k, state["b"], args, kwargs)
                return h if state["form"] == 0 else (h,) + (None,) * (state["form"] - 1)

        parents = [self.model.get_submodule(name.rpartition(".")[0]) for name in names]
        for k, (parent, name) in enumerate(zip(parents, names)):
            parent._modules[name.rpartition(".")[2]] = Stub(k)
        try:
            yield state
        finally:
            for parent, name, block in zip(parents, names, self.blocks):
                parent._modules[name.rpartition(".")[2]] = block

    @torch.no_grad()
    def _output_form(self, args, kwargs) -> int:
        """0 if a block returns its hidden states as a tensor, n if as a tuple of n (the rest None)."""
        from torch.utils._pytree import tree_map

        args, kwargs = tree_map(lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v, (args, kwargs))
        out = self.blocks[0](*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return 0
        if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor) and all(o is None for o in out[1:]):
            return len(out)
        raise CalibrationError(f"{self.ctx.captured.blocks[0]} returns more than its hidden states; its model cannot "
                               "be loaded block by block: prune it whole (sparsify_, or sparsecc prune --no-onload)")

    def scopes(self):
        sites = self.ctx.captured.sites
        if self.sequential:
            names = self.ctx.captured.blocks
            for k, block in enumerate(self.blocks):
                in_block = [s for s in sites.values() if s.name.startswith(names[k] + ".")]
                holds = (lambda m, b=names[k]: m == b or m.startswith(b + "."))
                if self.source is not None:
                    self.source.load(k, names[k])
                yield Scope(names[k], Sites(in_block, holds), lambda k=k: self._run_block(k))
                # the block's passes are over: what they held for it goes before its outputs are computed
                if self.source is not None and self.final:
                    # onloading never changes its source folder: nothing to undo, and the modules that
                    # rewrites replaced (kept by the undo log) are freed now, not beside the block's outputs
                    self.ctx.tx.commit()
                if self.forget:
                    self.ctx.forget(holds, self.ctx.keep)
                if self.needs_data:
                    outs = self._run_block(k, self.hidden.fresh())  # outputs after this block's transforms
                    self.hidden.drop()
                    self.hidden = outs
                    self.calls[k] = None  # free what block k needed
                if self.source is not None and self.final:
                    self.source.done(k, names[k], [r for r in self.ctx.rows if holds(r["module"])])
                elif self.source is not None:
                    self.source.drop(k, names[k])  # observed only: read again by the sweep that writes
        if self._rest_needed():
            if self.source is not None:
                self.source.rest()
            outside = (lambda m: not self.sequential or self.ctx.captured.block_of(m + ".") is None)
            yield Scope("model" if not self.sequential else "rest", Sites(self._rest(), outside), self._run_model)

    def num_scopes(self) -> int:
        return (len(self.blocks) if self.sequential else 0) + self._rest_needed()

    def _rest(self) -> list:
        """Sites outside the blocks (all of them when not sequential)."""
        sites = self.ctx.captured.sites.values()
        return [s for s in sites if not self.sequential or self.ctx.captured.block_of(s.name) is None]

    def _rest_needed(self) -> bool:
        """Whether the rest scope holds anything a pass wants (`relevant`: site or module names)."""
        if self.relevant is None:
            return bool(self._rest()) or not self.sequential
        return any(not self.sequential or self.ctx.captured.block_of(n + ".") is None for n in self.relevant)

    @torch.no_grad()
    def _run_block(self, k: int, outs=None):
        """Run block k on every batch; its outputs go into `outs` (an Activations) when given."""
        for b, call in enumerate(self.calls[k]):
            slot, args, kwargs = call
            args, kwargs = _with_hidden(slot, args, kwargs, self.hidden[b])
            self.ctx.set_batch(b, token_mask(self.ctx.batches[b]))
            out = hidden_of(self.blocks[k](*args, **kwargs))
            if outs is not None:
                outs.append(out)
        return outs

    @torch.no_grad()
    def _run_model(self) -> None:
        if not self.needs_data:
            return
        if self.source is not None:  # the blocks are gone: the last one's outputs stand in for them
            last = len(self.blocks) - 1
            with self._stubbed(lambda k, b, args, kwargs: self.hidden[b] if k == last
                               else slot_value(hidden_slot(args, kwargs), args, kwargs)) as state:
                for b, batch in enumerate(self.ctx.batches):
                    state["b"] = b
                    self.ctx.set_batch(b, token_mask(batch))
                    forward_model(self.model, batch)
            return
        for b, batch in enumerate(self.ctx.batches):
            self.ctx.set_batch(b, token_mask(batch))
            forward_model(self.model, batch)
