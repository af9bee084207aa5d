"""Pipeline: ordering by requires/produces, errors naming passes, debug checks, rollback, and
the properties: analysis leaves parameters bit-identical, independent passes commute, and
streamed statistics equal statistics over the concatenated batches."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparsecc
from sparsecc.passes import ApplyRecipe, CollectHessians, CollectInputStats, Pipeline, TransformPass


class Fake(TransformPass):
    def __init__(self, name, requires=(), produces=()):
        self.name, self.requires, self.produces = name, tuple(requires), tuple(produces)

    def run(self, ctx, sites):
        return False


class Poison(TransformPass):
    """A broken pass: writes NaN into the first weight it sees."""
    name = "poison"
    produces = ("poison",)

    def run(self, ctx, sites):
        if sites:
            ctx.save_original(sites[0])
            sites[0].weight(ctx.model)[0, 0] = float("nan")
        return True


def test_orders_by_requirements():
    a, b, c = Fake("a", requires=["x"]), Fake("b", produces=["x"], requires=["y"]), Fake("c", produces=["y"])
    assert [p.name for p in Pipeline([a, b, c]).order] == ["c", "b", "a"]


def test_missing_producer_names_pass_and_fix():
    with pytest.raises(sparsecc.PipelineError, match="'prune' needs 'hessian'.*CollectHessians"):
        Pipeline([Fake("prune", requires=["hessian"])])


def test_cycle_names_both_passes():
    with pytest.raises(sparsecc.PipelineError, match="'a' and 'b' depend on each other|'b' and 'a' depend on each other"):
        Pipeline([Fake("a", requires=["x"], produces=["y"]), Fake("b", requires=["y"], produces=["x"])])


def test_two_producers_rejected():
    with pytest.raises(sparsecc.PipelineError, match="both produce 'x'"):
        Pipeline([Fake("a", produces=["x"]), Fake("b", produces=["x"])])


def test_analysis_only_leaves_parameters_bit_identical(make_model, batches, state_tools):
    snapshot, same = state_tools
    m = make_model("llama")
    snap = snapshot(m)
    res = Pipeline([CollectInputStats(), CollectHessians()], progress=False).run(m, batches)
    assert same(m, snap)
    assert set(res.stats["hessian"]) == set(res.sites)
    assert res.scopes == ["model.layers.0", "model.layers.1", "rest"]
    assert res.timings["collect_hessians"] > 0 and "collect_hessians" in res.summary()


def test_result_saves_and_reloads_stats(make_model, batches, tmp_path):
    res = Pipeline([CollectInputStats(), CollectHessians()], progress=False).run(make_model("llama"), batches)
    plan = sparsecc.Plan.load(sparsecc.Plan.from_result(res, {}).save(tmp_path / "stats"))
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(plan.stats["hessian"][name].xtx, res.stats["hessian"][name].xtx)
    assert torch.equal(plan.stats["input_stats"][name].l2, res.stats["input_stats"][name].l2)
    assert plan.stats["input_stats"][name].count == 96 and plan.setup == res.setup | {"shapes": [[2, 16]]}


@given(order=st.permutations([0, 1]))
def test_independent_passes_commute(order):
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM
    m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1)).eval()
    bs = [torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    passes = [CollectInputStats(), CollectHessians()]
    recipe = ApplyRecipe({"model.layers.0.mlp.up_proj": sparsecc.MagnitudeConfig(0.5)})
    res = Pipeline([passes[i] for i in order] + [recipe], progress=False).run(m, bs)
    ref = test_independent_passes_commute.reference = getattr(test_independent_passes_commute, "reference", res)
    for name, h in res.stats["hessian"].items():
        assert torch.equal(h.xtx, ref.stats["hessian"][name].xtx)
        assert torch.equal(res.stats["input_stats"][name].sumsq, ref.stats["input_stats"][name].sumsq)


@given(splits=st.lists(st.integers(1, 3), min_size=1, max_size=4))
def test_streamed_stats_equal_concatenated(splits):
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    rows = torch.randn(sum(splits), 8)
    chunks = list(rows.split(splits))
    streamed = Pipeline([CollectInputStats(), CollectHessians(dtype=torch.float64)], progress=False).run(lin, chunks)
    whole = Pipeline([CollectInputStats(), CollectHessians(dtype=torch.float64)], progress=False).run(lin, [rows])
    for name in ("0", "2"):
        a, b = streamed.stats["input_stats"][name], whole.stats["input_stats"][name]
        assert a.count == b.count == rows.shape[0]
        torch.testing.assert_close(a.l2, b.l2)
        torch.testing.assert_close(a.mean_abs, b.mean_abs)
        torch.testing.assert_close(a.max_abs, b.max_abs)  # layer 2's input: matmuls of other batch sizes round differently
        torch.testing.assert_close(streamed.stats["hessian"][name].xtx, whole.stats["hessian"][name].xtx,
                                   rtol=1e-5, atol=1e-6)
    x = rows  # the first layer's input is the batch itself: check against the definitions
    torch.testing.assert_close(whole.stats["hessian"]["0"].xtx, x.double().T @ x.double())
    assert torch.equal(streamed.stats["input_stats"]["0"].max_abs, x.abs().amax(0))
    torch.testing.assert_close(whole.stats["input_stats"]["0"].l2, x.norm(dim=0))


def test_debug_check_names_failing_pass_and_restores(make_model, batches, state_tools):
    snapshot, same = state_tools
    m = make_model("llama")
    snap = snapshot(m)
    pipe = Pipeline([CollectInputStats(), Poison()], debug=True, progress=False)
    with pytest.raises(sparsecc.PipelineError, match="after pass 'poison'.*before it: collect_input_stats.*NaN"):
        pipe.run(m, batches)
    assert same(m, snap)


def test_failure_inside_pass_is_annotated_and_rolled_back(make_model, batches, state_tools):
    snapshot, same = state_tools

    class Boom(TransformPass):
        name = "boom"

        def run(self, ctx, sites):
            if ctx.decisions:  # fail in the second block, after the first was pruned
                raise RuntimeError("kaboom")
            return ApplyRecipe({s.name: sparsecc.MagnitudeConfig(0.9) for s in sites}).run(ctx, sites)

    m = make_model("llama")
    snap = snapshot(m)
    with pytest.raises(RuntimeError, match="kaboom") as info:
        Pipeline([CollectInputStats(), Boom()], progress=False).run(m, batches)
    assert any("pass boom failed on model.layers.1" in n for n in info.value.__notes__)
    assert same(m, snap)


def test_block_k_sees_outputs_of_pruned_blocks(make_model, batches):
    """Block 1's statistics must be collected on block 0's *pruned* outputs (SparseGPT/Wanda setup)."""
    m = make_model("llama")
    recipe = ApplyRecipe({"model.layers.0.mlp.down_proj": sparsecc.MagnitudeConfig(0.9)})
    res = Pipeline([CollectHessians(), recipe], progress=False).run(m, batches)
    name = "model.layers.1.self_attn.q_proj"
    x = _inputs_of(m, name, batches)  # block 1's q_proj input, recomputed on the pruned model
    torch.testing.assert_close(res.stats["hessian"][name].xtx.float(), x.T @ x, rtol=1e-4, atol=1e-3)
    xd = _inputs_of(make_model("llama"), name, batches)  # and on the dense model: must differ
    assert not torch.allclose(res.stats["hessian"][name].xtx.float(), xd.T @ xd, rtol=1e-4, atol=1e-3)


def _inputs_of(model, name, batches):
    seen = []
    h = model.get_submodule(name).register_forward_pre_hook(lambda mod, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for b in batches:
            model(b, use_cache=False)
    h.remove()
    return torch.cat(seen)


def test_padding_tokens_are_not_counted(make_model):
    m = make_model("llama")
    ids = torch.randint(0, 128, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    res = Pipeline([CollectInputStats()], progress=False).run(m, [{"input_ids": ids, "attention_mask": mask}])
    assert res.stats["input_stats"]["model.layers.0.self_attn.q_proj"].count == 16


@pytest.mark.parametrize("recipe, bar", [
    ({"re:.*self_attn": sparsecc.AttentionSinkConfig(sinks=1, window=4)}, None),  # data-free: no bar
    ({"re:.*mlp": sparsecc.CATSConfig(0.5)}, "model.layers.1"),  # calibrated block by block
], ids=["attention", "cats"])
def test_a_progress_bar_only_where_blocks_are_calibrated(recipe, bar, make_model, batches, capsys):
    sparsecc.sparsify_(make_model("llama"), recipe, batches, progress=True)
    err = capsys.readouterr().err
    assert (bar in err and "block" in err) if bar else err == "", err


def test_linears_reading_one_input_share_one_hessian(make_model, batches):
    m = make_model("llama")
    res = Pipeline([CollectHessians()], progress=False).run(m, batches)
    h = res.stats["hessian"]
    attn, mlp = "model.layers.0.self_attn.", "model.layers.0.mlp."
    assert h[attn + "q_proj"] is h[attn + "k_proj"] is h[attn + "v_proj"] and h[mlp + "gate_proj"] is h[mlp + "up_proj"]
    assert len({id(v) for v in h.values()}) == 9  # 4 per block and lm_head's, of 15 linears
    x = []  # the H that k_proj would collect alone
    handle = m.get_submodule(attn + "k_proj").register_forward_pre_hook(lambda mod, a: x.append(a[0].reshape(-1, 64)))
    for b in batches:
        m(b)
    handle.remove()
    xs = torch.cat(x).double()
    assert torch.allclose(h[attn + "k_proj"].xtx, xs.t() @ xs, rtol=1e-5, atol=1e-4) and h[attn + "k_proj"].count == xs.shape[0]
    only_k = Pipeline([CollectHessians(modules=[attn + "k_proj"])], progress=False).run(m, batches)
    assert torch.equal(only_k.stats["hessian"][attn + "k_proj"].xtx, h[attn + "k_proj"].xtx)  # collected by k itself


def test_a_plan_stores_shared_hessians_once_per_name(make_model, batches, tmp_path):
    res = Pipeline([CollectHessians()], progress=False).run(make_model("llama"), batches)
    plan = sparsecc.Plan.load(sparsecc.Plan.from_result(res, {}).save(tmp_path / "plan"))
    q, v = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
    assert torch.equal(plan.stats["hessian"][q].xtx, plan.stats["hessian"][v].xtx)
