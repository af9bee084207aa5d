"""Model -> what torch.compile sees: the linear calls in the dynamo graph, mapped back to modules.

`capture(model, batch)` runs one forward through dynamo with a recording backend. In every
captured graph it finds the matmul-like calls whose weight operand is a graph input
(`F.linear(x, W)`, `addmm(b, x, W)` as in GPT-2's Conv1D, `x @ W`); dynamo passes the real
parameter tensors as those inputs, so each is matched to its parameter name by storage, and
the module that made the call comes from the node's `nn_module_stack`. Nothing here depends
on the model family: the same code finds the linears of Llama, OPT, GPT-2 or a plain MLP.

The repeated decoder blocks are found structurally (a ModuleList/Sequential of same-type
children that hold linears), never by attribute names such as `model.layers`.
"""
from __future__ import annotations

import dataclasses
import inspect
import operator
import re
import threading
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from .channels import feeding_linears
from .gated import GatedMLP, PlainMLP, find_gated, gated_mlp, plain_mlp
from .heads import AttentionHeads, attention_heads, find_heads
from ..errors import CaptureError

# call target -> (index of the input operand, index of the weight operand, weight stored as [in, out])
_LINEAR_TARGETS = {
    torch._C._nn.linear: (0, 1, False),
    torch.nn.functional.linear: (0, 1, False),
    torch.addmm: (1, 2, True),
    torch.matmul: (0, 1, True),
    operator.matmul: (0, 1, True),
}


@dataclass(frozen=True)
class GraphLinear:
    """A linear call in a captured graph whose weight is graph input number `input_index`."""

    node: fx.Node
    input_index: int     # position among the graph's placeholders
    arg_index: int       # position of the weight among the call's arguments
    x_index: int         # position of the input among the call's arguments
    module: str          # dotted module path of the caller, "" if unknown
    transposed: bool     # weight laid out [in, out]


def module_path(node: fx.Node) -> str:
    """Dotted module name of the innermost module that made this call ('' if none)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # strip the root: "L['self']", "L['args'][0]", "L['fn']", ...
    path = re.sub(r"^L\[[^\]]*\](\[\d+\])*\.?", "", path)
    # "_modules['layers']" / "layers[0]" forms -> dotted
    path = re.sub(r"_modules\['([^']*)'\]", r"\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.strip(".").replace("..", ".")


def graph_linears(gm: fx.GraphModule) -> list[GraphLinear]:
    placeholders = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _LINEAR_TARGETS:
            continue
        x_idx, idx, transposed = _LINEAR_TARGETS[node.target]
        if len(node.args) <= idx or not isinstance(node.args[idx], fx.Node):
            continue
        w = node.args[idx]
        if w not in placeholders:
            continue
        val = w.meta.get("example_value")
        if val is not None and val.dim() != 2:
            continue
        found.append(GraphLinear(node, placeholders[w], idx, x_idx, module_path(node), transposed))
    return found


@dataclass(frozen=True)
class LinearSite:
    """A linear layer sparsecc can rewrite: module `name` owns the 2-D parameter `param`."""

    name: str
    param: str
    out_features: int
    in_features: int
    transposed: bool = False  # stored [in, out] (GPT-2 Conv1D)
    tied: tuple[str, ...] = ()  # other names of the same parameter (e.g. a tied embedding)
    # parameters whose output channels are this layer's input channels, as (name, transposed):
    # permuting its input columns together with their rows keeps the model's function (channels.py)
    feeders: tuple[tuple[str, bool], ...] = ()

    def weight(self, model: nn.Module) -> torch.Tensor:
        """The weight as an [out, in] view sharing storage with the parameter."""
        w = model.get_parameter(self.param).data
        return w.t() if self.transposed else w

    def to_dict(self) -> dict:
        return {"name": self.name, "param": self.param, "out_features": self.out_features,
                "in_features": self.in_features, "transposed": self.transposed, "tied": list(self.tied),
                "feeders": [list(f) for f in self.feeders]}

    @classmethod
    def from_dict(cls, d: dict) -> "LinearSite":
        return cls(**{**d, "tied": tuple(d.get("tied", ())), "feeders": tuple(tuple(f) for f in d.get("feeders", ()))})


# --- recording backend -----------------------------------------------------------------
# One backend object for every capture, so dynamo reuses its cache entry instead of
# piling up recompiles; the compiled function reports its linears each time it runs,
# resolving weights from the actual inputs (a new model of the same shape hits the cache).
_session = threading.local()


def _recorder(gm: fx.GraphModule, example_inputs):
    linears = graph_linears(gm)
    by_node = {gl.node: gl for gl in linears}
    fed = {}
    for gl in linears:
        producers = feeding_linears(gl.node, gl.node.args[gl.x_index], set(by_node))
        fed[gl.node] = [by_node[p].module for p in producers or ()]

    # the graph node each linear reads: linears reading the same one in the same run share their input
    inputs = {gl.node: x.name if isinstance(x := gl.node.args[gl.x_index], fx.Node) else None for gl in linears}
    gated = find_gated([gl for gl in linears if gl.module])
    heads = find_heads(gm, [gl for gl in linears if gl.module])
    attention = [module_path(n) for n in gm.graph.nodes
                 if n.op == "call_function" and n.target is torch.nn.functional.scaled_dot_product_attention]

    def run(*args):
        seen = getattr(_session, "seen", None)
        if seen is not None:
            seen.append((gm, [(gl.module, args[gl.input_index], gl.transposed, fed[gl.node], inputs[gl.node])
                              for gl in linears], gated, attention, heads))
        return gm.forward(*args)

    return run


@dataclass
class Captured:
    """Result of `capture`: graphs, linear sites (in call order) and the decoder blocks."""

    model: nn.Module
    graphs: list[fx.GraphModule]
    sites: dict[str, LinearSite]
    blocks: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # module -> why it is not a site
    gated: dict[str, GatedMLP] = field(default_factory=dict)  # gated MLP modules (gated.py), by name
    attention: list[str] = field(default_factory=list)  # modules calling scaled_dot_product_attention
    heads: dict[str, AttentionHeads] = field(default_factory=dict)  # attention modules with separate q/k/v/o (heads.py)
    plain: dict[str, PlainMLP] = field(default_factory=dict)  # down(act(up(x))) MLPs, by name
    # linear sites that always read the same input tensor (q/k/v, gate/up), in call order; each site
    # in such a group maps to its group (sites called once per forward, within one decoder block)
    same_input: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def block_of(self, site: str) -> int | None:
        for i, b in enumerate(self.blocks):
            if site.startswith(b + "."):
                return i
        return None


def call_model(model: nn.Module, batch):
    if isinstance(batch, dict):
        return model(**batch)
    return model(batch)


# Captures run in a dynamo region of their own (isolate_recompiles), so what they leave on the
# model's code objects never reaches the user's torch.compile, or a later capture: their cache
# entries count against no other compile's recompile limit, and when the model's own code raises
# (a hook, a batch it rejects), the frames dynamo then marks "skip" for good (WON'T CONVERT; among
# them transformers' forward decorators, which every model shares) are skipped in that region
# only. A capture that fails drops its region; the next one starts a new region.
_region = None


def model_kwargs(model: nn.Module) -> dict:
    """Calibration forwards need no KV cache: pass use_cache=False where the model takes it."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def forward_model(model, batch):
    extra = model_kwargs(model)
    if extra and isinstance(batch, dict):
        return model(**{**extra, **batch})
    if extra:
        return model(batch, **extra)
    return call_model(model, batch)


def _record(model: nn.Module, batch, fresh: bool = False) -> list:
    import torch._dynamo

    global _region
    if _region is None or fresh:
        _region = _new_region(retry=fresh)
    _session.seen, done = [], False
    try:
        with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=64):
            call_model(_region(model), batch)
        done = True
        return _session.seen
    except Exception as e:
        raise CaptureError(f"dynamo could not run {type(model).__name__} on the calibration batch: {e}") from e
    finally:
        _session.seen = None
        if not done:
            _region = None
            if not _ISOLATED:  # torch < 2.12 has one shared cache: clearing it is the only way back
                torch._dynamo.reset()


_ISOLATED = True


def _new_region(retry: bool):
    """A dynamo context recording linear calls, in a recompile region of its own where torch has
    them. Older torch shares one cache: a retry after an empty capture clears it, as before."""
    import torch._dynamo

    global _ISOLATED
    try:
        return torch._dynamo.optimize(_recorder, isolate_recompiles=True)
    except TypeError:  # torch < 2.12 (e.g. 2.11 on the GPU machines): no isolate_recompiles
        _ISOLATED = False
        if retry:
            torch._dynamo.reset()
        return torch._dynamo.optimize(_recorder)


def capture(model: nn.Module, batch) -> Captured:
    """Trace `model` on one `batch` through dynamo and collect its linear sites and blocks."""
    by_storage: dict[tuple, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_storage.setdefault(_storage_key(p), []).append(name)

    seen = _record(model, batch)
    if not seen:
        # Dynamo ran the model eagerly: transformers wraps every model's forward in the same
        # decorator function, whose compiled variants count against one recompile limit (per
        # region). Capture again in a new region.
        seen = _record(model, batch, fresh=True)
    if not seen:  # e.g. dynamo's limit across regions (accumulated_recompile_limit) is spent
        raise CaptureError(f"dynamo compiled no graph of {type(model).__name__} (disabled, or its recompile limits "
                           "are spent): call torch._dynamo.reset() and try again")

    sites: dict[str, LinearSite] = {}
    feeds: dict[str, list[str]] = {}
    skipped: dict[str, str] = {}
    graphs = []
    gated: dict[str, GatedMLP] = {}
    attention: list[str] = []
    found_heads: list[tuple] = []
    calls_of: dict[str, int] = {}  # module -> how many linear calls it made
    read: dict[tuple, list[str]] = {}  # (graph run, input node) -> the modules reading it
    for run, (gm, calls, found, attn, hs) in enumerate(seen):
        for mod, *_, node in calls:
            calls_of[mod] = calls_of.get(mod, 0) + 1
            if node is not None:
                read.setdefault((run, node), []).append(mod)
    for gm, calls, found, attn, hs in seen:
        if gm not in graphs:
            graphs.append(gm)
        attention += [a for a in attn if a and a not in attention]
        found_heads += [h for h in hs if h not in found_heads]
        for g in filter(None, (gated_mlp(*f) for f in found)):
            gated.setdefault(g.name, g)
        for mod, tensor, transposed, producers, _ in calls:
            names = by_storage.get(_storage_key(tensor), [])
            # the alias owned by the calling module (a tied lm_head calls with embed_tokens.weight)
            owned = [n for n in names if n.rpartition(".")[0] == mod]
            if not owned:
                if names:
                    skipped[mod or names[0]] = f"weight {names[0]} is used inside {mod or 'the model'}, not by its owner"
                continue
            if mod in sites:
                continue
            out_f, in_f = (tensor.shape[1], tensor.shape[0]) if transposed else tuple(tensor.shape)
            tied = tuple(n for n in names if n != owned[0])
            sites[mod] = LinearSite(mod, owned[0], int(out_f), int(in_f), transposed, tied)
            feeds[mod] = producers
    if not sites:
        raise CaptureError(f"{type(model).__name__} has no linear layers sparsecc can rewrite (it looks for "
                           "F.linear / addmm / matmul calls whose weight is a 2-D parameter)")
    for name, producers in feeds.items():
        if producers and all(p in sites for p in producers):
            sites[name] = dataclasses.replace(sites[name], feeders=_feeder_params(model, sites, producers))
    gated = {n: g for n, g in gated.items() if all(f"{n}.{c}" in sites for c in (g.gate, g.up, g.down))}
    heads = {h.name: h for h in (attention_heads(*f, sites) for f in found_heads) if h is not None}
    gated_downs = {f"{n}.{g.down}" for n, g in gated.items()}
    plain = {p.name: p for p in (plain_mlp(ps[0], c) for c, ps in feeds.items()
                                 if len(ps) == 1 and c not in gated_downs and ps[0] in sites) if p is not None}
    blocks = find_blocks(model, sites)
    return Captured(model, graphs, sites, blocks, skipped, gated, attention, heads, plain,
                    _input_groups(read.values(), sites, calls_of, blocks))


def _input_groups(readers, sites: dict, calls_of: dict[str, int], blocks: list[str]) -> dict[str, tuple[str, ...]]:
    """{site: its group} for groups of 2+ sites reading one graph node, each called once per forward
    (a module called twice sees two inputs) and all in one decoder block (or all outside them)."""
    def block(name):
        return next((b for b in blocks if name.startswith(b + ".")), None)

    out: dict[str, tuple[str, ...]] = {}
    for mods in readers:
        group = tuple(dict.fromkeys(m for m in mods if m in sites and calls_of[m] == 1))
        if len(group) >= 2 and len({block(m) for m in group}) == 1:
            out |= dict.fromkeys(group, group)
    return out


def _storage_key(t: torch.Tensor) -> tuple:
    """What identifies a parameter's storage: its address and shape, or, on the meta device (no
    storage: every address is 0), the parameter object itself, which dynamo passes through and
    which tied weights share (a model built on meta for onloading, io/lazy.py)."""
    return ("meta", id(t)) if t.is_meta else (t.data_ptr(), tuple(t.shape))


def _feeder_params(model: nn.Module, sites: dict[str, LinearSite], producers: list[str]) -> tuple:
    out = []
    for p in producers:
        out.append((sites[p].param, sites[p].transposed))
        bias = getattr(model.get_submodule(p), "bias", None)
        if isinstance(bias, nn.Parameter):
            out.append((p + ".bias", False))
    return tuple(out)


def find_blocks(model: nn.Module, sites) -> list[str]:
    """The repeated blocks: the ModuleList/Sequential of same-type children holding the most linears."""
    best: list[str] = []
    best_count = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) < 2:
            continue
        children = [(f"{name}.{k}" if name else k, c) for k, c in mod.named_children()]
        if len({type(c) for _, c in children}) != 1:
            continue
        counts = [sum(1 for s in sites if s.startswith(cn + ".")) for cn, _ in children]
        if min(counts) == 0:
            continue
        if sum(counts) > best_count:
            best, best_count = [cn for cn, _ in children], sum(counts)
    return best
