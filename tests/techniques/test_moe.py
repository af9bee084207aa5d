"""MoEfication: the moe_ffn op (routing, capacity, modes, registration, gradients), the balanced
split, the sparsify_ rewrite (fitted and data-free routers), load balance, restore, bad input;
Mixtral's sparse MoE blocks lowered to the same op."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import sparsecc
from sparsecc.codegen.moe_ffn import route
from sparsecc.codegen.cats_mlp import ACTIVATIONS
from sparsecc.techniques import moe
from sparsecc.techniques.moe import MoEConfig, MoEMLP, moe_load_balance, split_experts

ACTS = sorted(ACTIVATIONS)
f64 = torch.float64


def dense_weights(hidden, inter, seed, bias=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=f64)  # noqa: E731
    return (r(inter, hidden), r(inter) if bias else None, r(inter, hidden), r(inter) if bias else None,
            r(hidden, inter), r(hidden) if bias else None)


def as_experts(dense, neurons):
    """The dense MLP's weights stacked per expert (expert e holds the neurons `neurons[e]`)."""
    wg, bg, wu, bu, wd, bd = dense
    (e, m), flat = neurons.shape, neurons.reshape(-1)
    stack = lambda w: None if w is None else w[flat].view(e, m, *w.shape[1:])  # noqa: E731
    return stack(wg), stack(bg), stack(wu), stack(bu), wd[:, flat].view(-1, e, m).transpose(0, 1), bd


def dense_mlp(x, dense, act):
    wg, bg, wu, bu, wd, bd = dense
    return F.linear(ACTIVATIONS[act](F.linear(x, wg, bg)) * F.linear(x, wu, bu), wd, bd)


def expert(x, experts, e, act):
    """Expert e's own output (no shared b_down)."""
    wg, bg, wu, bu, wd, _ = experts
    pick = lambda b: None if b is None else b[e]  # noqa: E731
    return F.linear(ACTIVATIONS[act](F.linear(x, wg[e], pick(bg))) * F.linear(x, wu[e], pick(bu)), wd[e])


def moe_op(x, router, experts, k, cf, act, mode="sum"):
    wg, bg, wu, bu, wd, bd = experts
    return torch.ops.sparsecc.moe_ffn(x, router[0], router[1], wg, bg, wu, bu, wd, bd, k, cf, act, mode)


def random_split(inter, e, seed):
    return torch.randperm(inter, generator=torch.Generator().manual_seed(seed)).view(e, inter // e)


def random_router(e, hidden, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(e, hidden, generator=g, dtype=dtype), torch.randn(e, generator=g, dtype=dtype)


shapes = dict(e=st.integers(1, 5), m=st.integers(1, 4), hidden=st.integers(1, 8), tokens=st.integers(0, 9),
              act=st.sampled_from(ACTS), bias=st.booleans(), seed=st.integers(0, 2**16))


@given(**shapes)
def test_all_experts_is_the_dense_mlp(e, m, hidden, tokens, act, bias, seed):
    """k = E (E = 1, k = 1 included) reproduces the dense MLP: the experts partition its neurons."""
    dense = dense_weights(hidden, e * m, seed, bias)
    experts = as_experts(dense, random_split(e * m, e, seed))
    x = torch.randn(2, tokens, hidden, dtype=f64, generator=torch.Generator().manual_seed(seed + 1))
    y = moe_op(x, random_router(e, hidden, seed), experts, e, 0.0, act)
    torch.testing.assert_close(y, dense_mlp(x, dense, act))
    # and the experts' outputs one by one add up to it
    total = sum(expert(x, experts, i, act) for i in range(e)) + (experts[5] if bias else 0)
    torch.testing.assert_close(total, dense_mlp(x, dense, act))


@given(**shapes, k=st.integers(1, 5), cf=st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.25]),
       mode=st.sampled_from(["sum", "softmax_topk"]))
def test_each_token_gets_exactly_its_kept_experts(e, m, hidden, tokens, act, bias, seed, k, cf, mode):
    """Per token, brute force: the top-k experts by router logit, each kept while its capacity
    ceil(cf·T·k/E) is not used up by earlier tokens (token order), weighted 1 or by softmax."""
    k = min(k, e)
    experts = as_experts(dense_weights(hidden, e * m, seed, bias), random_split(e * m, e, seed))
    router = random_router(e, hidden, seed + 2, f64)
    x = torch.randn(tokens, hidden, dtype=f64, generator=torch.Generator().manual_seed(seed + 1))
    cap = math.ceil(cf * tokens * k / e) if cf > 0 else tokens * k
    used = [0] * e
    expect = torch.zeros(tokens, hidden, dtype=f64)
    for t in range(tokens):
        logits = router[0] @ x[t] + router[1]
        top = sorted(range(e), key=lambda i: -logits[i])[:k]
        w = torch.softmax(logits[top], 0) if mode == "softmax_topk" else torch.ones(k, dtype=f64)
        for j, i in enumerate(top):
            if used[i] < cap:
                expect[t] += w[j] * expert(x[t:t + 1], experts, i, act)[0]
            used[i] += 1
    if bias:
        expect += experts[5]
    torch.testing.assert_close(moe_op(x, router, experts, k, cf, act, mode), expect)
    r = route(x, *router, k, cf, mode)
    assert int((~r.keep).sum()) == sum(max(u - cap, 0) for u in used)


def test_capacity_drops_the_later_tokens():
    """4 tokens all preferring expert 0, capacity ceil(1.0·4·1/2) = 2: tokens 2 and 3 get nothing."""
    experts = as_experts(dense_weights(3, 4, 0), random_split(4, 2, 0))
    router = (torch.zeros(2, 3, dtype=f64), torch.tensor([1.0, 0.0], dtype=f64))
    x = torch.randn(4, 3, dtype=f64)
    y = moe_op(x, router, experts, 1, 1.0, "silu")
    torch.testing.assert_close(y[:2], expert(x[:2], experts, 0, "silu"))
    assert torch.equal(y[2:], torch.zeros(2, 3, dtype=f64))
    torch.testing.assert_close(moe_op(x, router, experts, 1, 0.0, "silu"), expert(x, experts, 0, "silu"))


@pytest.mark.parametrize("mode", ["sum", "softmax_topk"])
@pytest.mark.parametrize("bias", [True, False])
def test_op_registration_and_gradients(mode, bias):
    experts = [w.requires_grad_() if w is not None else None
               for w in as_experts(dense_weights(5, 12, 0, bias), random_split(12, 4, 0))]
    router = [w.requires_grad_() for w in random_router(4, 5, 1, f64)]
    x = torch.randn(2, 3, 5, dtype=f64, requires_grad=True)
    args = (x, router[0], router[1], experts[0], experts[1], experts[2], experts[3], experts[4], experts[5], 2,
            0.5 if bias else 0.0, "silu", mode)
    torch.library.opcheck(torch.ops.sparsecc.moe_ffn.default, args)
    leaves = [t for t in args[:9] if t is not None]
    torch.autograd.gradcheck(lambda *a: torch.ops.sparsecc.moe_ffn(*_fill(args, a)), leaves)


def _fill(args, leaves):
    it = iter(leaves)
    return tuple(next(it) if i < 9 and a is not None else a for i, a in enumerate(args))


@given(e=st.sampled_from([1, 2, 4, 8]), seed=st.integers(0, 2**16))
def test_split_is_a_balanced_deterministic_partition(e, seed):
    wg, _, wu, _, _, _ = dense_weights(6, 32, seed)
    neurons = split_experts(wg, wu, e)
    assert neurons.shape == (e, 32 // e)
    assert torch.equal(neurons.flatten().sort().values, torch.arange(32))
    assert torch.equal(neurons, split_experts(wg, wu, e))


def test_split_recovers_planted_clusters():
    """Neurons drawn around 4 well-separated directions come out as those 4 groups."""
    g = torch.Generator().manual_seed(0)
    centers = torch.linalg.qr(torch.randn(16, 4, generator=g))[0].t() * 10  # [4, 16] orthogonal
    label = torch.randperm(32, generator=g) % 4
    w = centers[label] + 0.3 * torch.randn(32, 16, generator=g)
    neurons = split_experts(w[:, :8], w[:, 8:], 4)
    assert all(len(set(label[n].tolist())) == 1 for n in neurons)


def batches_for(model, seed, n=8, seqlen=16):
    ids = torch.randint(0, model.config.vocab_size, (4096,), generator=torch.Generator().manual_seed(seed))
    return sparsecc.sample_batches(ids, n, seqlen, seed=seed, batch_size=4)


def test_sparsify_makes_moe_mlps_that_run(make_model):
    model = make_model("llama")
    calib = batches_for(model, 0)
    report = sparsecc.sparsify_(model, {"re:.*mlp": MoEConfig(4, 2)}, calib, progress=False)
    mlps = [m for m in model.modules() if isinstance(m, MoEMLP)]
    assert len(mlps) == 2 and len(report.rows) == 2
    assert all(m.w_gate.shape == (4, 32, 64) and m.w_down.shape == (4, 64, 32) for m in mlps)
    assert all(m.router_weight.dtype == torch.float32 for m in mlps)  # selective precision
    row = report.rows[0]
    assert row["active_neurons"] == 0.5 and row["experts"] == 4 and row["top_k"] == 2 and row["param"] is None
    assert all(0 < r["router_r2"] <= 1 for r in report.rows)
    x = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        assert torch.isfinite(model(x).logits).all()
    balance = moe_load_balance(model, calib)
    for stats in balance.values():
        assert sum(stats["f"]) == pytest.approx(1) and sum(stats["P"]) == pytest.approx(1)
        assert stats["aux_loss"] >= 1 - 1e-6 and stats["dropped"] == 0 and stats["tokens"] == 8 * 16
    assert "MoE" in str(report)


def test_all_experts_via_sparsify_keeps_the_logits(make_model):
    model = make_model("mistral")
    x = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        before = model(x).logits
    sparsecc.sparsify_(model, {"re:.*mlp": MoEConfig(4, 4)}, batches_for(model, 0), progress=False)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=1e-5, atol=1e-5)
    assert all(s["aux_loss"] == pytest.approx(1) for s in moe_load_balance(model, batches_for(model, 1)).values())


def test_fitted_router_beats_centroid_and_capacity_drops(make_model):
    """On the tiny random model: the fitted router keeps the logits closer than the data-free one
    at the same k, and capacity_factor 1.0 with top-1 routing drops some assignments."""
    model = make_model("llama")
    calib = batches_for(model, 0, n=16)
    x = torch.randint(0, 128, (4, 16))
    with torch.no_grad():
        dense = model(x).logits
    errs = {}
    for router in ("fitted", "centroid"):
        m = copy.deepcopy(model)
        sparsecc.sparsify_(m, {"re:.*mlp": MoEConfig(4, 2, router=router)}, calib, progress=False)
        with torch.no_grad():
            errs[router] = float((m(x).logits - dense).pow(2).mean())
    assert errs["fitted"] < errs["centroid"], errs
    for mlp in (mlp for mlp in m.modules() if isinstance(mlp, MoEMLP)):
        mlp.top_k, mlp.capacity_factor = 1, 1.0
    balance = moe_load_balance(m, calib)
    assert all(0 < s["dropped"] < 0.5 for s in balance.values()), balance


def test_centroid_router_is_data_free(make_model):
    model = make_model("llama")
    with pytest.raises(sparsecc.CalibrationError, match="needs calibration data"):
        sparsecc.sparsify_(model, {"re:.*mlp": MoEConfig(4, 2)}, progress=False)
    report = sparsecc.sparsify_(model, {"re:.*mlp": MoEConfig(4, 2, router="centroid")}, progress=False)
    assert [r["router_r2"] for r in report.rows] == [None, None]
    assert sum(isinstance(m, MoEMLP) for m in model.modules()) == 2


def test_composes_with_weight_pruning(make_model):
    model = make_model("llama")
    recipe = {"default": sparsecc.MagnitudeConfig(0.5), "lm_head": None, "re:.*mlp": MoEConfig(4, 2)}
    report = sparsecc.sparsify_(model, recipe, batches_for(model, 0), progress=False)
    assert len(report.rows) == 14 + 2 and report.sparsity == pytest.approx(0.5)
    for m in (m for m in model.modules() if isinstance(m, MoEMLP)):  # the experts hold the pruned weights
        assert float((m.w_gate == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
        assert float((m.w_down == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 128, (1, 9))).logits).all()


def test_a_failure_after_the_first_swap_leaves_the_model_as_it_was(make_model, monkeypatch):
    model = make_model("llama")
    state = copy.deepcopy(model.state_dict())
    real, calls = moe.MoETechnique.apply, []

    def apply_then_fail(self, *a, **k):
        if calls:
            raise KeyboardInterrupt  # the user presses Ctrl-C after the first MLP was swapped
        calls.append(real(self, *a, **k))
        return calls[-1]

    monkeypatch.setattr(moe.MoETechnique, "apply", apply_then_fail)
    with pytest.raises(KeyboardInterrupt):
        sparsecc.sparsify_(model, {"default": sparsecc.MagnitudeConfig(0.5), "re:.*mlp": MoEConfig(4, 2)},
                           batches_for(model, 0), progress=False)
    assert len(calls) == 1
    assert not any(isinstance(m, MoEMLP) for m in model.modules())
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_restore_rebuilds_modules_a_state_dict_loads_into(make_model):
    model = make_model("llama")
    report = sparsecc.sparsify_(model, {"re:.*mlp": MoEConfig(4, 2, capacity_factor=1.25)}, batches_for(model, 0),
                                progress=False)
    fresh = make_model("llama", seed=1)
    assert sparsecc.techniques.rewrites.restore_rewrites(fresh, report.rows) == [r["module"] for r in report.rows]
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, model(x).logits)
    assert fresh.model.layers[0].mlp.capacity_factor == 1.25
    with pytest.raises(sparsecc.PlanError, match="no such module"):
        moe.restore_moe(make_model("llama"), [{**report.rows[0], "module": "model.nope"}])


def test_checkpoint_round_trip_keeps_the_experts(make_model, tmp_path):
    model = make_model("llama")
    report = sparsecc.sparsify_(model, {"re:.*mlp": MoEConfig(4, 2), "re:.*self_attn.*": sparsecc.MagnitudeConfig(0.5)},
                                batches_for(model, 0), progress=False)
    sparsecc.save_pruned(model, tmp_path / "ck", report)
    loaded, _ = sparsecc.load_pruned(tmp_path / "ck")
    assert isinstance(loaded.model.layers[1].mlp, MoEMLP)
    x = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)


def test_compiled_moe_model_matches_eager(make_model):
    model = make_model("llama")
    sparsecc.sparsify_(model, {"re:.*mlp": MoEConfig(4, 2)}, batches_for(model, 0), progress=False)
    x = torch.randint(0, 128, (1, 7))
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="sparsecc")(x).logits, model(x).logits,
                                   rtol=1e-4, atol=1e-4)


def test_bad_configs_and_models(make_model):
    with pytest.raises(sparsecc.RecipeError, match="top_k=5 > num_experts=4; choose top_k <= 4"):
        MoEConfig(4, 5)
    for cf in (0, -1.0, float("inf")):
        with pytest.raises(sparsecc.RecipeError, match="capacity_factor"):
            MoEConfig(4, 2, capacity_factor=cf)
    for bad in (dict(num_experts=0), dict(top_k=0), dict(num_experts=2.0), dict(router="learned")):
        with pytest.raises(sparsecc.RecipeError):
            MoEConfig(**bad)
    model = make_model("llama")
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(sparsecc.RecipeError, match=r"model.layers.0.mlp: intermediate size 128 .* num_experts=3"):
        sparsecc.sparsify_(model, {"re:.*mlp": MoEConfig(3, 1)}, batches_for(model, 0), progress=False)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(sparsecc.RecipeError, match="no gated MLP"):
        opt = make_model("opt")
        sparsecc.sparsify_(opt, {"default": MoEConfig(4, 2)}, batches_for(opt, 0), progress=False)
    with pytest.raises(sparsecc.RecipeError, match="no MoEMLP modules"):
        moe_load_balance(model, batches_for(model, 0))
    with pytest.raises(sparsecc.RecipeError, match="needs calibration data"):
        sparsecc.backend.BackendOptions.parse({"recipe": {"default": MoEConfig(4, 2)}})
    assert sparsecc.load_recipe({"re:.*mlp": {"method": "moe", "num_experts": 4, "top_k": 2}}) == {
        "re:.*mlp": MoEConfig(4, 2)}
    assert sparsecc.config_from_dict(MoEConfig(8, 1, 1.25, "centroid").to_dict()) == MoEConfig(8, 1, 1.25, "centroid")


def test_mixtral_blocks_lower_to_the_op_unchanged(make_model):
    model = make_model("mixtral")
    x = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        before = model(x).logits
    report = sparsecc.sparsify_(model, {"re:.*mlp": moe.SparseMoEConfig()}, progress=False)  # data-free
    mlps = [m for m in model.modules() if isinstance(m, MoEMLP)]
    assert len(mlps) == 2 and all(m.mode == "softmax_topk" and m.top_k == 2 for m in mlps)
    assert [r["active_neurons"] for r in report.rows] == [0.5, 0.5]
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=1e-5, atol=1e-5)
    fresh = make_model("mixtral", seed=1)
    sparsecc.techniques.rewrites.restore_rewrites(fresh, report.rows)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, before, rtol=1e-5, atol=1e-5)
    for mlp in mlps:
        mlp.capacity_factor = 0.5  # Switch capacity on a model that had none: assignments dropped
    assert all(s["dropped"] > 0 for s in moe_load_balance(model, [x]).values())


def test_a_second_rewrite_names_the_first(make_model):
    model = make_model("llama")
    report = sparsecc.sparsify_(model, {"re:.*mlp": MoEConfig(4, 2)}, batches_for(model, 0), progress=False)
    with pytest.raises(sparsecc.RecipeError, match="model.layers.0.mlp is already rewritten by MoEConfig"):
        sparsecc.sparsify_(model, {"re:.*mlp": MoEConfig(4, 2)}, batches_for(model, 0), progress=False)
    fresh = make_model("llama")
    sparsecc.techniques.rewrites.restore_rewrites(fresh, report.rows)  # as load_pruned does
    with pytest.raises(sparsecc.RecipeError, match="model.layers.0.mlp is already rewritten by MoEConfig"):
        sparsecc.sparsify_(fresh, {"re:.*mlp": sparsecc.CATSConfig(0.5)}, batches_for(model, 0), progress=False)
    mixtral = make_model("mixtral")
    sparsecc.sparsify_(mixtral, {"re:.*mlp": moe.SparseMoEConfig()}, progress=False)
    with pytest.raises(sparsecc.RecipeError, match="model.layers.0.mlp is already rewritten by SparseMoEConfig"):
        sparsecc.sparsify_(mixtral, {"re:.*mlp": moe.SparseMoEConfig()}, progress=False)


def test_sparse_moe_refuses_what_it_cannot_lower(make_model, monkeypatch):
    llama = make_model("llama")
    with pytest.raises(sparsecc.RecipeError, match="no sparse MoE block"):
        sparsecc.sparsify_(llama, {"default": moe.SparseMoEConfig()}, progress=False)
    model = make_model("mixtral")
    router = type(model.model.layers[0].mlp.gate)

    def without_renormalising(self, h):  # top-k of the softmax over all experts, as Qwen-MoE without norm_topk_prob
        logits = F.linear(h.reshape(-1, self.hidden_dim), self.weight)
        top, index = logits.float().softmax(-1).topk(self.top_k, dim=-1)
        return logits, top, index

    monkeypatch.setattr(router, "forward", without_renormalising)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(sparsecc.RecipeError, match="model.layers.0.mlp: .* cannot lower it"):
        sparsecc.sparsify_(model, {"re:.*mlp": moe.SparseMoEConfig()}, progress=False)
    assert not any(isinstance(m, MoEMLP) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(sparsecc.RecipeError, match="capacity_factor"):
        moe.SparseMoEConfig(capacity_factor=0)
