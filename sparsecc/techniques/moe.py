"""MoEfication: a dense gated MLP split into a mixture of experts (Zhang et al. 2022; seed 000
"MoE", seed 001 Switch Transformer).

    y = down(act(gate(x)) * up(x)) = Σ_e down_e(act(gate_e(x)) * up_e(x))

holds exactly when the I intermediate neurons are partitioned into E experts of I/E neurons
each (expert e keeps its neurons' rows of W_gate, W_up and columns of W_down). Running only the
top_k experts a router picks per token computes top_k/E of the neurons.

`MoEConfig(num_experts=8, top_k=2, capacity_factor=None, router="fitted")` targets gated MLP
modules (`sparsecc.gated`), e.g. {"re:.*mlp": MoEConfig(8, 2)}:

- Split: balanced spherical k-means over the neurons' weight vectors [W_gate[i], W_up[i]] / ‖·‖
  (a few Lloyd iterations from a seeded start; each assignment step gives the (neuron, centroid)
  pairs to the most similar first, at most I/E neurons per centroid).
- Router, in fp32 (Switch's selective precision): "fitted" fits x ↦ s(x) by ridge least squares
  on the calibration tokens, where s_e(x) = ‖h_e(x)‖₂ is the norm of expert e's slice of
  h = act(x W_gateᵀ) * (x W_upᵀ), so the router ranks experts by how much they would contribute;
  only XᵀX and XᵀS are accumulated (one forward with hooks, no tokens kept). "centroid" is
  data-free: router row e = the mean of expert e's normalised W_gate rows.
- Routing: the top_k experts by router logit, summed unweighted (k = E is the dense MLP); with
  capacity_factor c, each expert takes at most ceil(c·T·k/E) tokens of a call (Switch capacity),
  the rest get nothing from it. The MLP becomes `MoEMLP`, one op: `torch.ops.sparsecc.moe_ffn`.

Routers are fitted after the recipe's weight pruning, on the model's own activations, before
any MLP is split (as CATS calibrates). `moe_load_balance` measures Switch's balance statistics.

`SparseMoEConfig()` lowers models that are MoE already (Mixtral's sparse MoE blocks, data-free)
to the same MoEMLP/op in mode "softmax_topk", unchanged, optionally with a capacity limit.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..calibration import token_mask
from ..codegen.cats_mlp import ACTIVATIONS
from ..codegen import ops as _ops  # noqa: F401  (registers torch.ops.sparsecc.moe_ffn)
from ..codegen.moe_ffn import MODES, Routing, route
from ..configs import SparsityConfig, register_technique
from ..errors import CalibrationError, PlanError, RecipeError
from ..gated import GatedMLP
from ..rewrites import ModuleRewrite, RewriteContext, observe

ROUTERS = ("fitted", "centroid")
RIDGE = 1e-3       # ridge λ of the router fit, relative to the mean of diag(XᵀX)
KMEANS_ITERS = 20  # Lloyd iterations of the balanced k-means (stops early once stable)


@dataclass(frozen=True)
class MoEConfig(SparsityConfig):
    """Split a gated MLP into `num_experts` experts and run the `top_k` a router picks per token."""

    TARGET = "gated_mlp"
    num_experts: int = 8
    top_k: int = 2
    capacity_factor: float | None = None
    router: str = "fitted"

    def validate(self) -> None:
        for field in ("num_experts", "top_k"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise RecipeError(f"MoEConfig.{field} must be an integer >= 1, got {v!r}")
        if self.top_k > self.num_experts:
            raise RecipeError(f"MoEConfig: top_k={self.top_k} > num_experts={self.num_experts}; choose "
                              f"top_k <= {self.num_experts} (top_k = num_experts is the dense MLP)")
        _check_capacity(self.capacity_factor, "MoEConfig")
        if self.router not in ROUTERS:
            raise RecipeError(f"MoEConfig.router must be one of {ROUTERS}, got {self.router!r}")


def _check_capacity(cf, config: str) -> None:
    if cf is not None and (isinstance(cf, bool) or not isinstance(cf, (int, float)) or not cf > 0 or math.isinf(cf)):
        raise RecipeError(f"{config}.capacity_factor must be None (no capacity limit) or a number > 0 "
                          f"(Switch uses 1.0-2.0), got {cf!r}")


@register_technique(MoEConfig)
class MoETechnique(ModuleRewrite):
    requires = ("mlp_activations",)  # router="fitted" only: collected by fit_routers, not by a linear pass
    what = "gated MLP (down(act(gate(x)) * up(x)), as in Llama or Mistral)"
    order = 25

    def needs_data(self, config: MoEConfig) -> bool:
        return config.router == "fitted"

    def candidates(self, captured) -> dict[str, GatedMLP]:
        return captured.gated

    def rewrite(self, ctx: RewriteContext, specs: dict[str, GatedMLP], configs: dict[str, MoEConfig]) -> list[dict]:
        return apply_moe(ctx.model, specs, configs, ctx.batches, ctx.forward, ctx.on_restore, ctx.progress)

    def restore(self, model: nn.Module, rows: list[dict]) -> list[str]:
        return restore_moe(model, rows)


class MoEMLP(nn.Module):
    """A gated MLP as E experts of `expert_size` neurons plus a router, computed by one op.

    Parameters: w_gate, w_up [E, expert_size, hidden], w_down [E, hidden, expert_size], and
    b_gate, b_up [E, expert_size], b_down [hidden] where the dense MLP had biases. Buffers: the
    router, router_weight [E, hidden] and router_bias [E], in fp32 (`model.to(dtype)` casts them
    too, but the op computes the routing in fp32 whatever their dtype)."""

    def __init__(self, hidden: int, expert_size: int, num_experts: int, top_k: int,
                 capacity_factor: float | None = None, act: str = "silu", mode: str = "sum",
                 bias: tuple[bool, bool, bool] = (False, False, False), router_bias: bool = True,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        if act not in ACTIVATIONS or mode not in MODES or not 1 <= top_k <= num_experts:
            raise ValueError(f"MoEMLP: bad act {act!r}, mode {mode!r} or top_k {top_k} (of {num_experts} experts)")
        self.top_k, self.capacity_factor, self.act, self.mode = top_k, capacity_factor, act, mode
        new = lambda *shape: nn.Parameter(torch.zeros(*shape, dtype=dtype, device=device))  # noqa: E731
        self.w_gate, self.w_up = new(num_experts, expert_size, hidden), new(num_experts, expert_size, hidden)
        self.w_down = new(num_experts, hidden, expert_size)
        for name, on, shape in zip(("b_gate", "b_up", "b_down"), bias,
                                   ((num_experts, expert_size), (num_experts, expert_size), (hidden,))):
            self.register_parameter(name, new(*shape) if on else None)
        self.register_buffer("router_weight", torch.zeros(num_experts, hidden, dtype=torch.float32, device=device))
        self.register_buffer("router_bias", torch.zeros(num_experts, dtype=torch.float32, device=device)
                             if router_bias else None)

    @property
    def num_experts(self) -> int:
        return self.w_gate.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.sparsecc.moe_ffn(x, self.router_weight, self.router_bias, self.w_gate, self.b_gate, self.w_up,
                                          self.b_up, self.w_down, self.b_down, self.top_k,
                                          float(self.capacity_factor or 0.0), self.act, self.mode)

    def route(self, x: torch.Tensor) -> Routing:
        """The routing forward() uses for x [..., hidden] (tokens flattened): for statistics."""
        return route(x.reshape(-1, x.shape[-1]), self.router_weight, self.router_bias, self.top_k,
                     float(self.capacity_factor or 0.0), self.mode)

    def extra_repr(self) -> str:
        e, m, h = self.w_gate.shape
        return (f"hidden={h}, experts={e} x {m} neurons, top_k={self.top_k}, capacity_factor={self.capacity_factor}, "
                f"act={self.act}, mode={self.mode}")


# --- splitting -------------------------------------------------------------------------------

def _balanced_assign(sim: torch.Tensor, size: int) -> torch.Tensor:
    """Greedy capacity-limited assignment: (neuron, centroid) pairs by decreasing similarity,
    each neuron to the first centroid that still has room (`size` neurons each)."""
    n, k = sim.shape
    out, room, left = [-1] * n, [size] * k, n
    for pair in torch.argsort(sim.flatten().cpu(), descending=True, stable=True).tolist():
        i, e = divmod(pair, k)
        if out[i] < 0 and room[e] > 0:
            out[i], room[e], left = e, room[e] - 1, left - 1
            if not left:
                break
    return torch.tensor(out, device=sim.device)


@torch.no_grad()
def split_experts(w_gate: torch.Tensor, w_up: torch.Tensor, num_experts: int, seed: int = 0) -> torch.Tensor:
    """[E, I/E] neuron indices (ascending) of each expert: balanced spherical k-means over the rows
    of [W_gate, W_up] (MoEfication's parameter clustering). Deterministic for a given seed."""
    inter = w_gate.shape[0]
    v = F.normalize(torch.cat([w_gate, w_up], 1).float(), dim=1)
    start = torch.randperm(inter, generator=torch.Generator().manual_seed(seed))[:num_experts]
    centroids, assign = v[start.to(v.device)], None
    for _ in range(KMEANS_ITERS):
        new = _balanced_assign(v @ centroids.t(), inter // num_experts)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        centroids = F.normalize(torch.zeros_like(centroids).index_add_(0, assign, v), dim=1)
    return torch.argsort(assign, stable=True).view(num_experts, -1)  # stable: ascending within an expert


# --- routers ---------------------------------------------------------------------------------

def centroid_router(w_gate: torch.Tensor, neurons: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-free router: row e = mean of expert e's normalised W_gate rows (x · row = the mean
    normalised gate pre-activation of its neurons); zero bias."""
    w = F.normalize(w_gate.float(), dim=1)[neurons].mean(1)
    return w, torch.zeros(neurons.shape[0], device=w.device)


class _RouterStats:
    """Sufficient statistics of the ridge fit s ≈ [x, 1] W (fp64): XᵀX, XᵀS, ΣS, ΣS², count."""

    def __init__(self, hidden: int, experts: int, device):
        kw = dict(dtype=torch.float64, device=device)
        self.xtx, self.xts = torch.zeros(hidden + 1, hidden + 1, **kw), torch.zeros(hidden + 1, experts, **kw)
        self.s1, self.s2, self.n = torch.zeros(experts, **kw), torch.zeros(experts, **kw), 0

    def add(self, x: torch.Tensor, s: torch.Tensor) -> None:
        x = torch.cat([x.double(), x.new_ones(x.shape[0], 1, dtype=torch.float64)], 1)
        s = s.double()
        self.xtx += x.t() @ x
        self.xts += x.t() @ s
        self.s1 += s.sum(0)
        self.s2 += (s * s).sum(0)
        self.n += x.shape[0]

    def solve(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(router weight [E, H] fp32, bias [E] fp32, R²): W = (XᵀX + λI')⁻¹ XᵀS, the intercept
        unregularised; R² = 1 - SSE/SST pooled over the experts (on the calibration tokens)."""
        h = self.xtx.shape[0] - 1
        lam = RIDGE * float(self.xtx.diagonal()[:h].mean()) + 1e-12
        reg = torch.full((h + 1,), lam, dtype=torch.float64, device=self.xtx.device)
        reg[h] = 0
        w = torch.linalg.solve(self.xtx + torch.diag(reg), self.xts)
        sse = self.s2 - 2 * (w * self.xts).sum(0) + (w * (self.xtx @ w)).sum(0)
        sst = self.s2 - self.s1 ** 2 / self.n
        r2 = 1 - float(sse.sum() / sst.sum()) if float(sst.sum()) > 0 else 1.0
        return w[:h].t().float(), w[h].float(), r2


@torch.no_grad()
def fit_routers(model: nn.Module, gated: dict[str, GatedMLP], neurons: dict[str, torch.Tensor], batches: list,
                forward, progress: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{mlp: (router weight, bias, R²)} fitted in one forward over the calibration batches: a
    pre-hook on the gate linear keeps the MLP input x, one on the down linear reads
    h = act(gate(x)) * up(x) and adds (x, ‖h_e‖₂ per expert) to the MLP's ridge statistics."""
    from tqdm.auto import tqdm

    stats, handles, ctx = {}, [], {}

    def keep_x(name):
        def hook(module, args):
            ctx[name] = args[0]
        return hook

    def add(name):
        def hook(module, args):
            x, h = ctx.pop(name).detach(), args[0].detach()
            mask = ctx.get("mask")
            if mask is not None and mask.shape == x.shape[:-1]:
                x, h = x[mask], h[mask]
            x, h = x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1]).float()
            if not (torch.isfinite(x).all() and torch.isfinite(h).all()):
                raise CalibrationError(f"NaN/Inf in the activations of {name}: check the calibration batches and "
                                       "the model's dtype")
            e, m = neurons[name].shape
            s = h[:, neurons[name].reshape(-1)].view(-1, e, m).norm(dim=-1)  # s_e = ‖h_e‖₂
            if name not in stats:
                stats[name] = _RouterStats(x.shape[1], e, x.device)
            stats[name].add(x, s)
        return hook

    try:
        for name, spec in gated.items():
            mlp = model.get_submodule(name)
            handles.append(getattr(mlp, spec.gate).register_forward_pre_hook(keep_x(name)))
            handles.append(getattr(mlp, spec.down).register_forward_pre_hook(add(name)))
        for batch in tqdm(batches, desc="MoE routers", unit="batch", disable=not progress):
            ctx["mask"] = token_mask(batch)
            forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in gated if n not in stats or stats[n].n == 0]
    if missing:
        raise CalibrationError(f"{missing[0]}: its MLP never ran on a calibration token")
    return {name: s.solve() for name, s in stats.items()}


# --- the rewrite -----------------------------------------------------------------------------

def moe_from_dense(mlp: nn.Module, spec: GatedMLP, neurons: torch.Tensor, router: tuple, cfg: MoEConfig) -> MoEMLP:
    """The MoEMLP whose expert e holds the dense MLP's neurons `neurons[e]`."""
    gate, up, down = (getattr(mlp, c) for c in (spec.gate, spec.up, spec.down))
    (e, m), hidden, flat = neurons.shape, gate.weight.shape[1], neurons.reshape(-1)
    bias = tuple(lin.bias is not None for lin in (gate, up, down))
    w = gate.weight
    moe = MoEMLP(hidden, m, e, cfg.top_k, cfg.capacity_factor, spec.act, "sum", bias, True, w.dtype, w.device)
    with torch.no_grad():
        moe.w_gate.copy_(gate.weight[flat].view(e, m, hidden))
        moe.w_up.copy_(up.weight[flat].view(e, m, hidden))
        moe.w_down.copy_(down.weight[:, flat].view(hidden, e, m).transpose(0, 1))
        if bias[0]:
            moe.b_gate.copy_(gate.bias[flat].view(e, m))
        if bias[1]:
            moe.b_up.copy_(up.bias[flat].view(e, m))
        if bias[2]:
            moe.b_down.copy_(down.bias)
        moe.router_weight.copy_(router[0])
        moe.router_bias.copy_(router[1])
    return moe


def _check(model: nn.Module, name: str, spec: GatedMLP, cfg: MoEConfig) -> None:
    mlp = model.get_submodule(name)
    linears = [getattr(mlp, c) for c in (spec.gate, spec.up, spec.down)]
    if not all(type(lin) is nn.Linear for lin in linears):
        raise RecipeError(f"{name}: MoEConfig splits nn.Linear weights; its linears are "
                          f"{[type(lin).__name__ for lin in linears]} (apply MoEConfig before compress_nm_)")
    inter = linears[0].weight.shape[0]
    if inter % cfg.num_experts:
        fits = [d for d in range(2, min(inter, 64) + 1) if inter % d == 0]
        raise RecipeError(f"{name}: intermediate size {inter} is not divisible by num_experts={cfg.num_experts}; "
                          f"experts must be equal, choose num_experts among {fits[:12]}")


def _swap(model: nn.Module, name: str, module: nn.Module, on_restore: list) -> None:
    """setattr the module in, the undo recorded first."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    on_restore.append(lambda p=parent, c=child, m=getattr(parent, child): setattr(p, c, m))
    setattr(parent, child, module)


def apply_moe(model: nn.Module, gated: dict[str, GatedMLP], configs: dict[str, MoEConfig], batches: list, forward,
              on_restore: list, progress: bool = False) -> list[dict]:
    """Split every targeted MLP, fit its router, then swap it for a MoEMLP; returns report rows.
    Nothing is changed before every MoEMLP is built; each swap's undo goes to `on_restore` first."""
    t0 = time.perf_counter()
    for name in configs:
        _check(model, name, gated[name], configs[name])
    mlps = {name: model.get_submodule(name) for name in configs}
    neurons = {name: split_experts(getattr(mlps[name], gated[name].gate).weight,
                                   getattr(mlps[name], gated[name].up).weight, cfg.num_experts)
               for name, cfg in configs.items()}
    fitted = [n for n, c in configs.items() if c.router == "fitted"]
    routers = fit_routers(model, {n: gated[n] for n in fitted}, neurons, batches, forward, progress) if fitted else {}
    for name, cfg in configs.items():
        if cfg.router == "centroid":
            routers[name] = (*centroid_router(getattr(mlps[name], gated[name].gate).weight, neurons[name]), None)
    new = {name: moe_from_dense(mlps[name], gated[name], neurons[name], routers[name], configs[name])
           for name in configs}
    seconds = (time.perf_counter() - t0) / max(len(configs), 1)
    rows = []
    for name, moe in new.items():
        _swap(model, name, moe, on_restore)
        rows.append(_row(name, configs[name], moe, seconds, router=configs[name].router,
                         router_r2=routers[name][2], gated=gated[name].to_dict()))
    return rows


def _row(name: str, cfg: SparsityConfig, moe: MoEMLP, seconds: float, **extra) -> dict:
    """The report row of a MoEMLP swapped in at `name`: enough to rebuild it (`restore_moe`)."""
    e, m, hidden = moe.w_gate.shape
    return {"module": name, "param": None, "technique": type(cfg).__name__, "config": cfg.to_dict(), "shape": None,
            "sparsity": 1 - moe.top_k / e, "experts": e, "top_k": moe.top_k, "capacity_factor": moe.capacity_factor,
            "active_neurons": moe.top_k / e, **extra, "hidden": hidden, "expert_size": m, "act": moe.act,
            "mode": moe.mode, "bias": [getattr(moe, b) is not None for b in ("b_gate", "b_up", "b_down")],
            "router_bias": moe.router_bias is not None, "dtype": str(moe.w_gate.dtype).removeprefix("torch."),
            "error": None, "error_kind": None, "seconds": seconds}


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
        _swap(model, name, module, [])
    return [name for name, _ in todo]


# --- sparse MoE blocks (Mixtral) lowered to the same op -------------------------------------

@dataclass(frozen=True)
class SparseMoEConfig(SparsityConfig):
    """Lower a transformers sparse-MoE block (Mixtral's: router `gate` [E, H], experts stored as
    3-D `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I]) to a MoEMLP running moe_ffn in mode
    "softmax_topk": y = Σ_{top-k} softmax(top-k logits)_e · expert_e(x) (seed 000, Mixtral). The
    function is unchanged (checked on a probe input); optionally adds Switch's capacity limit."""

    TARGET = "sparse_moe"
    capacity_factor: float | None = None

    def validate(self) -> None:
        _check_capacity(self.capacity_factor, type(self).__name__)


def _act_of(fn: nn.Module) -> str | None:
    """The ACTIVATIONS key computing the same function as `fn`, found on a probe."""
    v = torch.linspace(-6, 6, 97)
    return next((k for k, f in ACTIVATIONS.items() if torch.allclose(fn(v), f(v), atol=1e-6)), None)


def sparse_moe_block(module: nn.Module) -> dict | None:
    """{experts, top_k, act} if `module` is a sparse-MoE block of Mixtral's layout, else None."""
    gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
    if {n for n, _ in module.named_children()} != {"gate", "experts"}:
        return None  # e.g. Qwen2-MoE's shared expert: not this form
    w, gu, down = (getattr(m, a, None) for m, a in ((gate, "weight"), (experts, "gate_up_proj"),
                                                     (experts, "down_proj")))
    if not all(isinstance(t, torch.Tensor) for t in (w, gu, down)) or (w.dim(), gu.dim(), down.dim()) != (2, 3, 3):
        return None
    e, hidden = w.shape
    top_k = getattr(gate, "top_k", getattr(module, "top_k", None))
    act = _act_of(experts.act_fn) if isinstance(getattr(experts, "act_fn", None), nn.Module) else None
    if (gu.shape[0], gu.shape[2], down.shape[:2]) != (e, hidden, (e, hidden)) or gu.shape[1] != 2 * down.shape[2] \
            or not isinstance(top_k, int) or act is None:
        return None
    return {"experts": e, "top_k": top_k, "act": act}


@register_technique(SparseMoEConfig)
class SparseMoETechnique(ModuleRewrite):
    requires = ()
    what = "sparse MoE block (router `gate` + 3-D `experts` weights, as in Mixtral)"
    order = 26

    def candidates(self, captured) -> dict[str, dict]:
        return {n: spec for n, m in captured.model.named_modules() if (spec := sparse_moe_block(m)) is not None}

    def rewrite(self, ctx: RewriteContext, specs: dict[str, dict], configs: dict[str, SparseMoEConfig]) -> list[dict]:
        return lower_sparse_moe(ctx.model, specs, configs, ctx.on_restore)

    def restore(self, model: nn.Module, rows: list[dict]) -> list[str]:
        return restore_moe(model, rows, technique="SparseMoEConfig")


@torch.no_grad()
def lower_sparse_moe(model: nn.Module, specs: dict[str, dict], configs: dict[str, SparseMoEConfig],
                     on_restore: list) -> list[dict]:
    """Swap each sparse-MoE block for an equivalent MoEMLP; a block the MoEMLP does not reproduce on
    a probe input (another weight layout or router) is an error and nothing is changed."""
    t0, new = time.perf_counter(), {}
    for name, spec in specs.items():
        block = model.get_submodule(name)
        gu, down = block.experts.gate_up_proj, block.experts.down_proj
        e, hidden, inter = down.shape
        moe = MoEMLP(hidden, inter, e, spec["top_k"], None, spec["act"], "softmax_topk", (False, False, False),
                     False, gu.dtype, gu.device)
        moe.w_gate.copy_(gu[:, :inter])   # [gate; up] concatenated along the neurons
        moe.w_up.copy_(gu[:, inter:])
        moe.w_down.copy_(down)
        moe.router_weight.copy_(block.gate.weight.float())
        probe = torch.randn(2, 8, hidden, generator=torch.Generator().manual_seed(0)).to(gu.device, gu.dtype)
        want, got = block(probe), moe(probe)
        tol = (1e-4 if gu.dtype in (torch.float32, torch.float64) else 2e-2) * max(1.0, float(want.abs().max()))
        if not float((want - got).abs().max()) <= tol:
            raise RecipeError(f"{name}: {type(block).__name__} is not computed as Mixtral's sparse MoE block "
                              "(weight layout or router differ); SparseMoEConfig cannot lower it")
        moe.capacity_factor = configs[name].capacity_factor
        new[name] = moe
    seconds = (time.perf_counter() - t0) / max(len(specs), 1)
    rows = []
    for name, moe in new.items():
        _swap(model, name, moe, on_restore)
        rows.append(_row(name, configs[name], moe, seconds, router="model's", router_r2=None))
    return rows


# --- load balance ----------------------------------------------------------------------------

@torch.no_grad()
def moe_load_balance(model: nn.Module, batches) -> dict[str, dict]:
    """Switch's balance statistics of every MoEMLP over the (non-padding) tokens of `batches`:

    f_e    share of the token-expert assignments routed to expert e (top-1: tokens whose argmax is e)
    P_e    mean router probability of e, softmax over all E logits
    aux    E · Σ_e f_e P_e, Switch's auxiliary load-balancing loss with α = 1 (1.0 = balanced)
    dropped  share of the assignments beyond an expert's capacity (0 without capacity_factor)
    """
    acc: dict[str, list] = {}

    def hook(name, ctx):
        def fn(mod, args, out):
            x = args[0]
            r = mod.route(x)
            mask = ctx.get("mask")
            sel = mask.reshape(-1) if mask is not None and mask.shape == x.shape[:-1] else slice(None)
            index, keep, probs = r.index[sel], r.keep[sel], r.logits[sel].softmax(-1)
            a = acc.setdefault(name, [torch.zeros(mod.num_experts, dtype=torch.float64),
                                      torch.zeros(mod.num_experts, dtype=torch.float64), 0, 0])
            a[0] += torch.bincount(index.reshape(-1).cpu(), minlength=mod.num_experts).double()
            a[1] += probs.double().sum(0).cpu()
            a[2] += index.shape[0]
            a[3] += int((~keep).sum())
        return fn

    observe(model, MoEMLP, hook, batches, "MoEConfig")
    out = {}
    for name, (counts, psum, tokens, dropped) in acc.items():
        f, p = counts / max(counts.sum(), 1), psum / max(tokens, 1)
        out[name] = {"f": f.tolist(), "P": p.tolist(), "aux_loss": float(len(f) * (f * p).sum()),
                     "dropped": dropped / max(counts.sum().item(), 1), "tokens": tokens}
    return out
