"""Quantizing configs end to end: GPTQ, RTN and SparseGPT(bits=) through sparsify_, the grid on each
module, plans, GPT-2's transposed weights, and the refusals (bad bits or group size, a layer
quantized twice or pruned after quantizing) that leave the model unchanged."""
import copy

import pytest
import torch

import sparsecc
from sparsecc import GPTQConfig, MagnitudeConfig, RTNConfig, SparseGPTConfig
from sparsecc.prune.quantize import grid_of

SKIP_HEAD = {"lm_head": None}


def quantized(model) -> dict:
    return {n: grid_of(m) for n, m in model.named_modules() if grid_of(m) is not None}


@pytest.mark.parametrize("cfg,label", [(GPTQConfig(bits=4, group_size=32), "int4 g32"),
                                       (RTNConfig(bits=8, group_size=None, sym=True), "int8 row sym"),
                                       (SparseGPTConfig(0.5, bits=4, group_size=32), "int4 g32"),
                                       (SparseGPTConfig(pattern="2:4", bits=3, group_size=None), "int3 row")])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sparsify_quantizes_every_target(cfg, label, family, make_model, batches):
    m = make_model(family)
    rep = sparsecc.sparsify_(m, {"default": cfg, **SKIP_HEAD}, batches, progress=False)
    grids = quantized(m)
    assert set(grids) == {r["module"] for r in rep.rows} and len(grids) >= 8
    for r in rep.rows:
        assert r["quant"] == label and label in rep.table()
        w = m.get_submodule(r["module"]).weight.detach()
        w = w.t() if r["transposed"] else w  # GPT-2's Conv1D stores [in, out]; grids are [out, in]
        assert torch.equal(w, grids[r["module"]].dequantize())
        if getattr(cfg, "sparsity", 0) and cfg.pattern is None:
            assert r["sparsity"] >= 0.5
        if getattr(cfg, "pattern", None):
            assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()
    with torch.no_grad():
        assert torch.isfinite(m(batches[0]).logits).all()


def test_gptq_closer_to_dense_than_rtn(make_model, batches):
    """GPTQ's model stays closer to the dense logits than round-to-nearest's at 3 bits."""
    dense = make_model("llama")
    with torch.no_grad():
        ref = dense(batches[0]).logits
    errs = {}
    for cfg in (GPTQConfig(bits=3, group_size=32), RTNConfig(bits=3, group_size=32)):
        m = make_model("llama")
        sparsecc.sparsify_(m, {"default": cfg, **SKIP_HEAD}, batches, progress=False)
        with torch.no_grad():
            errs[type(cfg).__name__] = float((m(batches[0]).logits - ref).pow(2).mean())
    assert errs["GPTQConfig"] < 0.8 * errs["RTNConfig"], errs


def test_plan_replays_the_grids(make_model, batches, tmp_path):
    m = make_model("llama")
    recipe = {"default": SparseGPTConfig(0.5, bits=4, group_size=32), **SKIP_HEAD}
    plan = sparsecc.calibrate(m, batches, recipe, progress=False)
    assert not quantized(m)  # calibrate changes nothing, grids included
    plan.save(tmp_path / "plan")
    a, b = copy.deepcopy(m), copy.deepcopy(m)
    sparsecc.sparsify_(a, recipe, batches, progress=False)
    sparsecc.sparsify_(b, sparsecc.Plan.load(tmp_path / "plan"))
    ga, gb = quantized(a), quantized(b)
    assert set(ga) == set(gb)
    for name in ga:
        assert torch.equal(ga[name].codes, gb[name].codes) and torch.equal(ga[name].scales, gb[name].scales)
        assert torch.equal(a.get_submodule(name).weight, b.get_submodule(name).weight)


@pytest.mark.parametrize("second", [GPTQConfig(bits=4), MagnitudeConfig(0.5), SparseGPTConfig(0.5, bits=4)])
def test_quantized_layers_are_not_rewritten_again(second, make_model, batches, state_tools):
    snapshot, same_state = state_tools
    m = make_model("llama")
    sparsecc.sparsify_(m, {"default": RTNConfig(bits=4, group_size=32), **SKIP_HEAD}, batches, progress=False)
    snap, grids = snapshot(m), quantized(m)
    with pytest.raises(sparsecc.RecipeError, match="already quantized .*int4 g32.*SparseGPTConfig\\(bits=...\\)"):
        sparsecc.sparsify_(m, {"default": second, **SKIP_HEAD}, batches, progress=False)
    assert same_state(m, snap) and quantized(m) == grids


@pytest.mark.parametrize("make_cfg,match", [(lambda: GPTQConfig(bits=5), "bits must be one of 2, 3, 4, 8"),
                                            (lambda: SparseGPTConfig(0.5, bits=1), "bits must be one of"),
                                            (lambda: RTNConfig(group_size=-1), "group_size must be a positive int"),
                                            (lambda: GPTQConfig(sym="yes"), "sym must be True or False")])
def test_bad_configs(make_cfg, match):
    with pytest.raises(sparsecc.RecipeError, match=match):
        make_cfg()


def test_group_size_not_dividing_is_refused_before_any_work(make_model, batches, state_tools):
    snapshot, same_state = state_tools
    m = make_model("llama")  # hidden 64, MLP 128: 48 divides neither
    snap = snapshot(m)
    with pytest.raises(sparsecc.RecipeError, match="group_size 48 does not divide its input width 64"):
        sparsecc.sparsify_(m, {"default": GPTQConfig(bits=4, group_size=48), **SKIP_HEAD}, batches, progress=False)
    assert same_state(m, snap) and not quantized(m)


def test_a_failing_run_removes_the_grids_it_attached(make_model, batches, state_tools, monkeypatch):
    """A run that fails after quantizing some layers leaves no grid behind (the Transaction's undo)."""
    snapshot, same_state = state_tools
    m = make_model("llama")
    snap = snapshot(m)
    from sparsecc.techniques import quantization
    calls = {"n": 0}
    real = quantization.rtn

    def fail_late(*a, **k):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(quantization, "rtn", fail_late)
    with pytest.raises(Exception, match="boom"):
        sparsecc.sparsify_(m, {"default": RTNConfig(bits=4, group_size=32), **SKIP_HEAD}, batches, progress=False)
    assert calls["n"] > 5 and same_state(m, snap) and not quantized(m)


def test_rewrites_that_rebuild_linears_refuse_quantized_ones(make_model, batches, state_tools):
    snapshot, same_state = state_tools
    m = make_model("llama")
    sparsecc.sparsify_(m, {"default": RTNConfig(bits=4, group_size=32), **SKIP_HEAD}, batches, progress=False)
    snap = snapshot(m)
    with pytest.raises(sparsecc.RecipeError, match="StructuredConfig would rebuild model.layers.0.mlp.gate_proj, which is quantized"):
        sparsecc.sparsify_(m, {"re:.*mlp": sparsecc.StructuredConfig(0.5)}, batches, progress=False)
    assert same_state(m, snap)
