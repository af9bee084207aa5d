"""CATS: the op (reference, gradient, registration), gated-MLP detection, the sparsify_ rewrite,
its calibration, checkpoints, composition with N:M pruning, and bad input."""
import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparsecc
from sparsecc.codegen.cats_mlp import cats_mlp_reference
from sparsecc.codegen.cats_mlp import ACTIVATIONS

ACTS = sorted(ACTIVATIONS)


def mlp_weights(hidden, inter, seed, bias=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return (r(inter, hidden), r(inter) if bias else None, r(inter, hidden), r(inter) if bias else None,
            r(hidden, inter), r(hidden) if bias else None)


@given(hidden=st.integers(1, 12), inter=st.integers(1, 24), tokens=st.integers(1, 6), act=st.sampled_from(ACTS),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_threshold_zero_is_the_dense_mlp_and_infinity_leaves_the_bias(hidden, inter, tokens, act, bias, seed):
    wg, bg, wu, bu, wd, bd = mlp_weights(hidden, inter, seed, bias)
    x = torch.randn(tokens, hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    f = torch.nn.functional
    dense = f.linear(ACTIVATIONS[act](f.linear(x, wg, bg)) * f.linear(x, wu, bu), wd, bd)
    torch.testing.assert_close(torch.ops.sparsecc.cats_mlp(x, wg, bg, wu, bu, wd, bd, 0.0, act), dense)
    off = torch.ops.sparsecc.cats_mlp(x, wg, bg, wu, bu, wd, bd, float("inf"), act)
    torch.testing.assert_close(off, (bd if bias else torch.zeros(hidden, dtype=x.dtype)).expand_as(off))


@given(t=st.floats(0.0, 2.0), seed=st.integers(0, 2**16))
def test_exactly_the_neurons_below_threshold_are_dropped(t, seed):
    """The output equals the dense MLP restricted to the neurons with |act(x W_gate)| >= t."""
    wg, _, wu, _, wd, _ = mlp_weights(6, 16, seed)
    x = torch.randn(1, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    v = torch.nn.functional.silu(x @ wg.t())[0]
    keep = v.abs() >= t
    expect = (v[keep] * (x @ wu.t())[0, keep]) @ wd[:, keep].t()
    torch.testing.assert_close(cats_mlp_reference(x, wg, None, wu, None, wd, None, t, "silu")[0], expect)


@pytest.mark.parametrize("act", ACTS)
def test_op_registration_and_gradients(act):
    wg, bg, wu, bu, wd, bd = (w.requires_grad_() for w in mlp_weights(5, 12, 0, bias=True))
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.sparsecc.cats_mlp.default, (x, wg, bg, wu, bu, wd, bd, 0.3, act))
    torch.library.opcheck(torch.ops.sparsecc.cats_mlp.default, (x, wg, None, wu, None, wd, None, 0.3, act))
    torch.autograd.gradcheck(lambda *a: torch.ops.sparsecc.cats_mlp(*a, 0.3, act), (x, wg, bg, wu, bu, wd, bd))


def batches_for(model, seed, n=8, seqlen=16):
    ids = torch.randint(0, model.config.vocab_size, (4096,), generator=torch.Generator().manual_seed(seed))
    return sparsecc.sample_batches(ids, n, seqlen, seed=seed, batch_size=4)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_sparsify_gates_every_mlp_and_hits_the_target(family, make_model):
    model = make_model(family)
    calib, held = batches_for(model, 0, n=16), batches_for(model, 1, n=16)
    keys = set(model.state_dict())
    x = torch.randint(0, model.config.vocab_size, (1, 12))
    report = sparsecc.sparsify_(model, {"re:.*mlp": sparsecc.CATSConfig(0.7)}, calib, progress=False)
    gated = [m for m in model.modules() if isinstance(m, sparsecc.CATSMLP)]
    assert len(gated) == 2 and len(report.rows) == 2 and all(r["threshold"] > 0 for r in report.rows)
    assert set(model.state_dict()) == keys  # same parameter names: checkpoints stay compatible
    on_calib = sparsecc.activation_sparsity(model, calib)
    assert all(abs(s - 0.7) < 0.01 for s in on_calib.values()), on_calib
    on_held = sparsecc.activation_sparsity(model, held)
    assert all(abs(s - 0.7) < 0.05 for s in on_held.values()), on_held  # random tokens: a looser bound
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="sparsecc")(x).logits, model(x).logits,
                                   rtol=1e-4, atol=1e-4)


def test_cats_composes_with_nm_pruning_and_compression(make_model):
    model = make_model("llama")
    recipe = {"default": sparsecc.WandaConfig(pattern="2:4"), "lm_head": None, "re:.*mlp": sparsecc.CATSConfig(0.5)}
    report = sparsecc.sparsify_(model, recipe, batches_for(model, 0), progress=False)
    assert len(report.rows) == 14 + 2 and report.sparsity == pytest.approx(0.5)
    x = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        before = model(x).logits
        assert len(sparsecc.compress_nm_(model, "2:4")) == 14  # the MLP linears inside CATSMLP too
        torch.testing.assert_close(model(x).logits, before, rtol=1e-5, atol=1e-5)


def test_a_failure_after_pruning_leaves_the_model_as_it_was(make_model, monkeypatch):
    from sparsecc.techniques import cats
    model = make_model("llama")
    state = copy.deepcopy(model.state_dict())
    real, calls = cats.CATSTechnique.apply, []

    def apply_then_fail(self, *a, **k):
        row = real(self, *a, **k)  # swaps the MLP (and the weights were already pruned) ...
        calls.append(row)
        if len(calls) == 2:
            raise KeyboardInterrupt  # ... then, in the second block, the user presses Ctrl-C
        return row

    monkeypatch.setattr(cats.CATSTechnique, "apply", apply_then_fail)
    with pytest.raises(KeyboardInterrupt):
        sparsecc.sparsify_(model, {"default": sparsecc.MagnitudeConfig(0.5), "re:.*mlp": sparsecc.CATSConfig(0.5)},
                           batches_for(model, 0), progress=False)
    assert not any(isinstance(m, sparsecc.CATSMLP) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_checkpoint_round_trip_regates(make_model, tmp_path):
    model = make_model("llama")
    report = sparsecc.sparsify_(model, {"re:.*mlp": sparsecc.CATSConfig(0.6), "lm_head": None,
                                        "re:.*self_attn.*": sparsecc.MagnitudeConfig(0.5)},
                                batches_for(model, 0), progress=False)
    sparsecc.save_pruned(model, tmp_path / "ck", report)
    loaded, meta = sparsecc.load_pruned(tmp_path / "ck")
    mlps = [m for m in loaded.modules() if isinstance(m, sparsecc.CATSMLP)]
    assert [m.threshold for m in mlps] == [r["threshold"] for r in report.rows if "threshold" in r]
    x = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)


@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_ungated_mlps_are_refused(family, make_model):
    model = make_model(family)
    with pytest.raises(sparsecc.RecipeError, match="no gated MLP"):
        sparsecc.sparsify_(model, {"default": sparsecc.CATSConfig(0.5)}, batches_for(model, 0), progress=False)


def test_a_second_rewrite_names_the_first(make_model, state_tools):
    """A gated MLP rewritten once is no gated MLP any more: say so, not "the model has none"."""
    snapshot, same_state = state_tools
    model = make_model("llama")
    calib = batches_for(model, 0)
    sparsecc.sparsify_(model, {"model.layers.0.mlp": sparsecc.CATSConfig(0.5)}, calib, progress=False)
    snap = snapshot(model)
    for recipe in ({"model.layers.0.mlp": sparsecc.CATSConfig(0.5)}, {"re:.*mlp": sparsecc.MoEConfig(4, 2)}):
        with pytest.raises(sparsecc.RecipeError, match=r"model.layers.0.mlp is already rewritten by CATSConfig; "
                                                       r".*one recipe"):
            sparsecc.sparsify_(model, recipe, calib, progress=False)
        assert same_state(model, snap)
    sparsecc.sparsify_(model, {"model.layers.1.mlp": sparsecc.CATSConfig(0.5)}, calib, progress=False)
    with pytest.raises(sparsecc.RecipeError, match="model.layers.0.mlp is already rewritten by CATSConfig"):
        sparsecc.sparsify_(model, {"default": sparsecc.CATSConfig(0.5)}, calib, progress=False)


def test_bad_configs_and_entry_points(make_model):
    with pytest.raises(sparsecc.RecipeError, match="sparsity"):
        sparsecc.CATSConfig(sparsity=1.0)
    model = make_model("llama")
    with pytest.raises(sparsecc.RecipeError, match="matches no gated_mlp module"):
        sparsecc.sparsify_(model, {"re:.*attn": sparsecc.CATSConfig(0.5)}, batches_for(model, 0), progress=False)
    with pytest.raises(sparsecc.RecipeError, match="needs calibration data"):
        sparsecc.backend.BackendOptions.parse({"recipe": {"default": sparsecc.CATSConfig(0.5)}})
    with pytest.raises(sparsecc.RecipeError, match="no CATSMLP modules"):
        sparsecc.activation_sparsity(model, batches_for(model, 0))
    assert sparsecc.load_recipe({"re:.*mlp": {"method": "cats", "sparsity": 0.7}}) == {
        "re:.*mlp": sparsecc.CATSConfig(0.7)}
