"""CSR-stored linears (compressed.CSRLinear, torch.ops.sparsecc.csr_linear): same outputs and
gradients as the pruned nn.Linear, op registration, compress_csr_ choosing by sparsity and
refusing what it cannot do, and the compiled model."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sparsecc


def pruned_linear(in_f, out_f, sparsity, bias, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * (torch.rand(out_f, in_f, generator=g) >= sparsity))
    return lin


@given(in_f=st.integers(1, 40), out_f=st.integers(1, 40), tokens=st.integers(1, 9), sparsity=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
       bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_csr_linear_equals_pruned_linear(in_f, out_f, tokens, sparsity, bias, dtype, seed):
    lin = pruned_linear(in_f, out_f, sparsity, bias, seed, dtype)
    csr = sparsecc.CSRLinear.from_linear(lin)
    assert torch.equal(csr.weight, lin.weight.detach())  # the stored rows and columns are the weight's
    x = torch.randn(2, tokens, in_f, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(csr(x), lin(x))


def test_op_registration_and_gradients():
    lin = pruned_linear(32, 16, 0.8, True, 0)
    csr = sparsecc.CSRLinear.from_linear(lin)
    x = torch.randn(5, 32)
    args = (csr.crow, csr.col, csr.values)
    op = torch.ops.sparsecc.csr_linear.default
    torch.library.opcheck(op, (x, *args, csr.bias.detach(), 32))
    torch.library.opcheck(op, (x[None], *args, None, 32))
    xg, bg = x.clone().requires_grad_(), csr.bias.detach().clone().requires_grad_()
    torch.library.opcheck(op, (xg, *args, bg, 32))
    torch.ops.sparsecc.csr_linear(xg, *args, bg, 32).square().sum().backward()
    xd, bd = x.clone().requires_grad_(), lin.bias.detach().clone().requires_grad_()
    torch.nn.functional.linear(xd, lin.weight.detach(), bd).square().sum().backward()
    torch.testing.assert_close(xg.grad, xd.grad)
    torch.testing.assert_close(bg.grad, bd.grad)


def test_compress_csr_by_sparsity_and_compiled(make_model, batches):
    model = make_model("llama")
    assert sparsecc.compress_csr_(model) == []  # dense weights: none qualifies
    with pytest.raises(sparsecc.RecipeError, match="less than 90% zeros.*down_proj"):
        sparsecc.compress_csr_(model, targets=["re:.*mlp.*"])
    assert not any(isinstance(m, sparsecc.CSRLinear) for m in model.modules())  # nothing half-done
    sparsecc.sparsify_(model, {"re:.*mlp.*": sparsecc.MagnitudeConfig(0.95)}, progress=False)
    ids = batches[0]
    with torch.no_grad():
        ref = model(ids).logits
        names = sparsecc.compress_csr_(model)
        assert len(names) == 6 and all("mlp" in n for n in names)
        torch.testing.assert_close(model(ids).logits, ref)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(model, backend="sparsecc")(ids).logits, ref)


def test_compress_csr_bad_input(make_model):
    with pytest.raises(sparsecc.RecipeError, match="min_sparsity must be in"):
        sparsecc.compress_csr_(make_model("llama"), min_sparsity=1.5)
    with pytest.raises(sparsecc.RecipeError, match="no nn.Linear"):
        sparsecc.compress_csr_(nn.Sequential(nn.ReLU()))
    half = nn.Sequential(pruned_linear(8, 8, 0.95, False, 0, torch.bfloat16))
    with pytest.raises(sparsecc.RecipeError, match="float32 or float64.*model.float"):
        sparsecc.compress_csr_(half, min_sparsity=0.5)
    assert type(half[0]) is nn.Linear


def test_half_weights_and_double_backward():
    """After model.to(bf16) (or under autocast) the CPU product runs in fp32; second derivatives work."""
    lin = pruned_linear(16, 8, 0.7, True, 1)
    csr = sparsecc.CSRLinear.from_linear(lin)
    x = torch.randn(3, 16)
    csr16, lin16 = csr.to(torch.bfloat16), lin.to(torch.bfloat16)
    with torch.no_grad():
        y = csr16(x.bfloat16())
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), lin16(x.bfloat16()).float(), rtol=2e-2, atol=2e-2)
    csr = sparsecc.CSRLinear.from_linear(pruned_linear(16, 8, 0.7, True, 1))
    w = csr.weight
    xg = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(csr(xg).square().sum(), xg, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.sum(), xg)  # gx = 2 (xWᵀ + b) W, so every row of ggx is 2 · 1 Wᵀ W
    torch.testing.assert_close(ggx, (2 * torch.ones(3, 16) @ w.t() @ w))
