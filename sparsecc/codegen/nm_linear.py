"""N:M sparse linear: y = x Wᵀ (+ b) with W stored compressed (`sparsecc.codegen.nm_format`).

W [out, in] keeps N of every M consecutive inputs; it is stored as `values` [out, in·N/M] and
`index` (each kept value's position 0..M-1 in its group, packed `bits` to a byte: 2 bits for
2:4). The Triton kernel reads only the compressed weight, rebuilds each [BLOCK_N, BLOCK_K] tile
in registers (value j of group g lands at column g·M + index) and feeds `tl.dot` with fp32
accumulation, so the bytes moved for W drop to N/M of dense plus the metadata (2:4 fp16:
0.5 + 1/32 of dense) -- the whole gain at decode, where the product is memory-bound.

`nm_linear_reference` is the same product in plain PyTorch (decompress, then F.linear); tests
compare the two. On CPU the kernel runs only under TRITON_INTERPRET=1 (set before sparsecc is
imported: triton reads it when the kernel is defined).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .nm_format import decompress, index_bits
from .tuning import bucket, candidates, choose, interpreted

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency, but keep the reference usable
    triton = None


def nm_linear_reference(x: torch.Tensor, values: torch.Tensor, index: torch.Tensor, n: int, m: int,
                        in_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ decompress(values, index)ᵀ + bias, in x's dtype."""
    w = decompress(values.to(x.device), index.to(x.device), n, m, in_features).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


if triton is not None:

    @triton.jit
    def _nm_linear_kernel(x_ptr, v_ptr, i_ptr, b_ptr, y_ptr, T, O, K, stride_xt, stride_vo, stride_io, stride_yt,
                          N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
        PER: tl.constexpr = 8 // BITS           # packed positions per byte
        G: tl.constexpr = BLOCK_K // M          # groups per K tile
        pid_t = tl.program_id(0)
        pid_o = tl.program_id(1)
        rt = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        ro = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        rk = tl.arange(0, BLOCK_K)
        rg = tl.arange(0, G)
        slot = tl.arange(0, M)
        acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            x = tl.load(x_ptr + rt[:, None] * stride_xt + kk[None, :],
                        mask=(rt[:, None] < T) & (kk[None, :] < K), other=0.0)
            g = k0 // M + rg                   # global group numbers of this tile
            gmask = (ro[:, None] < O) & (g[None, :] < K // M)
            w = tl.zeros((BLOCK_O, G, M), dtype=tl.float32)
            for j in tl.static_range(N):       # the j-th kept value of every group
                e = g * N + j                  # its position in the compressed row
                val = tl.load(v_ptr + ro[:, None] * stride_vo + e[None, :], mask=gmask, other=0.0)
                byte = tl.load(i_ptr + ro[:, None] * stride_io + (e // PER)[None, :], mask=gmask, other=0)
                pos = (byte.to(tl.int32) >> ((e % PER) * BITS)[None, :]) & ((1 << BITS) - 1)
                hit = pos[:, :, None] == slot[None, None, :]
                w += tl.where(hit, val.to(tl.float32)[:, :, None], 0.0)
            w = tl.reshape(w, (BLOCK_O, BLOCK_K))
            if DOT_FP32:  # fp32 inputs, or the interpreter (its tl.dot mishandles bf16)
                acc += tl.dot(x.to(tl.float32), tl.trans(w))
            else:         # fp16/bf16 tensor cores, fp32 accumulation
                acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        if HAS_BIAS:
            acc += tl.load(b_ptr + ro, mask=ro < O, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rt[:, None] * stride_yt + ro[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rt[:, None] < T) & (ro[None, :] < O))


def _configs(tokens: int, m: int) -> list[dict]:
    """Launch configs to tune over, the default first: small token tiles at decode, larger for
    prefill; BLOCK_K a multiple of M."""
    k = max(64, m)
    if tokens <= 16:
        default = dict(BLOCK_T=16, BLOCK_O=64, BLOCK_K=k, num_warps=4, num_stages=3)
        found = candidates(default, BLOCK_O=[32, 64, 128], BLOCK_K=[k, 2 * k, 4 * k], num_warps=[4, 8])
    else:
        default = dict(BLOCK_T=64, BLOCK_O=64, BLOCK_K=k, num_warps=4, num_stages=3)
        found = candidates(default, BLOCK_T=[64, 128], BLOCK_O=[64, 128], BLOCK_K=[k, 2 * k], num_warps=[4, 8],
                           num_stages=[3, 4])
    return found


def nm_linear_triton(x: torch.Tensor, values: torch.Tensor, index: torch.Tensor, n: int, m: int, in_features: int,
                     bias: torch.Tensor | None = None, blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x [..., in] times the compressed N:M weight, by the Triton kernel (same result as the reference)."""
    if triton is None:
        raise RuntimeError("nm_linear_triton needs triton (pip install triton); use nm_linear_reference")
    if x.device.type == "cpu" and not interpreted():
        raise RuntimeError("the Triton N:M kernel runs on CPU tensors only in triton's interpreter: set "
                           "TRITON_INTERPRET=1 before importing sparsecc, or use nm_linear_reference")
    if x.shape[-1] != in_features or in_features % m or values.shape[-1] * m != in_features * n:
        raise ValueError(f"nm_linear: input width {x.shape[-1]}, in_features {in_features} and compressed width "
                         f"{values.shape[-1]} do not fit {n}:{m}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features).contiguous()
    values, index = values.to(x.device).contiguous(), index.to(x.device).contiguous()
    out_features = values.shape[0]
    y = torch.empty(x2.shape[0], out_features, dtype=x.dtype, device=x.device)
    b = bias.to(x.device).contiguous() if bias is not None else y  # unused pointer when no bias

    def launch(cfg: dict) -> None:
        grid = (triton.cdiv(x2.shape[0], cfg["BLOCK_T"]), triton.cdiv(out_features, cfg["BLOCK_O"]))
        _nm_linear_kernel[grid](x2, values, index, b, y, x2.shape[0], out_features, in_features,
                                x2.stride(0), values.stride(0), index.stride(0), y.stride(0),
                                N=n, M=m, BITS=index_bits(m), HAS_BIAS=bias is not None,
                                DOT_FP32=x.dtype == torch.float32 or interpreted(), **cfg)

    if blocks is not None:
        if blocks[2] % m:
            raise ValueError(f"BLOCK_K={blocks[2]} must be a multiple of M={m}")
        cfg = dict(zip(("BLOCK_T", "BLOCK_O", "BLOCK_K"), blocks))
    else:
        key = (x.dtype, bucket(x2.shape[0]), out_features, in_features, n, m, bias is not None)
        cfg = choose("nm_linear", key, _configs(x2.shape[0], m), launch, x.device)
    launch(cfg)
    return y.reshape(*lead, out_features)
