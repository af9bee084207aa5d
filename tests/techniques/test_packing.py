"""Packing (techniques/packing.py): pack_ choosing each linear's form (N:M, CSR or dense), detecting
N:M patterns, refusing what it cannot do with nothing half-done; CSR-stored linears (CSRLinear,
torch.ops.sparsecc.csr_linear): same outputs and gradients as the pruned nn.Linear, op registration,
compress_csr_ choosing by sparsity, and the compiled model. (NMLinear itself: tests/codegen/test_nm_linear.py.)"""
import copy

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


def nm_linear(in_f, out_f, n, m, seed, keep=None):
    """An nn.Linear whose weight keeps the `n` largest of every `m` inputs (or the positions `keep`
    of every group of m)."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        w = torch.randn(out_f, in_f // m, m, generator=g)
        mask = torch.zeros_like(w, dtype=torch.bool)
        if keep is None:
            mask.scatter_(-1, w.abs().topk(n, dim=-1).indices, True)
        else:
            mask[..., keep] = True
        lin.weight.copy_((w * mask).reshape(out_f, in_f))
    return lin


def test_pack_auto_mixed_model_keeps_logits(make_model, batches):
    """2:4 MLPs -> NMLinear, 95%-unstructured q/k projections -> CSRLinear, the rest stays nn.Linear."""
    model = make_model("llama")
    recipe = {"re:.*mlp.*": sparsecc.MagnitudeConfig(pattern="2:4"),
              r"re:.*self_attn\.(q|k)_proj": sparsecc.MagnitudeConfig(0.95)}
    sparsecc.sparsify_(model, recipe, progress=False)
    ids = batches[0]
    with torch.no_grad():
        ref = model(ids).logits
        forms = sparsecc.pack_(model)
        torch.testing.assert_close(model(ids).logits, ref)
    mlp = {f"model.layers.{i}.mlp.{p}_proj": "nm 2:4" for i in range(2) for p in ("gate", "up", "down")}
    attn = {f"model.layers.{i}.self_attn.{p}_proj": "csr" for i in range(2) for p in ("q", "k")}
    assert forms == {**mlp, **attn} and list(forms) == sorted(forms)
    kinds = {"nm 2:4": sparsecc.NMLinear, "csr": sparsecc.CSRLinear}
    assert all(type(model.get_submodule(name)) is kinds[form] for name, form in forms.items())
    dense = [n for n, mod in model.named_modules() if type(mod) is nn.Linear]
    assert sorted(dense) == sorted([f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in ("v", "o")]
                                   + ["lm_head"])
    assert sparsecc.pack_(model) == {}  # nothing left that qualifies


def never_nm(in_f, out_f, sparsity, seed, dtype=torch.float32):
    """pruned_linear with 5 nonzeros in the first 8 inputs of row 0, so that no chance makes it 1:4, 2:4 or 4:8."""
    lin = pruned_linear(in_f, out_f, sparsity, False, seed, dtype)
    with torch.no_grad():
        lin.weight[0, :5] = 1.0
    return lin


def test_pack_nm_detects_the_finest_pattern():
    """pattern=None: the first of 1:4, 2:4, 4:8 each weight fits (1:16 is 1:4 too); dense stays."""
    layers = {"a": nm_linear(16, 8, 1, 4, 0), "b": nm_linear(16, 8, 2, 4, 1),
              "c": nm_linear(16, 8, 4, 8, 2, keep=[0, 1, 2, 4]),  # 3 of the first 4 inputs: 4:8, not 2:4
              "d": nn.Linear(16, 8), "e": nm_linear(16, 8, 1, 16, 3)}
    model = nn.ModuleDict(layers)
    x = torch.randn(5, 16)
    with torch.no_grad():
        refs = {name: lin(x) for name, lin in layers.items()}
        assert sparsecc.pack_(model, "nm") == {"a": "nm 1:4", "b": "nm 2:4", "c": "nm 4:8", "e": "nm 1:4"}
        assert type(model["d"]) is nn.Linear
        for name, ref in refs.items():
            torch.testing.assert_close(model[name](x), ref)
    again = nn.ModuleDict({k: nm_linear(16, 8, *nm, i) for i, (k, nm) in enumerate({"a": (1, 4), "b": (2, 4)}.items())})
    assert sparsecc.pack_(again, "nm", pattern="4:8") == {"a": "nm 4:8", "b": "nm 4:8"}  # a given pattern is used
    assert sparsecc.compress_nm_(nn.Sequential(nm_linear(16, 8, 2, 4, 1)), None) == ["0"]  # detects too


def test_pack_auto_prefers_csr_only_beyond_the_pattern():
    """auto: a weight with ≥ min_sparsity zeros that fits N:M with zeros to spare goes CSR (it stores
    fewer values); one exactly as sparse as its pattern (1:16 keeps 6.25%) stays N:M."""
    model = nn.Sequential(pruned_linear(64, 16, 0.97, True, 0), nm_linear(64, 16, 1, 16, 1))
    w = model[0].weight.detach()
    assert bool(((w.reshape(16, -1, 8) != 0).sum(-1) <= 4).all())  # the 97% weight fits 4:8 by chance
    assert sparsecc.pack_(copy.deepcopy(model), pattern="1:16") == {"0": "csr", "1": "nm 1:16"}
    assert sparsecc.pack_(copy.deepcopy(model)) == {"0": "csr", "1": "csr"}  # 1:16 fits 1:4 with zeros to spare
    assert sparsecc.pack_(copy.deepcopy(model), min_sparsity=0.95) == {"0": "csr", "1": "nm 1:4"}  # 93.75% < 95%
    assert sparsecc.pack_(copy.deepcopy(model), "nm")["0"].startswith("nm ")  # format="nm" takes what fits


def test_pack_refuses_and_changes_nothing(make_model, state_tools):
    snapshot, same = state_tools
    model = make_model("llama")
    sparsecc.sparsify_(model, {"re:.*mlp.*": sparsecc.MagnitudeConfig(pattern="2:4"),
                               "re:.*o_proj": sparsecc.MagnitudeConfig(0.95)}, progress=False)
    snap = snapshot(model)
    kinds = lambda: {n: type(mod) for n, mod in model.named_modules()}  # noqa: E731
    before = kinds()
    for fmt in ("int8", "NM", None, 2):
        with pytest.raises(sparsecc.RecipeError, match="format must be one of 'auto', 'nm', 'csr', 'quant', got"):
            sparsecc.pack_(model, fmt)
    with pytest.raises(sparsecc.RecipeError, match="pattern='2:4' is for format='nm' or 'auto'"):
        sparsecc.pack_(model, "csr", pattern="2:4")
    with pytest.raises(sparsecc.RecipeError, match="pattern must be None or 'N:M'"):
        sparsecc.pack_(model, pattern="2-4")
    with pytest.raises(sparsecc.RecipeError, match="min_sparsity must be in"):
        sparsecc.pack_(model, min_sparsity=0)
    with pytest.raises(sparsecc.RecipeError, match="no nn.Linear"):
        sparsecc.pack_(nn.Sequential(nn.ReLU()))
    # explicit targets: the qualifying ones are not packed when one does not qualify
    with pytest.raises(sparsecc.RecipeError, match=r"neither N:M-sparse in any of 1:4, 2:4, 4:8 nor with at least "
                                                   r"90% zeros.*model.layers.0.self_attn.v_proj \(0%\).*pattern='2:4'"
                                                   r".*leave them out of targets"):
        sparsecc.pack_(model, targets=["re:.*mlp.*", "re:.*o_proj", "model.layers.0.self_attn.v_proj"])
    v_proj = "model.layers.1.self_attn.v_proj"
    with pytest.raises(sparsecc.RecipeError, match=rf"not N:M-sparse in any of.*: {v_proj} .*pass the pattern they have"):
        sparsecc.pack_(model, "nm", targets=["re:.*mlp.*", v_proj])
    with pytest.raises(sparsecc.RecipeError, match=rf"not 4:8-sparse, cannot pack: {v_proj} \(prune them with "
                                                   r"pattern='4:8' first, or leave them out of targets\)"):
        sparsecc.pack_(model, "nm", pattern="4:8", targets=["re:.*mlp.*", v_proj])
    with pytest.raises(sparsecc.RecipeError, match=r"less than 90% zeros.*down_proj \(50%\)"):
        sparsecc.pack_(model, "csr", targets=["re:.*mlp.*", "re:.*o_proj"])
    with pytest.raises(sparsecc.RecipeError, match="matches no linear module"):
        sparsecc.pack_(model, targets=["re:.*mlp.*", "model.layers.9"])
    assert kinds() == before and same(model, snap)
    forms = sparsecc.pack_(model, targets=["re:.*mlp.*", "re:.*o_proj"])  # all qualify: packed
    assert sorted(set(forms.values())) == ["csr", "nm 2:4"] and len(forms) == 8


def test_pack_auto_half_weights_on_cpu():
    """CSR on CPU needs fp32/fp64: auto refuses (naming the fix) without packing the N:M layer either."""
    model = nn.Sequential(nm_linear(16, 16, 2, 4, 0), never_nm(16, 16, 0.97, 1)).to(torch.bfloat16)
    assert float((model[1].weight == 0).float().mean()) >= 0.9
    with pytest.raises(sparsecc.RecipeError, match=r"1: .*float32 or float64.*model.float\(\).*format='nm'"):
        sparsecc.pack_(model)
    assert all(type(mod) is nn.Linear for mod in model)
    assert sparsecc.pack_(model, "nm") == {"0": "nm 2:4"}
