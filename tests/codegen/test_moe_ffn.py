"""The grouped MoE Triton kernel against its reference (CPU: triton's interpreter): odd shapes,
fp32/fp16/bf16, both output modes, capacity limits, empty experts, one expert, and in a compiled
model."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparsecc
from sparsecc.codegen import interpreted, moe_ffn_reference, moe_ffn_triton

DEVICE = "cuda" if torch.cuda.is_available() and not interpreted() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}  # relative to max |y|
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not interpreted(),
                                reason="Triton kernels need a GPU or TRITON_INTERPRET=1")


def moe_args(tokens, hidden, experts, size, bias, dtype, seed, skew=0.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    router = r(experts, hidden)
    router[0] += skew  # skew > 0: most tokens pick expert 0, some experts get none
    ws = (r(experts, size, hidden) / hidden ** 0.5, r(experts, size) if bias else None,
          r(experts, size, hidden) / hidden ** 0.5, r(experts, size) if bias else None,
          r(experts, hidden, size) / size ** 0.5, r(hidden) if bias else None)
    to = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    return to(r(tokens, hidden)), router.to(DEVICE), (r(experts) if bias else torch.zeros(experts)).to(DEVICE), \
        [to(w) for w in ws]


@given(tokens=st.integers(1, 40), hidden=st.integers(3, 40), experts=st.integers(1, 6), size=st.integers(1, 40),
       k=st.integers(1, 6), cf=st.sampled_from([0.0, 0.5, 1.25]), mode=st.sampled_from(["sum", "softmax_topk"]),
       bias=st.booleans(), skew=st.sampled_from([0.0, 20.0]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_kernel_equals_reference(tokens, hidden, experts, size, k, cf, mode, bias, skew, dtype, seed):
    k = min(k, experts)
    x, rw, rb, (wg, bg, wu, bu, wd, bd) = moe_args(tokens, hidden, experts, size, bias, dtype, seed, skew)
    args = (rw, rb, wg, bg, wu, bu, wd, bd, k, cf, "silu", mode)
    out = moe_ffn_triton(x, *args)
    f32 = [t.float() if isinstance(t, torch.Tensor) else t for t in (x, *args)]
    ref = moe_ffn_reference(*f32)
    err = (out.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-6)
    assert err <= TOL[dtype], err


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "relu"])
def test_every_activation_and_all_tokens_dropped(act):
    x, rw, rb, ws = moe_args(9, 16, 4, 8, True, torch.float32, 0)
    torch.testing.assert_close(moe_ffn_triton(x, rw, rb, *ws, 2, 0.0, act, "sum"),
                               moe_ffn_reference(x, rw, rb, *ws, 2, 0.0, act, "sum"), rtol=1e-4, atol=1e-5)
    tiny_cap = moe_ffn_triton(x, rw, rb, *ws, 1, 1e-6, act, "sum")  # capacity 1: one token per expert
    torch.testing.assert_close(tiny_cap, moe_ffn_reference(x, rw, rb, *ws, 1, 1e-6, act, "sum"), rtol=1e-4, atol=1e-5)


def test_compiled_moe_model_runs_the_kernel(make_model, compiled_with_kernel):
    calls = compiled_with_kernel(make_model("llama"), {"re:.*mlp": sparsecc.MoEConfig(4, 2)}, "moe_ffn_triton",
                                 torch.randint(0, 128, (2, 9)))
    assert len(calls) == 2
