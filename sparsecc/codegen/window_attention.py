"""Window attention with sinks (seed 001: Longformer sliding / dilated / global attention;
StreamingLLM attention sinks with positions within the cache). Pure-PyTorch reference.

Every query and key carries its absolute token index (q_pos, k_pos). Query a may attend key b iff

    b <= a  and  ( b < sinks  or  (a - b) % dilation == 0 and (a - b) < window * dilation )

so the first `sinks` tokens (Longformer's global tokens of a causal model, StreamingLLM's sinks)
are always visible, plus the last `window` tokens (every `dilation`-th one). window=None is plain
causal attention. An optional boolean `key_mask` further removes pairs: [B, L] per key (padding),
or [B, T, L] per query and key (a model's own attention mask).

Positions within the cache (StreamingLLM §3.2): with the cache holding the sinks and the last
`window` tokens, a query at index a sits at cache position min(a, sinks + window - 1), the window
keys at their place before it (the same distances as in the text), and sink j at position j.
Keys arrive rotated (RoPE) at their absolute index, so only the sink scores differ: sink j must
look δ(a) = max(0, a - (sinks + window - 1)) positions closer than its index says. RoPE scores
depend on q and k only through the rotation R(pos_q - pos_k), so instead of re-rotating cached
keys the query is rotated back by δ(a) for the sink columns: q_aᵀ R(δ) k_j = (R(-δ) q_a)ᵀ k_j.
No cached key is ever rewritten, and no rotation error accumulates over a long stream.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .tuning import bucket, candidates, choose


def allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, dilation: int, sinks: int) -> torch.Tensor:
    """[..., T, L] boolean mask of the (query, key) pairs the pattern keeps."""
    d = q_pos[..., :, None] - k_pos[..., None, :]
    keep = d >= 0
    if window is not None:
        near = (d % dilation == 0) & (d < window * dilation)
        keep = keep & (near | (k_pos[..., None, :] < sinks))
    return keep


def rotate_back(q: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """R(-δ) q for RoPE in the rotate-half layout on the first 2 * len(inv_freq) dims of q.

    q: [..., T, D]; delta: [T] (positions to move each query back)."""
    rd = 2 * inv_freq.numel()
    acc = torch.promote_types(q.dtype, torch.float32)
    ang = delta.to(acc)[:, None] * inv_freq.to(acc)[None, :]                         # [T, rd/2]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x = q[..., :rd].to(acc)
    half = rd // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)                           # rotate_half(x)
    out = x * cos - rot * sin                                                        # R(-δ) = cos - sin·J
    return torch.cat([out.to(q.dtype), q[..., rd:]], -1)


def window_attention_reference(q, k, v, q_pos, k_pos, key_mask, window: int | None, dilation: int, sinks: int,
                               scale: float, inv_freq=None) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v over the allowed pairs.

    q [B, Hq, T, D]; k [B, Hk, L, D]; v [B, Hk, L, Dv] (Hq a multiple of Hk: grouped-query);
    q_pos [T], k_pos [L] absolute token indices; key_mask [B, L] or [B, T, L] bool or None (False:
    the pair is masked, e.g. padding);
    inv_freq: the RoPE frequencies when sink scores use positions within the cache, else None.
    Returns [B, Hq, T, Dv]."""
    bsz, hq, t, _ = q.shape
    hk = k.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 softmax for half inputs
    qg = q.reshape(bsz, hk, hq // hk, t, -1).to(acc)   # query heads grouped by the KV head they share
    kf = k.to(acc)
    scores = torch.einsum("bkgtd,bkld->bkgtl", qg, kf) * scale
    if inv_freq is not None and sinks > 0 and window is not None:
        delta = (q_pos - (sinks + window - 1)).clamp(min=0)
        is_sink = k_pos < sinks
        q_sink = rotate_back(qg, delta, inv_freq)
        sink_scores = torch.einsum("bkgtd,bkld->bkgtl", q_sink, kf[:, :, is_sink]) * scale
        scores[..., is_sink] = sink_scores
    keep = allowed(q_pos, k_pos, window, dilation, sinks)[None, None, None]
    if key_mask is not None:
        keep = keep & (key_mask[:, None, None, None] if key_mask.dim() == 2 else key_mask[:, None, None])
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)  # a query with no visible key (padding) gets 0
    out = torch.einsum("bkgtl,bkld->bkgtd", probs, v.to(acc))
    return out.reshape(bsz, hq, t, -1).to(q.dtype)


def window_attention_blocked(q, k, v, q_pos, k_pos, key_mask, window: int | None, dilation: int, sinks: int,
                             scale: float, inv_freq=None, block: int = 256) -> torch.Tensor:
    """The op's CPU path: the same result as window_attention_reference, a block of queries at a
    time against only the keys that block can see (the sinks and the window span before it), each
    block through torch's fused SDPA with the pattern as its mask. O(T · (window + sinks)) time
    and memory instead of O(T · L); any key layout is accepted."""
    shift = inv_freq is not None and sinks > 0 and window is not None
    span = (window - 1) * dilation if window is not None else None
    outs = []
    for a in range(0, q.shape[2], block):
        qp = q_pos[a:a + block]
        seen = k_pos <= qp.max()
        if span is not None:
            seen &= (k_pos < sinks) | (k_pos >= qp.min() - span)
        idx = slice(None) if bool(seen.all()) else seen.nonzero().squeeze(1)  # decode: no copy of the cache
        qb, kb, vb, kp = q[:, :, a:a + block], k[:, :, idx], v[:, :, idx], k_pos[idx]
        if shift:  # sink columns score against R(-δ) q: widen the head, [q, R(-δ)q] · [k, 0] or [0, k_sink]
            qs = rotate_back(qb, (qp - (sinks + window - 1)).clamp(min=0), inv_freq)
            sink = (kp < sinks)[:, None]
            qb, kb = torch.cat([qb, qs], -1), torch.cat([kb.masked_fill(sink, 0), kb.masked_fill(~sink, 0)], -1)
        keep = allowed(qp, kp, window, dilation, sinks)
        if key_mask is not None:
            rows = key_mask[:, None, None] if key_mask.dim() == 2 else key_mask[:, None, a:a + block]  # [B, 1, t|1, L]
            keep = keep & rows[..., idx]
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=None if bool(keep.all()) else keep, scale=scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
        outs.append(out.nan_to_num(0.0))  # a query with no visible key (padding) gets 0, as in the reference
    return torch.cat(outs, 2)


# --- Triton kernel: flash attention over the window and the sinks only --------------------------
# One program per (block of BLOCK_M queries, batch x query head). Keys are laid out as the rolling
# cache returns them: the first min(sinks, L) keys are the sinks (positions 0..), the rest a run of
# consecutive positions ending at the newest token; queries are consecutive positions. So the
# keys a query block can see are two index ranges, found from three loaded positions: the sinks,
# and the window [q_first - span + 1, q_last]. Every other key block is never read, which makes
# prefill O(T · window) instead of O(T²). Online softmax as in FlashAttention (running max m,
# normaliser l, accumulator acc, all fp32). Sink scores with positions within the cache use the
# query rotated back by δ = max(0, q - (sinks + window - 1)) (module docstring).
try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:

    @triton.jit
    def _attend(q, m_i, l_i, acc, k_ptr, v_ptr, kpos_ptr, kmask_ptr, qp, row, lo, hi, n_sink, L, D, DV, skn, svn,
                skmt, WINDOW, DILATION, scale, IS_SINK: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KMASK: tl.constexpr,
                DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
        """Fold keys lo..hi-1 into the running softmax state of a query block (rows `row` of the
        key mask, skmt apart: 0 for a [B, L] mask)."""
        rd = tl.arange(0, BLOCK_D)
        rdv = tl.arange(0, BLOCK_DV)
        for j0 in range(lo, hi, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            live = j < hi
            k = tl.load(k_ptr + j[:, None] * skn + rd[None, :], mask=live[:, None] & (rd[None, :] < D), other=0.0)
            if DOT_FP32:
                s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32))) * scale
            else:
                s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
            kp = tl.load(kpos_ptr + j, mask=live, other=0)
            dist = qp[:, None] - kp[None, :]
            keep = live[None, :] & (dist >= 0)
            if not IS_SINK:
                keep = keep & (j[None, :] >= n_sink)
                if HAS_WINDOW:
                    keep = keep & (dist % DILATION == 0) & (dist < WINDOW * DILATION)
            if HAS_KMASK:
                km = tl.load(kmask_ptr + row[:, None] * skmt + j[None, :], mask=live[None, :], other=0)
                keep = keep & (km != 0)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            v = tl.load(v_ptr + j[:, None] * svn + rdv[None, :], mask=live[:, None] & (rdv[None, :] < DV), other=0.0)
            if DOT_FP32:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32))
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        return m_i, l_i, acc

    @triton.jit
    def _window_attention_kernel(q_ptr, k_ptr, v_ptr, qpos_ptr, kpos_ptr, kmask_ptr, invf_ptr, o_ptr,
                                 T, L, D, DV, HQ, GROUPS, SINKS, WINDOW, DILATION, scale,
                                 sqb, sqh, sqt, skb, skh, skn, svb, svh, svn, sob, soh, sot, skmb, skmt,
                                 HAS_WINDOW: tl.constexpr, HAS_KMASK: tl.constexpr, SHIFT: tl.constexpr,
                                 HALF: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
        bh = tl.program_id(1)
        b, h = bh // HQ, bh % HQ
        kh = h // GROUPS
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rd = tl.arange(0, BLOCK_D)
        rdv = tl.arange(0, BLOCK_DV)
        row = rm < T
        rk = tl.where(row, rm, 0)  # key mask rows: padded query rows read row 0
        q = tl.load(q_ptr + b * sqb + h * sqh + rm[:, None] * sqt + rd[None, :],
                    mask=row[:, None] & (rd[None, :] < D), other=0.0)
        qp = tl.load(qpos_ptr + rm, mask=row, other=0)
        q_first = tl.load(qpos_ptr + tl.program_id(0) * BLOCK_M)
        q_last = tl.load(qpos_ptr + tl.minimum(tl.program_id(0) * BLOCK_M + BLOCK_M, T) - 1)
        off = tl.load(kpos_ptr + L - 1) - (L - 1)          # window keys: position = index + off
        n_sink = tl.minimum(SINKS, L)
        k_base, v_base = k_ptr + b * skb + kh * skh, v_ptr + b * svb + kh * svh
        km_base = kmask_ptr + b * skmb
        m_i = tl.full((BLOCK_M,), -1e30, tl.float32)  # finite: fully masked blocks give p = 0, not NaN
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
        if n_sink > 0:
            qs = q
            if SHIFT:  # R(-δ) q on the rotary dims (rotate-half layout), per query row
                delta = tl.maximum(qp - (SINKS + WINDOW - 1), 0).to(tl.float32)
                fi = tl.where(rd < HALF, rd, rd - HALF)
                invf = tl.load(invf_ptr + fi, mask=rd < 2 * HALF, other=0.0)
                ang = delta[:, None] * invf[None, :]
                partner = tl.where(rd < HALF, rd + HALF, rd - HALF)
                qpart = tl.load(q_ptr + b * sqb + h * sqh + rm[:, None] * sqt + partner[None, :],
                                mask=row[:, None] & (rd[None, :] < 2 * HALF), other=0.0).to(tl.float32)
                rot = tl.where(rd[None, :] < HALF, -qpart, qpart)                    # rotate_half(q)
                qs = (q.to(tl.float32) * tl.cos(ang) - rot * tl.sin(ang)).to(q.dtype)
            m_i, l_i, acc = _attend(qs, m_i, l_i, acc, k_base, v_base, kpos_ptr, km_base, qp, rk, 0, n_sink, n_sink,
                                    L, D, DV, skn, svn, skmt, WINDOW, DILATION, scale, True, HAS_WINDOW, HAS_KMASK,
                                    DOT_FP32, BLOCK_N, BLOCK_D, BLOCK_DV)
        lo = n_sink
        if HAS_WINDOW:
            lo = tl.maximum(n_sink, q_first - (WINDOW - 1) * DILATION - off)
        hi = tl.minimum(L, q_last - off + 1)
        m_i, l_i, acc = _attend(q, m_i, l_i, acc, k_base, v_base, kpos_ptr, km_base, qp, rk, lo, hi, n_sink, L, D, DV,
                                skn, svn, skmt, WINDOW, DILATION, scale, False, HAS_WINDOW, HAS_KMASK, DOT_FP32,
                                BLOCK_N, BLOCK_D, BLOCK_DV)
        out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
        tl.store(o_ptr + b * sob + h * soh + rm[:, None] * sot + rdv[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=row[:, None] & (rdv[None, :] < DV))


def _configs(queries: int) -> list[dict]:
    """Launch configs to tune over, the default first."""
    if queries <= 16:
        default = dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=3)
        return candidates(default, BLOCK_N=[32, 64, 128], num_warps=[2, 4, 8])
    default = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    return candidates(default, BLOCK_M=[64, 128], BLOCK_N=[32, 64, 128], num_warps=[4, 8], num_stages=[2, 3])


def window_attention_triton(q, k, v, q_pos, k_pos, key_mask, window, dilation, sinks, scale, inv_freq=None,
                            blocks: tuple[int, int] | None = None) -> torch.Tensor:
    """The Triton window attention (same result as window_attention_reference for the cache layout
    above: consecutive queries, sinks first, then consecutive keys)."""
    from .tuning import interpreted

    if triton is None:
        raise RuntimeError("window_attention_triton needs triton; use window_attention_reference")
    if q.device.type == "cpu" and not interpreted():
        raise RuntimeError("the Triton window attention runs on CPU tensors only in triton's interpreter: set "
                           "TRITON_INTERPRET=1 before importing sparsecc, or use window_attention_reference")
    bsz, hq, t, d = q.shape
    n, dv = k.shape[2], v.shape[3]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty(bsz, hq, t, dv, dtype=q.dtype, device=q.device)
    if n == 0 or t == 0:
        return out.zero_()
    shift = inv_freq is not None and sinks > 0 and window is not None
    invf = inv_freq.to(device=q.device, dtype=torch.float32).contiguous() if shift else q_pos
    kmask = key_mask.to(torch.int8).contiguous() if key_mask is not None else q_pos
    qpos, kpos = q_pos.to(q.device, torch.int64).contiguous(), k_pos.to(q.device, torch.int64).contiguous()

    def launch(cfg: dict) -> None:
        _window_attention_kernel[(triton.cdiv(t, cfg["BLOCK_M"]), bsz * hq)](
            q, k, v, qpos, kpos, kmask, invf, out, t, n, d, dv, hq, hq // k.shape[1], sinks,
            window if window is not None else 0, dilation, float(scale),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            kmask.stride(0) if key_mask is not None else 0,
            kmask.stride(1) if key_mask is not None and key_mask.dim() == 3 else 0,
            HAS_WINDOW=window is not None, HAS_KMASK=key_mask is not None, SHIFT=shift,
            HALF=inv_freq.numel() if shift else 0, DOT_FP32=q.dtype == torch.float32 or interpreted(),
            BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_DV=max(16, triton.next_power_of_2(dv)), **cfg)

    if blocks is not None:
        cfg = dict(BLOCK_M=blocks[0], BLOCK_N=blocks[1])
    else:
        key = (q.dtype, bucket(t), bucket(n), hq, k.shape[1], d, dv, window is None, shift,
               None if key_mask is None else key_mask.dim())
        cfg = choose("window_attention", key, _configs(t), launch, q.device)
    launch(cfg)
    return out
