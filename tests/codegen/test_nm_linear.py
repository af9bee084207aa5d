"""The N:M Triton kernel against its reference (CPU: triton's interpreter; GPU with TRITON_INTERPRET=0),
NMLinear/compress_nm_, and the backend running the kernels (the op itself: tests/ops/test_nm_linear.py)."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparsecc
from sparsecc.codegen import interpreted, nm_linear_reference, nm_linear_triton
from sparsecc.codegen.nm_format import compress
from sparsecc.prune import magnitude

DEVICE = "cuda" if torch.cuda.is_available() and not interpreted() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative to max |y|
needs_kernels = pytest.mark.skipif(DEVICE == "cpu" and not interpreted(),
                                   reason="Triton kernels need a GPU or TRITON_INTERPRET=1")


def nm_weight(out_f, in_f, n, m, seed=0, zero_rows=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    w = w * magnitude(w, pattern=f"{n}:{m}")
    w[:zero_rows] = 0
    return w


def check(y, ref, dtype):
    assert y.dtype == dtype and y.shape == ref.shape
    err = (y.float() - ref.float()).abs().max().item()
    assert err <= TOL[dtype] * max(1.0, ref.float().abs().max().item()), err


@needs_kernels
@given(tokens=st.integers(1, 40), out_f=st.integers(1, 70), groups=st.integers(1, 40),
       nm=st.sampled_from([(2, 4), (4, 8), (1, 4), (1, 2)]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_kernel_equals_reference(tokens, out_f, groups, nm, dtype, bias, seed):
    n, m = nm
    in_f = groups * m  # any multiple of M, mostly not of the kernel's BLOCK_K
    w = nm_weight(out_f, in_f, n, m, seed)
    values, index = compress(w, n, m)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(tokens, in_f, generator=g).to(DEVICE, dtype)
    b = torch.randn(out_f, generator=g).to(DEVICE, dtype) if bias else None
    values = values.to(DEVICE, dtype)
    y = nm_linear_triton(x, values, index.to(DEVICE), n, m, in_f, b)
    check(y, nm_linear_reference(x.float(), values.float(), index, n, m, in_f, None if b is None else b.float()), dtype)


@needs_kernels
@pytest.mark.parametrize("blocks", [(16, 16, 16), (16, 64, 64), (64, 32, 128)])
def test_kernel_edges(blocks):
    """All-zero weights (and rows), 3-D input, decode and prefill tiles, one token."""
    for w in (torch.zeros(24, 64), nm_weight(24, 64, 2, 4, zero_rows=5)):
        values, index = compress(w, 2, 4)
        for shape in [(1, 64), (2, 3, 64)]:
            x = torch.randn(*shape).to(DEVICE)
            y = nm_linear_triton(x, values.to(DEVICE), index.to(DEVICE), 2, 4, 64, blocks=blocks)
            check(y, torch.nn.functional.linear(x, w.to(DEVICE)), torch.float32)


def test_kernel_bad_input():
    values, index = compress(nm_weight(8, 16, 2, 4), 2, 4)
    with pytest.raises(ValueError, match="do not fit 2:4"):
        nm_linear_triton(torch.randn(3, 12), values, index, 2, 4, 16)
    with pytest.raises(ValueError, match="BLOCK_K=18 must be a multiple of M=4"):
        nm_linear_triton(torch.randn(3, 16), values, index, 2, 4, 16, blocks=(16, 16, 18))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def test_compress_nm_keeps_outputs_and_refuses_dense_targets():
    model = tiny_llama()
    with pytest.raises(sparsecc.RecipeError, match="not 2:4-sparse.*down_proj"):
        sparsecc.compress_nm_(model, "2:4", targets=["re:.*mlp.*"])
    assert not any(isinstance(mod, sparsecc.NMLinear) for mod in model.modules())  # nothing half-done
    assert sparsecc.compress_nm_(model, "2:4") == []  # dense weights: none qualifies
    sparsecc.sparsify_(model, {"re:.*mlp.*": sparsecc.MagnitudeConfig(pattern="2:4")}, progress=False)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
        names = sparsecc.compress_nm_(model, "2:4")
        assert len(names) == 6 and all("mlp" in n for n in names)
        mlp = model.model.layers[0].mlp
        assert isinstance(mlp.up_proj, sparsecc.NMLinear) and mlp.up_proj.values.shape == (128, 32)
        assert torch.equal(model(ids).logits, ref)


@needs_kernels
def test_backend_runs_the_kernels(kernel_calls):
    """Compiled with kernels='triton' runs the Triton kernel for every N:M linear and matches eager."""
    model = tiny_llama()
    sparsecc.sparsify_(model, {"default": sparsecc.MagnitudeConfig(pattern="2:4"), "lm_head": None}, progress=False)
    sparsecc.compress_nm_(model, "2:4")
    calls = kernel_calls("nm_linear_triton")
    ids = torch.randint(0, 128, (1, 10))
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(ids).logits
        assert calls == []  # on CPU, eager uses the reference
        out = torch.compile(model, backend="sparsecc", options={"kernels": "triton"})(ids).logits
    assert len(calls) == 14  # 2 blocks x 7 linears
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


def test_backend_rejects_bad_kernels_option():
    with pytest.raises(sparsecc.RecipeError, match="option 'kernels' must be one of"):
        sparsecc.backend.BackendOptions.parse({"kernels": "fast"})
