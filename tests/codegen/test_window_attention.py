"""sparsecc::window_attention against brute force: causal equality for large windows, exactly
the last `window` keys (dilated) plus sinks, StreamingLLM positions within the cache, masks,
grouped-query heads, opcheck and gradients."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparsecc.codegen.window_attention import (allowed, rotate_back, window_attention_blocked,
                                               window_attention_reference)

op = torch.ops.sparsecc.window_attention
F64 = dict(dtype=torch.float64)


def qkv(b, hq, hk, t, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, t, d, generator=g, **F64), torch.randn(b, hk, n, d, generator=g, **F64),
            torch.randn(b, hk, n, d, generator=g, **F64))


def rope(x, pos, inv_freq):
    """RoPE (rotate-half layout) of x [.., n, D] at positions pos [n] on the first 2*len(inv_freq) dims."""
    ang = pos.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    rd, half = 2 * inv_freq.numel(), inv_freq.numel()
    y = x[..., :rd]
    rot = torch.cat([-y[..., half:], y[..., :half]], -1)
    return torch.cat([y * cos + rot * sin, x[..., rd:]], -1)


def brute(q, k, v, q_pos, k_pos, keys_of, positions_of=None):
    """Per query a: softmax over exactly the keys keys_of(a) returns; positions_of(a, keys) gives
    (query position, key positions) to rotate pre-RoPE q/k at (q, k then hold pre-RoPE values)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = torch.zeros(*q.shape[:-1], v.shape[-1], **F64)
    for i, a in enumerate(q_pos.tolist()):
        cols = [j for j, b in enumerate(k_pos.tolist()) if b in keys_of(a)]
        qi, kc = q[:, :, i:i + 1], k[:, :, cols]
        if positions_of is not None:
            pq, pk, inv = positions_of(a, [k_pos[j] for j in cols])
            qi, kc = rope(qi, torch.tensor([pq]), inv), rope(kc, torch.tensor(pk), inv)
        w = torch.softmax(qi @ kc.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
        out[:, :, i] = (w @ v[:, :, cols])[:, :, 0]
    return out


shapes = dict(b=st.integers(1, 2), hk=st.integers(1, 2), groups=st.integers(1, 2), t=st.integers(1, 9),
              extra=st.integers(0, 9), d=st.sampled_from([2, 4, 6]), seed=st.integers(0, 2**16))


@given(**shapes, window=st.integers(1, 30))
def test_window_at_least_the_length_is_causal_attention(b, hk, groups, t, extra, d, seed, window):
    n = t + extra
    q, k, v = qkv(b, hk * groups, hk, t, n, d, seed)
    q_pos, k_pos = torch.arange(extra, n), torch.arange(n)
    out = op(q, k, v, q_pos, k_pos, None, max(window, n), 1, 0, d ** -0.5, None)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
        attn_mask=torch.ones(t, n, dtype=torch.bool).tril(extra))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(op(q, k, v, q_pos, k_pos, None, None, 1, 0, d ** -0.5, None), ref)


@given(**shapes, window=st.integers(1, 6), dilation=st.integers(1, 3), sinks=st.integers(0, 3))
def test_each_query_sees_exactly_its_window_and_the_sinks(b, hk, groups, t, extra, d, seed, window, dilation, sinks):
    n = t + extra
    q, k, v = qkv(b, hk * groups, hk, t, n, d, seed)
    q_pos, k_pos = torch.arange(extra, n), torch.arange(n)

    def keys_of(a):
        return {a - i * dilation for i in range(window) if a - i * dilation >= 0} | set(range(min(sinks, a + 1)))
    out = op(q, k, v, q_pos, k_pos, None, window, dilation, sinks, d ** -0.5, None)
    torch.testing.assert_close(out, brute(q, k, v, q_pos, k_pos, keys_of))


@given(**shapes, window=st.integers(1, 6))
def test_no_sinks_is_plain_window_attention_even_with_rope(b, hk, groups, t, extra, d, seed, window):
    n = t + extra
    q, k, v = qkv(b, hk * groups, hk, t, n, d, seed)
    args = (q, k, v, torch.arange(extra, n), torch.arange(n), None, window, 1)
    torch.testing.assert_close(op(*args, 0, d ** -0.5, torch.rand(d // 2, **F64)), op(*args, 0, d ** -0.5, None))


@given(t=st.integers(1, 12), sinks=st.integers(1, 4), window=st.integers(1, 6), partial=st.booleans(),
       seed=st.integers(0, 2**16))
def test_sink_scores_use_positions_within_the_cache(t, sinks, window, partial, seed):
    """Against StreamingLLM done the slow way: keys kept un-rotated, and for each query the kept
    tokens (sinks, then the window) rotated at their places in the cache, the query last."""
    d = 8
    g = torch.Generator().manual_seed(seed)
    inv = 1.0 / (100 ** (torch.arange(0, 2 if partial else 4, **F64) / 4))
    n = t + 5
    q0, k0, v = (torch.randn(1, 2, n, d, generator=g, **F64) for _ in range(3))
    pos = torch.arange(n)
    q_pos = pos[-t:]
    q, k = rope(q0[:, :, -t:], q_pos, inv), rope(k0, pos, inv)  # what the model computes: absolute positions
    out = op(q, k, v, q_pos, pos, None, window, 1, sinks, d ** -0.5, inv)

    def keys_of(a):
        return set(range(min(sinks, a + 1))) | set(range(max(0, a - window + 1), a + 1))

    def positions_of(a, kept):  # cache order = index order; the query is the last kept token
        return len(kept) - 1, list(range(len(kept))), inv
    ref = brute(q0[:, :, -t:], k0, v, q_pos, pos, keys_of, positions_of)
    torch.testing.assert_close(out, ref)


def test_rotate_back_inverts_rope():
    inv = torch.rand(3, **F64)
    x = torch.randn(2, 1, 4, 8, **F64)
    delta = torch.tensor([0, 1, 5, 100])
    torch.testing.assert_close(rotate_back(rope(x, delta, inv), delta, inv), x)


def test_key_padding_and_fully_masked_queries():
    q, k, v = qkv(2, 2, 2, 3, 5, 4, 0)
    mask = torch.tensor([[True] * 5, [False, False, True, True, True]])
    pos = torch.arange(5)
    out = op(q, k, v, pos[2:], pos, mask, None, 1, 0, 0.5, None)
    ref1 = op(q[1:, :, :, :], k[1:, :, 2:], v[1:, :, 2:], pos[2:], pos[2:], None, None, 1, 0, 0.5, None)
    torch.testing.assert_close(out[1:], ref1)
    none = op(q, k, v, pos[2:], pos, torch.zeros(2, 5, dtype=torch.bool), None, 1, 0, 0.5, None)
    assert torch.equal(none, torch.zeros_like(none))


def test_a_mask_per_query_and_key_is_anded_with_the_window():
    """key_mask [B, T, L] (a model's own attention mask) removes exactly its pairs from the pattern."""
    q, k, v = qkv(2, 4, 2, 5, 9, 4, 2)
    pos = torch.arange(9)
    mask = torch.rand(2, 5, 9, generator=torch.Generator().manual_seed(3)) > 0.4
    keep = allowed(pos[4:], pos, 3, 2, 1) & mask[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           attn_mask=keep, scale=0.5)
    torch.testing.assert_close(op(q, k, v, pos[4:], pos, mask, 3, 2, 1, 0.5, None), ref)
    torch.testing.assert_close(op(q, k, v, pos[4:], pos, mask[:, :1].expand(2, 5, 9), 3, 2, 1, 0.5, None),
                               op(q, k, v, pos[4:], pos, mask[:, 0], 3, 2, 1, 0.5, None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_and_gradients(dtype):
    q, k, v = (t.to(dtype).requires_grad_(True) for t in qkv(1, 4, 2, 3, 6, 4, 1))
    pos = torch.arange(6)
    args = (q, k, v, pos[3:], pos, None, 2, 1, 1, 0.5, torch.rand(2))
    torch.library.opcheck(op.default, args)
    if dtype == torch.float32:
        q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
        torch.autograd.gradcheck(lambda a, b, c: op(a, b, c, pos[3:], pos, None, 2, 1, 1, 0.5, torch.rand(2,
                                 generator=torch.Generator().manual_seed(0))), (q64, k64, v64))


def test_reference_is_the_op():
    q, k, v = qkv(1, 2, 1, 4, 7, 4, 3)
    pos = torch.arange(7)
    torch.testing.assert_close(op(q, k, v, pos[3:], pos, None, 3, 2, 1, 0.5, None),
                               window_attention_reference(q, k, v, pos[3:], pos, None, 3, 2, 1, 0.5, None))


@given(t=st.integers(1, 30), kept=st.integers(0, 20), evicted=st.integers(0, 30), window=st.integers(1, 12),
       dilation=st.integers(1, 3), sinks=st.integers(0, 4), shift=st.booleans(),
       masked=st.sampled_from([None, "key", "pair"]), block=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_blocked_cpu_path_equals_reference(t, kept, evicted, window, dilation, sinks, shift, masked, block, seed):
    """The CPU path (a block of queries against only the keys it can see) on rolling-cache layouts,
    with no mask, a mask per key [B, L] or per query and key [B, T, L]."""
    n = t + kept
    seen = n + (evicted if sinks < n - t else 0)
    j = torch.arange(n)
    q_pos, k_pos = torch.arange(seen - t, seen), torch.where(j < sinks, j, j + (seen - n))
    q, k, v = qkv(2, 4, 2, t, n, 8, seed)
    shape = {None: None, "key": (2, n), "pair": (2, t, n)}[masked]
    key_mask = torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) > 0.3 if shape else None
    args = (q, k, v, q_pos, k_pos, key_mask, window, 1 if shift else dilation, sinks, 0.4,
            torch.rand(2, **F64) if shift else None)
    torch.testing.assert_close(window_attention_blocked(*args, block=block), window_attention_reference(*args))


# --- the Triton kernel (CPU: triton's interpreter) against the reference ---------------------
from sparsecc.codegen import interpreted, window_attention_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not interpreted() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}  # relative to max |out|
needs_kernels = pytest.mark.skipif(DEVICE == "cpu" and not interpreted(),
                                   reason="Triton kernels need a GPU or TRITON_INTERPRET=1")


def cache_layout(n_keys, t, seen, sinks):
    """Positions as the rolling cache returns them: sinks first, then a run ending at seen-1."""
    j = torch.arange(n_keys)
    return torch.arange(seen - t, seen), torch.where(j < sinks, j, j + (seen - n_keys))


@needs_kernels
@given(b=st.integers(1, 2), hk=st.integers(1, 2), groups=st.integers(1, 3), t=st.integers(1, 40),
       kept=st.integers(0, 30), evicted=st.integers(0, 50), d=st.sampled_from([4, 12, 16, 24]),
       window=st.one_of(st.none(), st.integers(1, 20)), dilation=st.integers(1, 3), sinks=st.integers(0, 5),
       shift=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_kernel_equals_reference(b, hk, groups, t, kept, evicted, d, window, dilation, sinks, shift, dtype, seed):
    n = t + kept
    seen = n + (evicted if sinks < n - t else 0)  # eviction happens between the sinks and the window
    q_pos, k_pos = cache_layout(n, t, seen, sinks)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, m, d, generator=g).to(DEVICE, dtype)
               for h, m in ((hk * groups, t), (hk, n), (hk, n)))
    dil = dilation if not shift else 1
    inv = (1.0 / 100 ** (torch.arange(0, d // 2, 2) / d)).to(DEVICE) if shift and window is not None else None
    args = (q, k, v, q_pos.to(DEVICE), k_pos.to(DEVICE), None, window, dil, sinks, d ** -0.5, inv)
    ref = window_attention_reference(*[a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                       for a in args[:3]], *args[3:])
    out = window_attention_triton(*args, blocks=(16, 16))
    err = (out.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-6)
    assert err <= TOL[dtype], err


@needs_kernels
@pytest.mark.parametrize("window,sinks", [(1, 0), (1, 2), (1000, 0), (None, 0), (3, 40)])
def test_kernel_edges_and_key_mask(window, sinks):
    """window 1 (each query sees itself, plus sinks), window >= length, more sinks than keys,
    padded keys (a query whose keys are all padding outputs 0), and a mask per query and key."""
    q, k, v = (x.float().to(DEVICE) for x in qkv(2, 4, 2, 37, 37, 8, 5))
    pos = torch.arange(37, device=DEVICE)
    mask = torch.ones(2, 37, dtype=torch.bool, device=DEVICE)
    mask[1, :20] = False
    pairs = torch.rand(2, 37, 37, generator=torch.Generator().manual_seed(1)).to(DEVICE) > 0.5
    for key_mask in (None, mask, pairs):
        args = (q, k, v, pos, pos, key_mask, window, 1, sinks, 0.4, None)
        torch.testing.assert_close(window_attention_triton(*args, blocks=(16, 16)), window_attention_reference(*args),
                                   rtol=1e-4, atol=1e-5)


@needs_kernels
def test_compiled_model_runs_the_attention_kernel(make_model, kernel_calls):
    import sparsecc
    from transformers import DynamicCache

    model = make_model("llama")
    sparsecc.sparsify_(model, {"re:.*self_attn": sparsecc.AttentionSinkConfig(sinks=2, window=5)}, progress=False)
    calls = kernel_calls("window_attention_triton")
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, backend="sparsecc", options={"kernels": "triton"})
        out = compiled(ids).logits
        cache = DynamicCache()
        compiled(ids[:, :20], **sparsecc.cache_kwargs(cache), use_cache=True)
        step = compiled(ids[:, 20:21], **sparsecc.cache_kwargs(cache), use_cache=True).logits
    assert len(calls) == 2 * 3  # 2 layers x (full forward, prefill, decode step)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step[:, -1], eager[:, 20], rtol=1e-4, atol=1e-4)
