"""Every statistic is collected block by block on the outputs of the already-transformed blocks,
and a Plan covers every technique: calibrate -> save -> load -> sparsify_(plan) equals
sparsify_(recipe, batches)."""
import copy

import pytest
import torch

import sparsecc
from sparsecc.codegen.cats_mlp import ACTIVATIONS

MIXED = {"re:.*self_attn": sparsecc.AttentionSinkConfig(sinks=2, window=6),
         "re:.*mlp": sparsecc.CATSConfig(0.5),
         "re:.*layers\\.\\d+\\.(mlp|self_attn)\\..*": sparsecc.SparseGPTConfig(pattern="2:4"),
         "lm_head": None}


def _thresholds(model):
    return {n: m.threshold for n, m in model.named_modules() if isinstance(m, sparsecc.CATSMLP)}


def test_a_plan_of_sparsegpt_cats_and_sinks_replays_the_recipe(make_model, batches, tmp_path, state_tools):
    snapshot, same = state_tools
    model = make_model("llama")
    snap = snapshot(model)
    plan = sparsecc.calibrate(model, batches, MIXED, progress=False)
    assert same(model, snap) and not _thresholds(model) and model.config._attn_implementation == "sdpa"
    assert not any(m._forward_pre_hooks for m in model.modules())  # no rolling-cache or padding hook left
    kinds = {type(c).__name__ for c in plan.configs.values()}
    assert kinds == {"AttentionSinkConfig", "CATSConfig", "SparseGPTConfig"}
    loaded = sparsecc.Plan.load(plan.save(tmp_path / "plan"))
    assert list(loaded.decisions) == list(plan.decisions)  # the order the decisions were made

    replayed, reference = copy.deepcopy(model), copy.deepcopy(model)
    report = sparsecc.sparsify_(replayed, loaded)
    sparsecc.sparsify_(reference, MIXED, batches, progress=False)
    assert _thresholds(replayed) == _thresholds(reference) and len(_thresholds(reference)) == 2
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(replayed(ids).logits, reference(ids).logits, rtol=0, atol=0)
        assert not torch.allclose(replayed(ids).logits, model(ids).logits)
    assert {r["technique"] for r in report.rows} == kinds
    # a replayed model streams like the reference: the rolling cache keeps sinks + window - 1 (+ the new token)
    cache = replayed(ids, use_cache=True).past_key_values
    assert sparsecc.kv_cache_lengths(cache) == [2 + 6 - 1] * 2


def test_a_cats_threshold_of_block_1_depends_on_the_pruning_of_block_0(make_model, batches):
    model = make_model("llama")
    cats = {"re:.*mlp": sparsecc.CATSConfig(0.5)}
    prune0 = {"re:.*layers\\.0\\.self_attn\\..*": sparsecc.MagnitudeConfig(0.8), **cats}
    alone = sparsecc.calibrate(model, batches, cats, progress=False)
    pruned = sparsecc.calibrate(model, batches, prune0, progress=False)
    t = lambda plan, k: float(plan.decisions[f"model.layers.{k}.mlp"]["threshold"])  # noqa: E731
    assert t(pruned, 1) != t(alone, 1)

    # the threshold of block 1 is the median of |act(gate(x))| on the outputs of block 0 after its
    # pruning *and* its CATS gating with its own threshold
    ref = copy.deepcopy(model)
    sparsecc.sparsify_(ref, {"re:.*layers\\.0\\.self_attn\\..*": sparsecc.MagnitudeConfig(0.8)}, progress=False)
    mlp0 = ref.model.layers[0].mlp
    spec = sparsecc.capture(model, batches[0]).gated["model.layers.0.mlp"]
    ref.model.layers[0].mlp = sparsecc.CATSMLP(mlp0, spec, t(pruned, 0))
    seen = []
    ref.model.layers[1].mlp.gate_proj.register_forward_hook(
        lambda m, a, out: seen.append(ACTIVATIONS["silu"](out).abs().flatten()))
    with torch.no_grad():
        for b in batches:
            ref(b)
    v = torch.sort(torch.cat(seen)).values
    assert t(pruned, 1) == pytest.approx(float(v[int(0.5 * v.numel())]), rel=1e-6)


def test_a_plan_of_moe_splits_and_fitted_routers_replays_the_recipe(make_model, batches, tmp_path):
    model = make_model("llama")
    recipe = {"re:.*mlp\\..*": sparsecc.WandaConfig(0.5), "re:.*mlp": sparsecc.MoEConfig(4, 2), "lm_head": None}
    plan = sparsecc.Plan.load(sparsecc.calibrate(model, batches, recipe, progress=False).save(tmp_path / "p"))
    decision = plan.decisions["model.layers.1.mlp"]
    assert decision["neurons"].shape == (4, 32) and decision["router_weight"].shape == (4, 64)
    replayed, reference = copy.deepcopy(model), copy.deepcopy(model)
    sparsecc.sparsify_(replayed, plan)
    sparsecc.sparsify_(reference, recipe, batches, progress=False)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(replayed(ids).logits, reference(ids).logits, rtol=0, atol=0)
    assert sum(isinstance(m, sparsecc.MoEMLP) for m in replayed.modules()) == 2


def test_owl_runs_in_the_same_pipeline_before_any_pruning(make_model, batches):
    model = make_model("llama")
    recipe = {"re:.*layers.*": sparsecc.WandaConfig(0.5, layerwise="owl", owl_lambda=0.2), "lm_head": None}
    plan = sparsecc.calibrate(model, batches, recipe, progress=False)
    per_block = {r["module"].split(".")[2]: r["config"]["sparsity"] for r in plan.rows}
    assert len(set(per_block.values())) == 2 and sum(per_block.values()) / 2 == pytest.approx(0.5)
    assert "collect_outlier_ratios" in plan.meta["timings"]
    replayed = copy.deepcopy(model)
    sparsecc.sparsify_(replayed, plan)
    reference = copy.deepcopy(model)
    sparsecc.sparsify_(reference, recipe, batches, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(replayed.state_dict().values(), reference.state_dict().values()))


def test_a_blocks_hessians_go_one_by_one_as_its_linears_are_solved(make_model, batches, monkeypatch):
    """sparsify_ keeps nothing of a finished block: each linear's Hessian is compacted to the fp32
    matrix its solve takes before the solve, and dropped once the linear is rewritten; a decision
    keeps no copy of the new weight. A hand-built Pipeline (keep=None) keeps every fp64 Hessian."""
    from sparsecc.passes.pipeline import Pipeline
    from sparsecc.passes.transform.prune import ApplyRecipe
    recipe = {"default": sparsecc.SparseGPTConfig(sparsity=0.5), "lm_head": None}
    run, seen = ApplyRecipe.run, []

    def spy_run(self, ctx, sites):
        names = [s.name for s in sites if s.name in self.targets]
        table = ctx.stats.get("hessian", {})
        before = {n: table[n].scaled for n in names if n in table}
        out = run(self, ctx, sites)
        seen.append((before, [n for n in names if n in ctx.stats.get("hessian", {})],
                     [n for n in names if "weight" in ctx.decisions.get(n, {})]))
        return out

    monkeypatch.setattr(ApplyRecipe, "run", spy_run)
    model = make_model("llama")
    sparsecc.sparsify_(model, recipe, batches, progress=False)
    blocks = [s for s in seen if s[0]]
    assert len(blocks) == model.config.num_hidden_layers
    for before, left, weights in blocks:
        assert not any(before.values())  # fp64 sums until the pass ran
        assert left == [] and weights == []  # each Hessian gone once used, no weight kept twice

    seen.clear()
    model = make_model("llama")
    pipe = Pipeline.from_recipe(model, recipe, batches, progress=False)  # keep=None: everything stays
    result = pipe.run(model, batches)
    hess = result.stats["hessian"]
    assert len(hess) == 7 * model.config.num_hidden_layers
    assert all(not h.scaled and h.xtx.dtype == torch.float64 for h in hess.values())
    assert all("weight" in d for d in result.decisions.values())


def test_the_probe_keeps_no_autograd_graph(make_model, batches):
    """The probe records the first block's inputs under no_grad: they hold no graph back to the
    embeddings (which would keep the embedding weights alive after onloading releases them)."""
    from sparsecc.passes.blockwise import BlockRunner
    from sparsecc.passes.pipeline import PassContext
    model = make_model("llama")
    captured = sparsecc.graph.capture.capture(model, batches[0])
    runner = BlockRunner(PassContext(model, captured, list(batches)))
    assert runner.sequential and runner.hidden
    assert not any(h.requires_grad or h.grad_fn is not None for h in runner.hidden)
