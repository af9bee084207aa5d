"""Weight-only quantized linear: y = x Wᵀ (+ b) with W stored as b-bit codes (`sparsecc.prune.int_format`).

W [out, in] is stored as codes c (uint8, two per byte for b <= 4), per-group float32 scales s and
uint8 zero points z (groups of g consecutive inputs), and

    W[r, k] = s[r, k // g] · (c[r, k] - z[r, k // g]),
    y[t, r] = Σ_k x[t, k] W[r, k] = Σ_groups s[r, j] · Σ_{k in group j} x[t, k] (c[r, k] - z[r, j]).

Bytes: at decode (a few tokens) the product is bound by reading W, and the codes are b/16 of the
fp16 weight (b/32 of fp32) plus 5 bytes of scale and zero per group of g (g = 128: +0.04 bytes per
weight): int4 g128 reads 0.27 of fp16's bytes, int8 per row 0.5.

Three ways run it:
  quant_linear_reference  dequantize W (float32), then F.linear in x's dtype; any shape, any device.
  quant_linear_triton     a Triton kernel that reads the packed codes (a byte holds the codes of
                          columns 2c and 2c+1 in its low and high nibble; b = 8: one per byte),
                          unpacks and dequantizes each [BLOCK_O, BLOCK_K] tile in registers with its
                          group's scale and zero and feeds tl.dot with fp32 accumulation. Where a
                          K tile lies in one group (g a multiple of BLOCK_K) it feeds the integers
                          c - z (exact in fp16/bf16: |c - z| <= 255) and scales the partial product
                          per output column afterwards (the sum above, group by group). One token
                          runs a dot-free variant (BLOCK_T = 1: Σ_k x_k w_rk as a row reduction), and
                          few tokens may split K over programs (SPLIT_K: fp32 partial sums, then
                          summed), so that a decode product has enough programs to fill the GPU.
  quant_linear_cpu        torch's own weight-only CPU kernels on a layout built once per weight
                          (`cpu_layout`), with x cast to bf16 (they are slower than dense fp32 with
                          fp32 activations): b <= 4 through `_weight_int4pack_mm_for_cpu`
                          (w = (q' - 8) · scale + zero_f per group; with q' = c + 8 - 2^(b-1),
                          zero_f = scale · (2^(b-1) - z)),
                          8-bit one group per row through `_weight_int8pack_mm` (y = x (c - 128)ᵀ
                          · s, plus Σ_k x_k · s (128 - z) when z ≠ 128). Elsewhere: the reference.

On CPU the Triton kernel runs only under TRITON_INTERPRET=1 (set before sparsecc is imported).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..prune.int_format import BITS, dequantize, packed_width, unpack_codes
from .tuning import bucket, choose, interpreted

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency, but keep the reference usable
    triton = None


def check_args(x_width: int, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
               group_size: int, in_features: int) -> None:
    """ValueError unless the stored weight (int_format) fits `bits`, `group_size` and the input width."""
    if bits not in BITS:
        raise ValueError(f"quant_linear: bits must be one of {', '.join(map(str, BITS))}, got {bits}")
    if group_size < 1 or in_features % group_size:
        raise ValueError(f"quant_linear: group_size {group_size} does not divide in_features {in_features}")
    rows, groups = codes.shape[0], in_features // group_size
    if x_width != in_features or codes.dim() != 2 or codes.dtype != torch.uint8 \
            or codes.shape[1] != packed_width(bits, in_features):
        raise ValueError(f"quant_linear: input width {x_width}, in_features {in_features} and {bits}-bit codes "
                         f"{codes.dtype} {list(codes.shape)} do not fit (codes: uint8 "
                         f"[out, {packed_width(bits, in_features)}])")
    if tuple(scales.shape) != (rows, groups) or tuple(zeros.shape) != (rows, groups) or zeros.dtype != torch.uint8:
        raise ValueError(f"quant_linear: scales {list(scales.shape)} and zeros {zeros.dtype} {list(zeros.shape)} "
                         f"must be [{rows}, {groups}] (one per group of {group_size} inputs; zeros uint8)")


def quant_linear_reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                           bits: int, group_size: int, in_features: int,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ Wᵀ + bias with W dequantized (float32, then x's dtype)."""
    check_args(x.shape[-1], codes, scales, zeros, bits, group_size, in_features)
    dev = x.device
    w = dequantize(unpack_codes(codes.to(dev), bits, in_features), scales.to(dev), zeros.to(dev)).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


# ---------------------------------------------------------------------------------------------
# CPU: torch's weight-only kernels

INT4_GROUPS = (256, 128, 64, 32)  # the group sizes _weight_int4pack_mm_for_cpu takes
CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _has(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


def cpu_form(bits: int, group_size: int, in_features: int, out_features: int) -> tuple[str | None, str]:
    """("int4pack" | "int8pack", "") where torch's CPU kernels can run this weight, else (None, why not).

    int4pack: b <= 4 (2- and 3-bit codes are 4-bit codes too), out % 16 == 0 (its packing), and g a
    multiple of 32, 64, 128 or 256 (a larger group repeats its scale and zero: exact). int8pack:
    b = 8, one group per row, in % 16 == 0 (other widths give wrong results in torch 2.13)."""
    if bits <= 4:
        if not (_has("_convert_weight_to_int4pack_for_cpu") and _has("_weight_int4pack_mm_for_cpu")):
            return None, "this torch has no _weight_int4pack_mm_for_cpu"
        if out_features % 16:
            return None, f"torch's int4 CPU kernel needs out_features divisible by 16, not {out_features}"
        if not any(group_size % q == 0 for q in INT4_GROUPS):
            return None, f"torch's int4 CPU kernel needs a group size that is a multiple of 32, not {group_size}"
        return "int4pack", ""
    if not _has("_weight_int8pack_mm"):
        return None, "this torch has no _weight_int8pack_mm"
    if group_size != in_features:
        return None, f"torch's int8 CPU kernel takes one scale per row, not groups of {group_size}"
    if in_features % 16:
        return None, f"torch's int8 CPU kernel needs in_features divisible by 16, not {in_features}"
    return "int8pack", ""


def cpu_layout(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
               in_features: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(cpu_weight, cpu_scales) for `quant_linear_cpu`, built once per weight on CPU; None where
    torch's kernels cannot run it (`cpu_form`).

    int4pack: cpu_weight = torch's packed int4 [out, in/2] (uint8) of the codes plus 8 - 2^(b-1)
    (centred on torch's 8, so that the bf16 zero term stays small); cpu_scales bf16 [in/q, out, 2] of
    (scale, scale · (2^(b-1) - z)) per group of q inputs (q the largest of 256..32 dividing g).
    int8pack: cpu_weight = c - 128 as int8 [out, in]; cpu_scales float32 [1, out] of the scales,
    with a second row s · (128 - z) when some zero point is not 128 (asymmetric)."""
    out_features = codes.shape[0]
    form, _ = cpu_form(bits, group_size, in_features, out_features)
    if form is None or codes.device.type != "cpu":
        return None
    q = unpack_codes(codes, bits, in_features)
    s, z = scales.float(), zeros.float()
    if form == "int8pack":
        weight = (q.to(torch.int16) - 128).to(torch.int8).contiguous()
        rows = [s[:, 0]] + ([s[:, 0] * (128 - z[:, 0])] if bool((zeros != 128).any()) else [])
        return weight, torch.stack(rows).contiguous()
    qg = next(g for g in INT4_GROUPS if group_size % g == 0)
    shift = 8 - 2 ** (bits - 1)  # 2/3-bit codes centred on 8: (q + shift - 8) s + s (2^(b-1) - z) = (q - z) s
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q.to(torch.int32) + shift).contiguous(), 1)
    s, zf = s.repeat_interleave(group_size // qg, 1), (s * (8 - shift - z)).repeat_interleave(group_size // qg, 1)
    return weight, torch.stack([s.t(), zf.t()], dim=-1).to(torch.bfloat16).contiguous()


def quant_linear_cpu(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                     group_size: int, in_features: int, bias: torch.Tensor | None = None,
                     cpu_weight: torch.Tensor | None = None, cpu_scales: torch.Tensor | None = None) -> torch.Tensor:
    """The product by torch's weight-only CPU kernels on the layout `cpu_layout` built (x in bf16,
    the result back in x's dtype: bf16 rounding of x); the reference without a layout, for other
    dtypes, devices or an empty input."""
    if cpu_weight is None or cpu_scales is None or x.device.type != "cpu" or cpu_weight.device != x.device \
            or x.dtype not in CPU_DTYPES or x.numel() == 0 or x.shape[-1] != in_features:
        return quant_linear_reference(x, codes, scales, zeros, bits, group_size, in_features, bias)
    lead, out_features = x.shape[:-1], codes.shape[0]
    xb = x.reshape(-1, in_features).to(torch.bfloat16).contiguous()
    if bits <= 4:
        qg = in_features // cpu_scales.shape[0]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, cpu_weight, qg, cpu_scales)
    else:
        y = torch.ops.aten._weight_int8pack_mm(xb, cpu_weight, cpu_scales[0].to(torch.bfloat16))
        if cpu_scales.shape[0] > 1:  # asymmetric: + Σ_k x_k · s (128 - z)
            y = y.float() + xb.float().sum(-1, keepdim=True) * cpu_scales[1]
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*lead, out_features)


# ---------------------------------------------------------------------------------------------
# The Triton kernel

if triton is not None:

    @triton.jit
    def _tile_product(x, w, BLOCK_T: tl.constexpr, DOT_FP32: tl.constexpr):
        """x [BLOCK_T, BLOCK_K] · w [BLOCK_O, BLOCK_K]ᵀ in fp32."""
        if BLOCK_T == 1:  # one token: y_r = Σ_k x_k w_rk, a row reduction (tl.dot needs 16 rows)
            part = tl.sum(w * x.to(tl.float32), axis=1)[None, :]
        elif DOT_FP32:    # fp32 inputs, or the interpreter (its tl.dot mishandles bf16)
            part = tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:             # fp16/bf16 tensor cores, fp32 accumulation
            part = tl.dot(x, tl.trans(w.to(x.dtype)))
        return part

    @triton.jit
    def _quant_linear_kernel(x_ptr, c_ptr, s_ptr, z_ptr, b_ptr, y_ptr, T, O, K, G, stride_xt, stride_co, stride_so,
                             stride_yk, stride_yt, PACKED: tl.constexpr, ALIGNED: tl.constexpr,
                             HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, SPLIT_K: tl.constexpr,
                             BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_t = tl.program_id(0)
        pid_o = tl.program_id(1)
        pid_k = tl.program_id(2)               # this program sums K tiles pid_k, pid_k + SPLIT_K, ...
        rt = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        ro = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        rk = tl.arange(0, BLOCK_K)
        omask = ro < O
        acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
        for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
            kk = k0 + rk
            x = tl.load(x_ptr + rt[:, None] * stride_xt + kk[None, :],
                        mask=(rt[:, None] < T) & (kk[None, :] < K), other=0.0)
            if PACKED:  # byte k0/2 + j holds columns k0 + 2j (low nibble) and k0 + 2j + 1 (high)
                rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                byte = tl.load(c_ptr + ro[:, None] * stride_co + rb[None, :],
                               mask=omask[:, None] & (rb[None, :] < (K + 1) // 2), other=0)
                q = tl.reshape(tl.join(byte & 0xF, byte >> 4), (BLOCK_O, BLOCK_K))  # interleave: k0, k0+1, ...
            else:
                q = tl.load(c_ptr + ro[:, None] * stride_co + kk[None, :],
                            mask=omask[:, None] & (kk[None, :] < K), other=0)
            q = q.to(tl.float32)
            if ALIGNED:  # the tile lies in group k0 / G: sum x (c - z) first, scale per column after
                s = tl.load(s_ptr + ro * stride_so + k0 // G, mask=omask, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + ro * stride_so + k0 // G, mask=omask, other=0).to(tl.float32)
                acc += _tile_product(x, q - z[:, None], BLOCK_T, DOT_FP32) * s[None, :]
            else:        # groups change inside the tile: dequantize each element
                gmask = omask[:, None] & (kk[None, :] < K)
                grp = ro[:, None] * stride_so + (kk // G)[None, :]
                s = tl.load(s_ptr + grp, mask=gmask, other=0.0).to(tl.float32)
                w = (q - tl.load(z_ptr + grp, mask=gmask, other=0).to(tl.float32)) * s
                acc += _tile_product(x, w, BLOCK_T, DOT_FP32)
        if HAS_BIAS:
            acc += tl.load(b_ptr + ro, mask=omask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + pid_k * stride_yk + rt[:, None] * stride_yt + ro[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rt[:, None] < T) & omask[None, :])


def _configs(tokens: int) -> list[dict]:
    """Launch configs to tune over, the default first (kept few: every one compiles on first use).
    One token: the dot-free variant, K split for programs enough; a few: 16-row dot tiles; prefill:
    larger tiles."""
    def cfg(t, o, k, split=1, warps=4, stages=3):
        return dict(BLOCK_T=t, BLOCK_O=o, BLOCK_K=k, SPLIT_K=split, num_warps=warps, num_stages=stages)
    if interpreted():  # small tiles: the interpreter's cost grows with the tile
        return [cfg(1 if tokens == 1 else 16, 32, 32)]
    if tokens == 1:
        return [cfg(1, 64, 128), cfg(1, 32, 128), cfg(1, 64, 256), cfg(1, 64, 128, 4), cfg(1, 32, 256, 4)]
    if tokens <= 16:
        return [cfg(16, 64, 128), cfg(16, 32, 128), cfg(16, 64, 64), cfg(16, 32, 128, 4)]
    return [cfg(64, 64, 64), cfg(64, 128, 64), cfg(32, 64, 128), cfg(128, 128, 64, warps=8)]


def quant_linear_triton(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                        group_size: int, in_features: int, bias: torch.Tensor | None = None,
                        blocks: tuple[int, ...] | None = None) -> torch.Tensor:
    """x [..., in] times the stored weight, by the Triton kernel (same result as the reference).
    blocks: (BLOCK_T, BLOCK_O, BLOCK_K[, SPLIT_K]) instead of the tuned config (tests)."""
    check_args(x.shape[-1], codes, scales, zeros, bits, group_size, in_features)
    if triton is None:
        raise RuntimeError("quant_linear_triton needs triton (pip install triton); use quant_linear_reference")
    if x.device.type == "cpu" and not interpreted():
        raise RuntimeError("the Triton quantized-linear kernel runs on CPU tensors only in triton's interpreter: "
                           "set TRITON_INTERPRET=1 before importing sparsecc, or use quant_linear_reference")
    lead, out_features = x.shape[:-1], codes.shape[0]
    x2 = x.reshape(-1, in_features).contiguous()
    tokens = x2.shape[0]
    y = torch.empty(tokens, out_features, dtype=x.dtype, device=x.device)
    if y.numel() == 0 or in_features == 0:
        return y.zero_().add_(0 if bias is None else bias.to(x.dtype)).reshape(*lead, out_features)
    dev = x.device
    codes, scales, zeros = codes.to(dev).contiguous(), scales.to(dev).contiguous(), zeros.to(dev).contiguous()
    b = bias.to(dev).contiguous() if bias is not None else y  # an unused pointer when there is no bias

    def launch(cfg: dict) -> None:
        cfg = dict(cfg)
        split = cfg["SPLIT_K"]
        out = y if split == 1 else torch.empty(split, tokens, out_features, dtype=torch.float32, device=dev)
        grid = (triton.cdiv(tokens, cfg["BLOCK_T"]), triton.cdiv(out_features, cfg["BLOCK_O"]), split)
        _quant_linear_kernel[grid](x2, codes, scales, zeros, b, out, tokens, out_features, in_features, group_size,
                                   x2.stride(0), codes.stride(0), scales.stride(0),
                                   out.stride(0) if split > 1 else 0, out.stride(-2), PACKED=bits <= 4,
                                   ALIGNED=group_size % cfg["BLOCK_K"] == 0, HAS_BIAS=bias is not None and split == 1,
                                   DOT_FP32=x.dtype == torch.float32 or interpreted(), **cfg)
        if split > 1:  # the partial sums of the K splits, then the bias
            y.copy_(out.sum(0) if bias is None else out.sum(0) + b.float())

    if blocks is not None:
        t, o, k, *split = blocks
        if t not in (1,) and (t < 16 or t & (t - 1)) or o < 16 or o & (o - 1) or k < 16 or k & (k - 1):
            raise ValueError(f"blocks {blocks}: BLOCK_T must be 1 or a power of two >= 16, BLOCK_O and BLOCK_K "
                             "powers of two >= 16")
        cfg = dict(BLOCK_T=t, BLOCK_O=o, BLOCK_K=k, SPLIT_K=split[0] if split else 1)
    else:
        key = (x.dtype, bucket(tokens), out_features, in_features, bits, group_size, bias is not None)
        cfg = choose("quant_linear", key, _configs(tokens), launch, dev)
    launch(cfg)
    return y.reshape(*lead, out_features)
