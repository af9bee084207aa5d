"""CATS-gated MLP (seed 000, "Dynamic Sparsification"; CATS, Lee et al. 2024):

    v = act(x W_gateᵀ);  v ← v · [|v| ≥ t];  y = (v * (x W_upᵀ)) W_downᵀ

Only the neurons with |v| ≥ t contribute, so a kernel needs just their rows of W_up and columns
of W_down (the seed's "Custom GPU Kernel 1", lines 2-5). Here: the pure-PyTorch reference, its
gradient, and the Triton kernel (below), which the tests check against the reference. The CPU
path that reads only active neurons at decode is cats_cpu.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .tuning import bucket, candidates, choose

#: the gate activations the gated-MLP kernels take (gated.py names them on the graph)
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"), "relu": F.relu}


def cats_gate(x, w_gate, b_gate, threshold: float, act: str) -> torch.Tensor:
    """v = act(x W_gateᵀ) with the entries |v| < t zeroed (the seed kernel's lines 2-3)."""
    v = ACTIVATIONS[act](F.linear(x, w_gate, b_gate))
    return v * (v.abs() >= threshold)


def cats_mlp_reference(x, w_gate, b_gate, w_up, b_up, w_down, b_down, threshold: float, act: str) -> torch.Tensor:
    v = cats_gate(x, w_gate, b_gate, threshold, act)
    return F.linear(v * F.linear(x, w_up, b_up), w_down, b_down)


def _act_backward(grad: torch.Tensor, g: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        return torch.ops.aten.silu_backward(grad, g)
    if act in ("gelu", "gelu_tanh"):
        return torch.ops.aten.gelu_backward(grad, g, approximate="tanh" if act == "gelu_tanh" else "none")
    return grad * (g > 0)  # relu


def cats_mlp_backward(grad, x, w_gate, b_gate, w_up, b_up, w_down, threshold: float, act: str):
    """Gradients of cats_mlp_reference w.r.t. (x, w_gate, b_gate, w_up, b_up, w_down, b_down); the
    threshold's step has zero derivative almost everywhere, so kept neurons pass gradient as usual."""
    g = F.linear(x, w_gate, b_gate)
    v = ACTIVATIONS[act](g)
    keep = (v.abs() >= threshold).to(v.dtype)
    u = F.linear(x, w_up, b_up)
    h = v * keep * u
    dh = grad @ w_down
    dg = _act_backward(dh * u * keep, g, act)
    du = dh * v * keep
    dx = dg @ w_gate + du @ w_up
    flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
    d_w_down = flat(grad).t() @ flat(h)
    d_w_up = flat(du).t() @ flat(x)
    d_w_gate = flat(dg).t() @ flat(x)
    return (dx, d_w_gate, flat(dg).sum(0) if b_gate is not None else None, d_w_up,
            flat(du).sum(0) if b_up is not None else None, d_w_down, flat(grad).sum(0))


# --- Triton kernel (the seed's "Custom GPU Kernel 1") ---------------------------------------
# Two launches. (1) gate + up: per tile of tokens x neurons, v = act(x W_gateᵀ) is computed in
# full (line 2), the mask |v| >= t (line 3) decides which rows of W_up are loaded at all (a
# neuron inactive for every token of the tile is never read), and h = v * (x W_upᵀ) is stored
# with zeros for inactive neurons (line 4). (2) down: y = h W_downᵀ loads only the W_down
# columns of neurons active somewhere in the token tile (line 5). At decode (one token) the
# bytes read are W_gate plus the active share of W_up and W_down. W_down is read through its
# strides: the CATS rewrite stores it column-major ([I, H] contiguous), as the seed's kernel
# does, so that an active neuron's column is one contiguous row of W_downᵀ.
ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:

    @triton.jit
    def _act(g, ACT: tl.constexpr):
        if ACT == 0:
            return g * tl.sigmoid(g)
        elif ACT == 1:
            return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
        elif ACT == 2:
            inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            return 0.5 * g * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))  # tanh(z) = 2 sigmoid(2z) - 1
        else:
            return tl.maximum(g, 0.0)

    @triton.jit
    def _x_wT_tile(x_ptr, w_ptr, rt, ri, row_ok, T, H, sxt, sw, DOT_FP32: tl.constexpr, BLOCK_T: tl.constexpr,
                   BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr):
        """fp32 tile x[rt] @ w[ri]ᵀ over the H inputs; rows of w with row_ok False are never read."""
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_T, BLOCK_I), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            kk = k0 + rk
            x = tl.load(x_ptr + rt[:, None] * sxt + kk[None, :], mask=(rt[:, None] < T) & (kk[None, :] < H), other=0.0)
            w = tl.load(w_ptr + ri[:, None] * sw + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < H), other=0.0)
            if DOT_FP32:
                acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)))
            else:
                acc += tl.dot(x, tl.trans(w))
        return acc

    @triton.jit
    def _cats_gate_up_kernel(x_ptr, wg_ptr, bg_ptr, wu_ptr, bu_ptr, h_ptr, T, H, I, threshold,
                             sxt, swg, swu, sht, ACT: tl.constexpr, HAS_BG: tl.constexpr, HAS_BU: tl.constexpr,
                             DOT_FP32: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr,
                             BLOCK_K: tl.constexpr):
        rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        ri = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        acc_g = _x_wT_tile(x_ptr, wg_ptr, rt, ri, ri < I, T, H, sxt, swg, DOT_FP32, BLOCK_T, BLOCK_I, BLOCK_K)
        if HAS_BG:
            acc_g += tl.load(bg_ptr + ri, mask=ri < I, other=0.0).to(tl.float32)[None, :]
        v = _act(acc_g, ACT)
        keep = (tl.abs(v) >= threshold) & (rt[:, None] < T)
        active = tl.max(keep.to(tl.int32), axis=0) > 0          # [BLOCK_I]: needed by some token
        acc_u = _x_wT_tile(x_ptr, wu_ptr, rt, ri, active & (ri < I), T, H, sxt, swu, DOT_FP32, BLOCK_T, BLOCK_I,
                           BLOCK_K)
        if HAS_BU:
            acc_u += tl.load(bu_ptr + ri, mask=active & (ri < I), other=0.0).to(tl.float32)[None, :]
        h = tl.where(keep, v * acc_u, 0.0)
        tl.store(h_ptr + rt[:, None] * sht + ri[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=(rt[:, None] < T) & (ri[None, :] < I))

    @triton.jit
    def _cats_down_kernel(h_ptr, wd_ptr, bd_ptr, y_ptr, T, H, I, sht, sdh, sdi, syt, HAS_BD: tl.constexpr,
                          DOT_FP32: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                          BLOCK_I: tl.constexpr):
        rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        rh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        ri = tl.arange(0, BLOCK_I)
        acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
        for i0 in range(0, I, BLOCK_I):
            ii = i0 + ri
            h = tl.load(h_ptr + rt[:, None] * sht + ii[None, :], mask=(rt[:, None] < T) & (ii[None, :] < I), other=0.0)
            active = tl.max((h != 0).to(tl.int32), axis=0) > 0  # [BLOCK_I]
            w = tl.load(wd_ptr + ii[:, None] * sdi + rh[None, :] * sdh,
                        mask=active[:, None] & (ii[:, None] < I) & (rh[None, :] < H), other=0.0)
            if DOT_FP32:
                acc += tl.dot(h.to(tl.float32), w.to(tl.float32))
            else:
                acc += tl.dot(h, w)
        if HAS_BD:
            acc += tl.load(bd_ptr + rh, mask=rh < H, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rt[:, None] * syt + rh[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rt[:, None] < T) & (rh[None, :] < H))


def _configs(tokens: int) -> list[dict]:
    """Launch configs to tune over, the default first (BLOCK_N: neurons of the gate/up stage and
    outputs of the down stage; BLOCK_K: the reduction tile of both)."""
    if tokens <= 16:
        default = dict(BLOCK_T=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)
        return candidates(default, BLOCK_N=[32, 64, 128], BLOCK_K=[64, 128], num_warps=[4, 8])
    default = dict(BLOCK_T=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)
    return candidates(default, BLOCK_T=[32, 64, 128], BLOCK_N=[64, 128], BLOCK_K=[32, 64], num_warps=[4, 8])


def cats_mlp_triton(x, w_gate, b_gate, w_up, b_up, w_down, b_down, threshold: float, act: str,
                    blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """The Triton CATS MLP (same result as cats_mlp_reference up to float rounding)."""
    from .tuning import interpreted

    if triton is None:
        raise RuntimeError("cats_mlp_triton needs triton; use cats_mlp_reference")
    if x.device.type == "cpu" and not interpreted():
        raise RuntimeError("the Triton CATS kernel runs on CPU tensors only in triton's interpreter: set "
                           "TRITON_INTERPRET=1 before importing sparsecc, or use cats_mlp_reference")
    hidden, inter = w_gate.shape[1], w_gate.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, hidden).contiguous()
    tokens = x2.shape[0]
    w_gate, w_up = w_gate.contiguous(), w_up.contiguous()
    dot_fp32 = x.dtype == torch.float32 or interpreted()  # the interpreter's tl.dot mishandles bf16
    h = torch.empty(tokens, inter, dtype=x.dtype, device=x.device)
    y = torch.empty(tokens, w_down.shape[0], dtype=x.dtype, device=x.device)
    dummy = h

    def launch(cfg: dict) -> None:
        bt, bn, bk = cfg["BLOCK_T"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        extra = {k: v for k, v in cfg.items() if k.startswith("num_")}
        _cats_gate_up_kernel[(triton.cdiv(tokens, bt), triton.cdiv(inter, bn))](
            x2, w_gate, b_gate if b_gate is not None else dummy, w_up, b_up if b_up is not None else dummy, h,
            tokens, hidden, inter, float(threshold), x2.stride(0), w_gate.stride(0), w_up.stride(0), h.stride(0),
            ACT=ACT_CODES[act], HAS_BG=b_gate is not None, HAS_BU=b_up is not None, DOT_FP32=dot_fp32,
            BLOCK_T=bt, BLOCK_I=bn, BLOCK_K=bk, **extra)
        _cats_down_kernel[(triton.cdiv(tokens, bt), triton.cdiv(w_down.shape[0], bn))](
            h, w_down, b_down if b_down is not None else dummy, y, tokens, w_down.shape[0], inter, h.stride(0),
            w_down.stride(0), w_down.stride(1), y.stride(0), HAS_BD=b_down is not None, DOT_FP32=dot_fp32,
            BLOCK_T=bt, BLOCK_H=bn, BLOCK_I=bk, **extra)

    if blocks is not None:
        cfg = dict(zip(("BLOCK_T", "BLOCK_N", "BLOCK_K"), blocks))
    else:
        key = (x.dtype, bucket(tokens), hidden, inter, act, b_gate is not None)
        cfg = choose("cats_mlp", key, _configs(tokens), launch, x.device)
    launch(cfg)
    return y.reshape(*lead, w_down.shape[0])
