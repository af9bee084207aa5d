"""Quantized linears packed for inference (techniques/packing.py): QuantLinear equals the dequantized
nn.Linear (exactly through the reference, within bf16 rounding through torch's CPU kernels), survives
.to()/state_dict, and pack_ chooses it for quantized weights (before N:M and CSR) where a fast product
exists, with format="quant" forcing it; a model of rtn-quantized linears packs, generates and compiles
with backend="sparsecc"; bad input changes nothing. (The kernels: tests/codegen/test_quant_linear.py.)"""
import copy

import pytest
import torch
from torch import nn

import sparsecc
from sparsecc.ops import use_kernels
from sparsecc.prune import magnitude
from sparsecc.prune.quantize import QUANTIZED, grid_of, rtn
from sparsecc.techniques.packing import QuantLinear, compressed_linears, pack_, quant_way

BF16 = dict(rtol=2e-2, atol=2e-2)


def quantize_(linear: nn.Linear, bits=4, group_size=32, sym=False) -> nn.Linear:
    """rtn-quantize the linear in place, its grid where pack_ finds it."""
    w, grid = rtn(linear.weight.detach(), bits, group_size, sym)
    with torch.no_grad():
        linear.weight.copy_(w)
    linear.__dict__[QUANTIZED] = grid
    return linear


def quantized_linear(in_f, out_f, bits=4, group_size=32, sym=False, bias=True, seed=0):
    torch.manual_seed(seed)
    return quantize_(nn.Linear(in_f, out_f, bias=bias), bits, group_size, sym)


def quantized_llama(make_model, bits=4, group_size=32, skip=("lm_head",)):
    model = make_model("llama")
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear and name not in skip:
            quantize_(mod, bits, group_size)
    return model


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (4, None, True), (2, 64, False), (3, 128, False),
                                            (8, None, True), (8, None, False), (8, 32, False), (4, 16, False)])
def test_quant_linear_equals_the_dequantized_linear(bits, group, sym):
    """Mode "reference": the dequantized nn.Linear up to fp32 rounding; "auto" on CPU: torch's int4/int8
    kernels where they apply (bf16 rounding), else the reference too."""
    lin = quantized_linear(128, 48, bits, group, sym)
    q = QuantLinear.from_linear(lin)
    assert torch.equal(q.weight, lin.weight.detach()) and q.weight.dtype == torch.float32
    assert (q.cpu_weight is not None) == (quant_way(grid_of(lin), "cpu") is None) == ((bits, group) != (8, 32)
                                                                                       and group != 16)
    x = torch.randn(2, 7, 128)
    with torch.no_grad():
        want = lin(x)
        with use_kernels("reference"):
            torch.testing.assert_close(q(x), want)
        got = q(x)
        torch.testing.assert_close(got, want, **BF16)
        if q.cpu_weight is not None:
            assert not torch.allclose(got, want, rtol=1e-6, atol=1e-6)  # torch's bf16 kernel ran
    xg = x.clone().requires_grad_()
    q(xg).sum().backward()
    torch.testing.assert_close(xg.grad, lin.weight.detach().sum(0).expand_as(x))


def test_from_linear_refuses_an_unquantized_or_changed_linear():
    with pytest.raises(sparsecc.RecipeError, match="not quantized.*GPTQConfig, RTNConfig or SparseGPTConfig"):
        QuantLinear.from_linear(nn.Linear(32, 16))
    lin = quantized_linear(32, 16)
    with torch.no_grad():
        lin.weight[0, 0] += 1.0
    with pytest.raises(sparsecc.RecipeError, match="no longer equals its quantization grid"):
        QuantLinear.from_linear(lin)


def test_to_dtype_device_and_state_dict():
    """.to(bf16) keeps scales float32 and rebuilds the CPU layout; load_state_dict rebuilds it from the
    loaded codes; the CPU layout is not part of the state."""
    a, b = QuantLinear.from_linear(quantized_linear(64, 32, seed=1)), QuantLinear.from_linear(
        quantized_linear(64, 32, seed=2))
    assert set(a.state_dict()) == {"codes", "scales", "zeros", "bias"}
    x = torch.randn(3, 64)
    with torch.no_grad():
        want_b = b(x)
        a.load_state_dict(b.state_dict())
        torch.testing.assert_close(a(x), want_b)  # the new layout, not the old one
        a16 = copy.deepcopy(a).to(torch.bfloat16)
        assert a16.scales.dtype == torch.float32 and a16.weight.dtype == torch.bfloat16
        assert a16.cpu_scales.dtype == torch.bfloat16 and a16.bias.dtype == torch.bfloat16
        y16 = a16(x.bfloat16())
        assert y16.dtype == torch.bfloat16
        torch.testing.assert_close(y16.float(), want_b, **BF16)
        assert a16.float().weight.dtype == torch.float32


def test_pack_quantized_llama_generates_and_compiles(make_model, batches, tmp_path):
    """Every quantized linear (lm_head stays dense) becomes a QuantLinear: logits within bf16 rounding
    on torch's CPU kernels and exact through the reference, greedy generation as the dequantized
    model's, and under torch.compile(backend="sparsecc") each QuantLinear is one op."""
    model = quantized_llama(make_model)
    ids = batches[0]
    with torch.no_grad():
        ref = model(ids).logits
        gen = model.generate(ids[:1, :6], max_new_tokens=6, do_sample=False)
        forms = pack_(model)
        names = [f"model.layers.{i}.{p}" for i in range(2) for p in
                 ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
                  "self_attn.q_proj", "self_attn.v_proj")]
        assert forms == dict.fromkeys(sorted(names), "int4 g32")
        assert compressed_linears(model) == dict.fromkeys(names, "QuantLinear")
        assert type(model.lm_head) is nn.Linear
        torch.testing.assert_close(model(ids).logits, ref, **BF16)
        with use_kernels("reference"):
            torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
            assert torch.equal(model.generate(ids[:1, :6], max_new_tokens=6, do_sample=False), gen)
        assert model.generate(ids[:1, :6], max_new_tokens=6, do_sample=False).shape == gen.shape
        eager = model(ids).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="sparsecc", options={"dump": str(tmp_path)})
        torch.testing.assert_close(compiled(ids).logits, eager, rtol=1e-5, atol=1e-5)
    after = "".join(p.read_text() for p in tmp_path.glob("graph-*.after.py"))
    assert after.count("torch.ops.sparsecc.quant_linear(") == len(names)
    assert sparsecc.pack_(model) == {}  # nothing left that qualifies
    with pytest.raises(Exception, match="cannot be pruned at compile time: it is quantized \\(QuantLinear\\)"):
        torch._dynamo.reset()
        torch.compile(model, backend="sparsecc", options={"recipe": {"model.layers.0.mlp.up_proj":
                                                                     sparsecc.MagnitudeConfig(0.5)}})(ids)
    with pytest.raises(sparsecc.RecipeError, match="compressed \\(QuantLinear\\)"):
        sparsecc.sparsify_(model, {"model.layers.0.mlp.up_proj": sparsecc.MagnitudeConfig(0.5)}, progress=False)


def test_quantization_comes_before_nm_and_csr():
    """A 2:4-sparse quantized weight packs as QuantLinear in auto, as NMLinear with format="nm"; a
    quantized weight torch's CPU kernels cannot run (out_features 40) stays a plain candidate in
    auto (here: dense) and packs with format="quant"."""
    def model():
        torch.manual_seed(0)
        m = nn.ModuleDict({"nm": nn.Linear(64, 32), "odd": nn.Linear(64, 40), "plain": nn.Linear(64, 32)})
        with torch.no_grad():
            m["nm"].weight.mul_(magnitude(m["nm"].weight, pattern="2:4"))
        quantize_(m["nm"])
        quantize_(m["odd"])
        return m
    m = model()
    assert torch.equal(m["nm"].weight != 0, magnitude(m["nm"].weight, pattern="2:4"))  # zeros stay zero
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = {k: lin(x) for k, lin in m.items()}
        assert pack_(m) == {"nm": "int4 g32"}
        assert type(m["nm"]) is QuantLinear and type(m["odd"]) is nn.Linear
        assert pack_(m, "quant") == {"odd": "int4 g32"}
        assert type(m["odd"]) is QuantLinear and m["odd"].cpu_weight is None  # the reference runs it
        for k in ("nm", "odd"):
            torch.testing.assert_close(m[k](x), want[k], **BF16)
    m = model()
    assert pack_(m, "nm") == {"nm": "nm 2:4"} and type(m["nm"]) is sparsecc.NMLinear


def test_bad_input_changes_nothing(make_model, state_tools):
    snapshot, same_state = state_tools
    model = quantized_llama(make_model, skip=("lm_head", "model.layers.1.mlp.down_proj"))
    snap = snapshot(model)

    def unchanged():
        assert same_state(model, snap) and not compressed_linears(model)

    with pytest.raises(sparsecc.RecipeError, match="not quantized, cannot pack as QuantLinear: "
                                                   "model.layers.1.mlp.down_proj.*GPTQConfig"):
        pack_(model, "quant", targets=["re:.*mlp.*"])
    unchanged()
    with pytest.raises(sparsecc.RecipeError, match="format must be one of 'auto', 'nm', 'csr', 'quant'"):
        pack_(model, "int4")
    with pytest.raises(sparsecc.RecipeError, match="pattern='2:4' is for format='nm' or 'auto'"):
        pack_(model, "quant", pattern="2:4")
    unchanged()
    with torch.no_grad():  # changed after quantizing: its grid is stale
        model.model.layers[1].mlp.up_proj.weight[0, 0] += 1
    snap = snapshot(model)
    with pytest.raises(sparsecc.RecipeError, match="model.layers.1.mlp.up_proj: its weight no longer equals"):
        pack_(model)
    unchanged()
    odd = nn.Sequential(quantized_linear(64, 40))  # no fast way on CPU: auto with targets names why
    with pytest.raises(sparsecc.RecipeError, match="without a fast quantized product.*0 \\(int4 g32: torch's int4 "
                                                   "CPU kernel needs out_features divisible by 16.*format='quant'"):
        pack_(odd, targets=["0"])
    assert type(odd[0]) is nn.Linear
