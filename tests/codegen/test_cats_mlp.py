"""The CATS MLP Triton kernel against its reference (CPU: triton's interpreter), at odd shapes,
fp32/fp16/bf16, every activation, thresholds that keep all or no neurons, and in a compiled model."""
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import sparsecc
from sparsecc.codegen import cats_mlp_reference, cats_mlp_triton, interpreted
from sparsecc.codegen.cats_mlp import ACTIVATIONS

DEVICE = "cuda" if torch.cuda.is_available() and not interpreted() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}  # relative to max |y|
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not interpreted(),
                                reason="Triton kernels need a GPU or TRITON_INTERPRET=1")


def weights(hidden, inter, seed, bias, dtype):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) / s[-1] ** 0.25).to(DEVICE, dtype)  # noqa: E731
    return [r(inter, hidden), r(inter) if bias else None, r(inter, hidden), r(inter) if bias else None,
            r(hidden, inter), r(hidden) if bias else None]


def ref64(x, ws, t, act):
    return cats_mlp_reference(x.double(), *[w.double() if w is not None else None for w in ws], t, act)


@given(tokens=st.integers(1, 20), hidden=st.integers(1, 70), inter=st.integers(1, 90), act=st.sampled_from(sorted(ACTIVATIONS)),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), bias=st.booleans(),
       quantile=st.floats(0.0, 0.95), seed=st.integers(0, 2**16))
def test_kernel_equals_reference(tokens, hidden, inter, act, dtype, bias, quantile, seed):
    ws = weights(hidden, inter, seed, bias, dtype)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    v = ACTIVATIONS[act](torch.nn.functional.linear(x.double(), ws[0].double(), None if ws[1] is None else ws[1].double()))
    t = float(v.abs().flatten().quantile(quantile))
    # a neuron within rounding of t may be kept by one and dropped by the other: keep clear of it
    assume(t == 0 or not bool(((v.abs() - t).abs() < 2 * TOL[dtype] * max(t, 1e-3)).any()))
    y = cats_mlp_triton(x, *ws, t, act)
    ref = ref64(x, ws, t, act)
    assert y.dtype == dtype and y.shape == ref.shape
    err = (y.double() - ref).abs().max().item()
    assert err <= TOL[dtype] * max(1.0, ref.abs().max().item()), err


@pytest.mark.parametrize("blocks", [(16, 16, 16), (16, 64, 64), (64, 32, 16)])
def test_all_and_no_neurons_active(blocks):
    ws = weights(24, 40, 0, True, torch.float32)
    x = torch.randn(3, 2, 24).to(DEVICE)
    for t in (0.0, float("inf")):
        y = cats_mlp_triton(x, *ws, t, "silu", blocks=blocks)
        torch.testing.assert_close(y.double(), ref64(x, ws, t, "silu"), rtol=1e-4, atol=1e-4)
    assert torch.equal(cats_mlp_triton(x, *ws, float("inf"), "silu"), ws[5].expand(3, 2, 24))  # only b_down


def test_column_major_down_weight_gives_the_same_result():
    """W_down may be stored [inter, hidden]-contiguous (the seed's layout for reading active neurons)."""
    ws = weights(32, 48, 1, False, torch.float32)
    x = torch.randn(1, 32).to(DEVICE)
    col = list(ws)
    col[4] = ws[4].t().contiguous().t()
    torch.testing.assert_close(cats_mlp_triton(x, *col, 0.2, "silu"), cats_mlp_triton(x, *ws, 0.2, "silu"))


def test_compiled_cats_model_runs_the_kernel(make_model, compiled_with_kernel):
    calls = compiled_with_kernel(make_model("llama"), {"re:.*mlp": sparsecc.CATSConfig(0.5)}, "cats_mlp_triton",
                                 torch.randint(0, 128, (1, 7)))
    assert len(calls) == 2
