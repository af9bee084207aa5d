"""Mixture-of-experts FFN: routing, the pure-PyTorch reference and its gradient.

Each of E experts is a gated MLP with its own slice of neurons (seed 000, "MoE"; seed 001,
Switch Transformer):

    logits = x Rᵀ + r                      (fp32: Switch's selective precision)
    S(x)   = the top_k experts by logit
    y      = Σ_{e ∈ S(x), kept} w_e(x) · down_e(act(gate_e(x)) * up_e(x))  + b_down

with w_e = 1 in mode "sum" (MoEfication: the experts partition one dense FFN, so k = E gives
the dense FFN back) and w_e = softmax over the top_k logits in mode "softmax_topk" (Mixtral:
Softmax(Top2(x W_g))). Capacity (Switch): with capacity_factor c > 0 each expert takes at most
ceil(c · T · k / E) of the T tokens of a call, in token order; a token beyond it gets nothing
from that expert (it passes through the residual connection). b_down is the dense FFN's bias,
shared by all experts and added to every token.

The reference sorts the kept (token, expert) assignments by expert and runs one group of
matmuls per expert. `moe_ffn_backward` is its analytic gradient.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .cats_mlp import ACTIVATIONS
from .cats_mlp import _act_backward
from .tuning import bucket, candidates, choose

MODES = ("sum", "softmax_topk")


class Routing(NamedTuple):
    logits: torch.Tensor   # [T, E] router logits (fp32; fp64 for fp64 inputs)
    index: torch.Tensor    # [T, k] experts chosen per token, best first
    weight: torch.Tensor   # [T, k] output weight of each choice, as logits (1 in mode "sum")
    keep: torch.Tensor     # [T, k] bool: False where the expert was over capacity


def capacity(tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int | None:
    """Switch's expert capacity ceil(c · T · k / E); None (no limit) when c <= 0."""
    if capacity_factor is None or capacity_factor <= 0:
        return None
    return math.ceil(capacity_factor * tokens * top_k / num_experts)


def route(x2: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor | None, top_k: int,
          capacity_factor: float, mode: str) -> Routing:
    """Routing of the tokens x2 [T, H] (see the module docstring), in fp32 (or wider) throughout."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    num_experts = router_weight.shape[0]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in 1..{num_experts} (the number of experts), got {top_k}")
    dtype = torch.promote_types(x2.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    logits = F.linear(x2.to(dtype), router_weight.to(dtype), None if router_bias is None else router_bias.to(dtype))
    top, index = logits.topk(top_k, dim=-1)
    weight = top.softmax(-1) if mode == "softmax_topk" else torch.ones_like(top)
    cap = capacity(x2.shape[0], top_k, num_experts, capacity_factor)
    if cap is None:
        keep = torch.ones_like(index, dtype=torch.bool)
    else:  # position of each assignment among those of its expert, in token order (then rank order)
        onehot = F.one_hot(index.reshape(-1), num_experts)
        position = (onehot.cumsum(0) * onehot).sum(-1) - 1
        keep = (position < cap).reshape(index.shape)
    return Routing(logits, index, weight, keep)


def _groups(routing: Routing, num_experts: int):
    """(expert, token ids, assignment ids) for each expert with kept tokens: the kept
    assignments sorted by expert (stable, so each group stays in token order)."""
    flat = routing.index.reshape(-1)
    kept = routing.keep.reshape(-1).nonzero().squeeze(1)
    kept = kept[torch.argsort(flat[kept], stable=True)]
    counts = torch.bincount(flat[kept], minlength=num_experts).tolist()
    for e, ids in enumerate(kept.split(counts)):
        if ids.numel():
            yield e, ids // routing.index.shape[1], ids


def _bias(b: torch.Tensor | None, e: int) -> torch.Tensor | None:
    return None if b is None else b[e]


def moe_ffn_reference(x, router_weight, router_bias, w_gate, b_gate, w_up, b_up, w_down, b_down, top_k: int,
                      capacity_factor: float, act: str, mode: str) -> torch.Tensor:
    """y for x [..., H]; w_gate, w_up [E, I_e, H], w_down [E, H, I_e], b_gate, b_up [E, I_e], b_down [H]."""
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    routing = route(x2, router_weight, router_bias, top_k, capacity_factor, mode)
    y = x2.new_zeros(x2.shape[0], w_down.shape[1])
    weight = routing.weight.reshape(-1)
    for e, tokens, ids in _groups(routing, w_gate.shape[0]):
        xe = x2[tokens]
        h = ACTIVATIONS[act](F.linear(xe, w_gate[e], _bias(b_gate, e))) * F.linear(xe, w_up[e], _bias(b_up, e))
        out = F.linear(h, w_down[e])
        if mode != "sum":
            out = (out.to(weight.dtype) * weight[ids, None]).to(out.dtype)
        y.index_add_(0, tokens, out)
    if b_down is not None:
        y = y + b_down
    return y.reshape(*x.shape[:-1], w_down.shape[1])


def moe_ffn_backward(grad, x, router_weight, router_bias, w_gate, b_gate, w_up, b_up, w_down, b_down, top_k: int,
                     capacity_factor: float, act: str, mode: str) -> list:
    """Gradients of moe_ffn_reference w.r.t. (x, router_weight, router_bias, w_gate, b_gate, w_up,
    b_up, w_down, b_down); None for absent biases. The choice of experts is piecewise constant,
    so the router gets a gradient only through the softmax weights (mode "softmax_topk")."""
    hidden = x.shape[-1]
    x2, g2 = x.reshape(-1, hidden), grad.reshape(-1, grad.shape[-1])
    routing = route(x2, router_weight, router_bias, top_k, capacity_factor, mode)
    weight = routing.weight.reshape(-1)
    dx = torch.zeros_like(x2)
    dwg, dwu, dwd = torch.zeros_like(w_gate), torch.zeros_like(w_up), torch.zeros_like(w_down)
    dbg = None if b_gate is None else torch.zeros_like(b_gate)
    dbu = None if b_up is None else torch.zeros_like(b_up)
    dweight = torch.zeros_like(weight)  # dL/dw_e per assignment (softmax mode)
    for e, tokens, ids in _groups(routing, w_gate.shape[0]):
        xe, dy = x2[tokens], g2[tokens]
        g, u = F.linear(xe, w_gate[e], _bias(b_gate, e)), F.linear(xe, w_up[e], _bias(b_up, e))
        a = ACTIVATIONS[act](g)
        h = a * u
        if mode != "sum":
            dweight[ids] = (dy.to(weight.dtype) * F.linear(h, w_down[e]).to(weight.dtype)).sum(-1)
            dy = (dy.to(weight.dtype) * weight[ids, None]).to(dy.dtype)
        dwd[e] = dy.t() @ h                                # out = h W_downᵀ
        dh = dy @ w_down[e]
        dg, du = _act_backward(dh * u, g, act), dh * a     # h = act(g) * u
        dwg[e], dwu[e] = dg.t() @ xe, du.t() @ xe
        if dbg is not None:
            dbg[e] = dg.sum(0)
        if dbu is not None:
            dbu[e] = du.sum(0)
        dx.index_add_(0, tokens, dg @ w_gate[e] + du @ w_up[e])
    drw, drb = torch.zeros_like(router_weight), None if router_bias is None else torch.zeros_like(router_bias)
    if mode != "sum":  # w = softmax(top logits): dL/dtop_j = w_j (dL/dw_j - Σ_i w_i dL/dw_i)
        w, dw = routing.weight, dweight.reshape(routing.weight.shape)
        dtop = w * (dw - (w * dw).sum(-1, keepdim=True))
        dlogits = torch.zeros_like(routing.logits).scatter_(1, routing.index, dtop)
        drw = (dlogits.t() @ x2.to(dlogits.dtype)).to(router_weight.dtype)
        if drb is not None:
            drb = dlogits.sum(0).to(router_bias.dtype)
        dx += (dlogits @ router_weight.to(dlogits.dtype)).to(dx.dtype)
    dbd = None if b_down is None else g2.sum(0).to(b_down.dtype)
    return [dx.reshape(x.shape), drw, drb, dwg, dbg, dwu, dbu, dwd, dbd]


# --- Triton kernel: grouped GEMM over all experts in one launch per stage -----------------------
# Routing stays in PyTorch (fp32, above). The kept assignments are sorted by expert and cut into
# tiles of BLOCK_M rows that never straddle two experts (a host-side schedule: tile -> expert,
# first row). Stage 1, one launch for all experts: for each tile, h = act(x W_gate,eᵀ) * (x W_up,eᵀ)
# with x gathered by token id. Stage 2, one launch: o = w_e · h W_down,eᵀ per assignment row, in
# fp32. The rows are then added into y by token with index_add_ (no atomics: deterministic, and
# the same for fp16, bf16 and fp32).
try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}

if triton is not None:
    from .cats_mlp import _act

    @triton.jit
    def _moe_gate_up_kernel(x_ptr, tok_ptr, tile_e_ptr, tile_row_ptr, end_ptr, wg_ptr, bg_ptr, wu_ptr, bu_ptr, h_ptr,
                            H, IE, sxt, swg_e, swg_i, swu_e, swu_i, sh, ACT: tl.constexpr, HAS_BG: tl.constexpr,
                            HAS_BU: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr):
        tile = tl.program_id(0)
        e = tl.load(tile_e_ptr + tile)
        rows = tl.load(tile_row_ptr + tile) + tl.arange(0, BLOCK_M)
        live = rows < tl.load(end_ptr + e)          # rows of this expert only
        tok = tl.load(tok_ptr + rows, mask=live, other=0)
        ri = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        rk = tl.arange(0, BLOCK_K)
        acc_g = tl.zeros((BLOCK_M, BLOCK_I), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_I), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            kk = k0 + rk
            x = tl.load(x_ptr + tok[:, None] * sxt + kk[None, :], mask=live[:, None] & (kk[None, :] < H), other=0.0)
            wmask = (ri[:, None] < IE) & (kk[None, :] < H)
            wg = tl.load(wg_ptr + e * swg_e + ri[:, None] * swg_i + kk[None, :], mask=wmask, other=0.0)
            wu = tl.load(wu_ptr + e * swu_e + ri[:, None] * swu_i + kk[None, :], mask=wmask, other=0.0)
            if DOT_FP32:
                acc_g += tl.dot(x.to(tl.float32), tl.trans(wg.to(tl.float32)))
                acc_u += tl.dot(x.to(tl.float32), tl.trans(wu.to(tl.float32)))
            else:
                acc_g += tl.dot(x, tl.trans(wg))
                acc_u += tl.dot(x, tl.trans(wu))
        if HAS_BG:
            acc_g += tl.load(bg_ptr + e * IE + ri, mask=ri < IE, other=0.0).to(tl.float32)[None, :]
        if HAS_BU:
            acc_u += tl.load(bu_ptr + e * IE + ri, mask=ri < IE, other=0.0).to(tl.float32)[None, :]
        h = _act(acc_g, ACT) * acc_u
        tl.store(h_ptr + rows[:, None] * sh + ri[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=live[:, None] & (ri[None, :] < IE))

    @triton.jit
    def _moe_down_kernel(h_ptr, w_ptr, tile_e_ptr, tile_row_ptr, end_ptr, wd_ptr, o_ptr, H, IE, sh, swd_e, swd_h,
                         so, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_K: tl.constexpr):
        tile = tl.program_id(0)
        e = tl.load(tile_e_ptr + tile)
        rows = tl.load(tile_row_ptr + tile) + tl.arange(0, BLOCK_M)
        live = rows < tl.load(end_ptr + e)
        rh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
        for k0 in range(0, IE, BLOCK_K):
            kk = k0 + rk
            h = tl.load(h_ptr + rows[:, None] * sh + kk[None, :], mask=live[:, None] & (kk[None, :] < IE), other=0.0)
            w = tl.load(wd_ptr + e * swd_e + rh[None, :] * swd_h + kk[:, None],
                        mask=(kk[:, None] < IE) & (rh[None, :] < H), other=0.0)   # W_down,eᵀ tile [K, H]
            if DOT_FP32:
                acc += tl.dot(h.to(tl.float32), w.to(tl.float32))
            else:
                acc += tl.dot(h, w)
        acc = acc * tl.load(w_ptr + rows, mask=live, other=0.0)[:, None]
        tl.store(o_ptr + rows[:, None] * so + rh[None, :], acc, mask=live[:, None] & (rh[None, :] < H))


def _configs(tokens: int) -> list[dict]:
    """Launch configs to tune over, the default first (BLOCK_M: assignment rows per tile, which
    also sets the tile schedule; BLOCK_N: neurons of stage 1 and outputs of stage 2; BLOCK_K: the
    reduction tile of both)."""
    default = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=3)
    if tokens <= 16:
        return candidates(default, BLOCK_N=[32, 64, 128], BLOCK_K=[32, 64], num_warps=[4, 8])
    return candidates(default, BLOCK_M=[16, 32, 64], BLOCK_N=[32, 64, 128], BLOCK_K=[32, 64], num_warps=[4, 8])


def moe_ffn_triton(x, router_weight, router_bias, w_gate, b_gate, w_up, b_up, w_down, b_down, top_k: int,
                   capacity_factor: float, act: str, mode: str, block_m: int | None = None) -> torch.Tensor:
    """The grouped Triton MoE FFN (same result as moe_ffn_reference up to float rounding);
    block_m: rows per tile (default: autotuned)."""
    from .tuning import interpreted

    if triton is None:
        raise RuntimeError("moe_ffn_triton needs triton; use moe_ffn_reference")
    if x.device.type == "cpu" and not interpreted():
        raise RuntimeError("the Triton MoE kernel runs on CPU tensors only in triton's interpreter: set "
                           "TRITON_INTERPRET=1 before importing sparsecc, or use moe_ffn_reference")
    hidden = x.shape[-1]
    num_experts, expert_size = w_gate.shape[0], w_gate.shape[1]
    x2 = x.reshape(-1, hidden).contiguous()
    routing = route(x2, router_weight, router_bias, top_k, capacity_factor, mode)
    flat, keep = routing.index.reshape(-1), routing.keep.reshape(-1)
    kept = keep.nonzero().squeeze(1)
    kept = kept[torch.argsort(flat[kept], stable=True)]                 # assignments sorted by expert
    counts = torch.bincount(flat[kept], minlength=num_experts)
    end = counts.cumsum(0)
    y = x2.new_zeros(x2.shape[0], w_down.shape[1])
    rows = kept.numel()
    if rows:
        tok = (kept // top_k).contiguous()
        weight = routing.weight.reshape(-1)[kept].float().contiguous()
        h = torch.empty(rows, expert_size, dtype=x.dtype, device=x.device)
        o = torch.empty(rows, w_down.shape[1], dtype=torch.float32, device=x.device)
        dot_fp32 = x.dtype == torch.float32 or interpreted()
        w_gate, w_up, w_down = w_gate.contiguous(), w_up.contiguous(), w_down.contiguous()

        def launch(cfg: dict) -> None:
            bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
            extra = {k: v for k, v in cfg.items() if k.startswith("num_")}
            tiles_per = (counts + bm - 1) // bm                          # the tile schedule
            tile_e = torch.repeat_interleave(torch.arange(num_experts, device=x.device), tiles_per)
            first_tile = tiles_per.cumsum(0) - tiles_per
            tile_row = (end - counts)[tile_e] + (torch.arange(tile_e.numel(), device=x.device) - first_tile[tile_e]) * bm
            _moe_gate_up_kernel[(tile_e.numel(), triton.cdiv(expert_size, bn))](
                x2, tok, tile_e, tile_row, end, w_gate, b_gate if b_gate is not None else h, w_up,
                b_up if b_up is not None else h, h, hidden, expert_size, x2.stride(0), w_gate.stride(0),
                w_gate.stride(1), w_up.stride(0), w_up.stride(1), h.stride(0), ACT=ACT_CODES[act],
                HAS_BG=b_gate is not None, HAS_BU=b_up is not None, DOT_FP32=dot_fp32, BLOCK_M=bm, BLOCK_I=bn,
                BLOCK_K=bk, **extra)
            _moe_down_kernel[(tile_e.numel(), triton.cdiv(w_down.shape[1], bn))](
                h, weight, tile_e, tile_row, end, w_down, o, w_down.shape[1], expert_size, h.stride(0),
                w_down.stride(0), w_down.stride(1), o.stride(0), DOT_FP32=dot_fp32, BLOCK_M=bm, BLOCK_H=bn,
                BLOCK_K=bk, **extra)

        if block_m is not None:
            cfg = dict(BLOCK_M=block_m, BLOCK_N=32, BLOCK_K=32)
        else:
            key = (x.dtype, bucket(x2.shape[0]), hidden, num_experts, expert_size, top_k, act)
            cfg = choose("moe_ffn", key, _configs(x2.shape[0]), launch, x.device)
        launch(cfg)
        y = y.index_add_(0, tok, o.to(y.dtype)) if y.dtype == torch.float32 else \
            y.float().index_add_(0, tok, o).to(y.dtype)
    if b_down is not None:
        y = y + b_down
    return y.reshape(*x.shape[:-1], w_down.shape[1])
