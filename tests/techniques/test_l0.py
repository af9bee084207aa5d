"""L0Config: hard-concrete gates trained toward a target size (passes/analysis/unit_gates.py), then the
units with the lowest learned log_alpha removed for real (techniques/l0.py over structured.py)."""
import copy

import pytest
import torch

import sparsecc
from sparsecc.graph.capture import capture
from sparsecc.io.recipes import dump_recipe, load_recipe
from sparsecc.passes.analysis import PRODUCERS, CollectUnitGates, unit_gates
from sparsecc.passes.pipeline import Pipeline
from sparsecc.techniques import L0Config
from test_structured import check_plan_and_checkpoint

MLPS, ATTN = "re:.*mlp", "re:.*self_attn"


def _gates(model, batches, names=None, **cfg):
    """(the pass, ctx.stats["unit_gates"]) for the gated MLPs and attention modules of `names` (None: all)."""
    cap = capture(model, batches[0])
    config = L0Config(**cfg)
    targets = {n: (config, s) for n, s in {**cap.gated, **cap.heads}.items() if names is None or n in names}
    p = CollectUnitGates(targets)
    res = Pipeline([p], progress=False).run(model, batches, cap, keep_changes=False)
    return p, res.stats["unit_gates"]


def test_registered_and_whole_model():
    assert PRODUCERS["unit_gates"] is CollectUnitGates and CollectUnitGates.whole_model
    tech = sparsecc.techniques.configs.technique_for(L0Config())
    assert tech.needs(L0Config()) == ("unit_gates",)
    assert tech.needs(L0Config(update="refit")) == ("unit_gates", "channel_stats")
    assert L0Config(target=0.3).sparsity == 0.3 and L0Config(0.3) == L0Config(target=0.3)


def test_the_expected_size_reaches_the_target_and_the_model_is_untouched(make_model, batches, state_tools):
    snapshot, same = state_tools
    model = make_model("llama")
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # a frozen weight stays frozen
    snap = snapshot(model)
    p, gates = _gates(model, batches, target=0.25, steps=100)
    assert set(gates) == {"model.layers.0.mlp", "model.layers.1.mlp", "model.layers.0.self_attn",
                          "model.layers.1.self_attn"}
    for name, g in gates.items():
        assert g.dtype == torch.float32 and g.device.type == "cpu" and torch.isfinite(g).all()
        assert g.shape == ((128,) if name.endswith("mlp") else (4,))  # channels; query heads
    # MLPs keep 96 of 128 channels, attention 1 of 2 query heads per group (0.25 of 2 rounds to 1 removed)
    assert p.expected["model.layers.0.mlp"] == pytest.approx(0.75, abs=0.04)
    assert p.expected["model.layers.1.self_attn"] == pytest.approx(0.5, abs=0.08)
    assert p.history[0][1] > 0.2 and p.history[-1][1] < 0.05  # mean |E - T|: from the start to the end
    assert same(model, snap) and not any(m._forward_pre_hooks for m in model.modules())
    assert [q.requires_grad for q in model.parameters()].count(False) == 1
    assert all(q.grad is None for q in model.parameters())


def test_training_is_deterministic_given_the_seed(make_model, batches):
    model = make_model("llama")
    mlp = ["model.layers.1.mlp"]
    a, c = (_gates(model, batches, mlp, steps=10, seed=s)[1]["model.layers.1.mlp"] for s in (3, 4))
    with torch.no_grad():  # the gates train under the caller's no_grad too
        b = _gates(model, batches, mlp, steps=10, seed=3)[1]["model.layers.1.mlp"]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_removes_exactly_the_target_count_with_the_lowest_learned_scores(make_model, batches):
    model = make_model("llama")
    recipe = {MLPS: L0Config(0.25, steps=20), ATTN: L0Config(0.5, steps=20, unit="kv_group")}
    res = Pipeline.from_recipe(model, recipe, batches, progress=False).run(model, batches, keep_changes=False)
    gates, decisions = res.stats["unit_gates"], res.decisions
    keep = decisions["model.layers.1.mlp"]["keep"]
    assert torch.equal(keep, torch.sort(torch.topk(gates["model.layers.1.mlp"], 96).indices).values)
    group = gates["model.layers.0.self_attn"].reshape(2, 2).sum(1)  # a group's log_alpha, split over its heads
    assert group[0] != group[1] and torch.equal(decisions["model.layers.0.self_attn"]["keep_kv"],
                                                group.argmax().reshape(1))
    report = sparsecc.sparsify_(model, recipe, batches, progress=False)
    assert sorted((r["kept"], r["units"]) for r in report.rows) == [(2, 4), (2, 4), (96, 128), (96, 128)]
    for layer in model.model.layers:
        assert layer.mlp.gate_proj.weight.shape == (96, 64) and layer.mlp.down_proj.weight.shape == (64, 96)
        assert layer.self_attn.k_proj.weight.shape == (16, 64) and layer.self_attn.o_proj.weight.shape == (64, 32)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 128, (1, 9))).logits).all()


def test_the_learned_scores_rank_units_by_what_the_loss_needs():
    """On the trained tiny zoo model, removing the half of the MLP channels the gates closed costs far
    less next-token loss (on held-out text) than removing the half they kept open."""
    from sparsecc.graph.calibration import batch_loss
    from sparsecc.zoo import load_model, load_tokens

    model = load_model("tiny")[0]
    tokens = load_tokens()
    batches = sparsecc.sample_batches(tokens.train, 16, 64, seed=0, batch_size=4)
    held = tokens.test[:4 * 64].reshape(4, 64)
    _, gates = _gates(model, batches, [n for n in capture(model, batches[0]).gated], target=0.5, steps=40, lr=0.2)
    losses = {}
    for side, sign in (("closed", 1), ("open", -1)):
        m = copy.deepcopy(model)
        for name, g in gates.items():  # zero the consumer's columns of the removed half
            drop = torch.topk(-sign * g, g.numel() // 2).indices
            with torch.no_grad():
                m.get_submodule(name).down_proj.weight[:, drop] = 0
        with torch.no_grad():
            total, count = batch_loss(m, held, "test")
        losses[side] = total / count
    assert losses["closed"] < losses["open"] - 0.5, losses


def test_plans_recipes_and_checkpoints_carry_it(make_model, batches, tmp_path):
    model = make_model("llama")
    recipe = {MLPS: L0Config(target=0.5, steps=8, update="refit"), ATTN: L0Config(0.5, steps=8)}
    assert load_recipe(dump_recipe(recipe)) == recipe
    assert load_recipe({MLPS: {"method": "l0", "target": 0.5, "steps": 8, "update": "refit"}})[MLPS] == recipe[MLPS]
    path = tmp_path / "recipe.json"
    path.write_text(__import__("json").dumps(dump_recipe(recipe)))
    assert load_recipe(path) == recipe
    check_plan_and_checkpoint(model, recipe, batches, tmp_path)


@pytest.mark.parametrize("kw, match", [
    ({"target": 0.0}, r"L0Config.target is the share of units removed, in \(0, 1\)"),
    ({"target": 1.0}, r"L0Config.target .* in \(0, 1\)"),
    ({"target": "half"}, r"L0Config.target"),
    ({"steps": 0}, r"L0Config.steps .* integer >= 1; got 0 \(e.g. steps=200\)"),
    ({"steps": 2.5}, r"L0Config.steps"),
    ({"lr": 0}, r"L0Config.lr must be a positive number"),
    ({"lambda_lr": -1.0}, r"L0Config.lambda_lr must be a positive number"),
    ({"init_keep": 1.0}, r"L0Config.init_keep .* in \(0, 1\)"),
    ({"warmup": 1.5}, r"L0Config.warmup .* in \[0, 1\]"),
    ({"update": "taylor"}, r"L0Config.update must be None or 'refit'"),
    ({"unit": "layer"}, r"L0Config.unit must be one of"),
    ({"seed": -1}, r"L0Config.seed must be an integer >= 0"),
])
def test_config_errors_name_the_fix(kw, match):
    with pytest.raises(sparsecc.RecipeError, match=match):
        L0Config(**kw)


def test_bad_input_and_failures_leave_the_model_as_it_was(make_model, batches, state_tools, monkeypatch):
    snapshot, same = state_tools
    model = make_model("llama")
    snap = snapshot(model)
    with pytest.raises(sparsecc.RecipeError, match=r"target 0.9 would leave no key/value group \(of 2\); use a target below 0.75"):
        sparsecc.sparsify_(model, {ATTN: L0Config(0.9, unit="kv_group")}, batches, progress=False)
    with pytest.raises(sparsecc.CalibrationError, match="needs calibration data"):
        sparsecc.sparsify_(model, {MLPS: L0Config(0.5)}, progress=False)
    with pytest.raises(sparsecc.RecipeError, match="no field 'sparsity'"):
        load_recipe({MLPS: {"method": "l0", "sparsity": 0.5}})
    with torch.inference_mode(), pytest.raises(sparsecc.CalibrationError, match="outside it"):
        sparsecc.sparsify_(model, {MLPS: L0Config(0.5, steps=2)}, batches, progress=False)
    calls = []
    real = unit_gates.token_loss

    def failing(*args):  # the third training step fails
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return real(*args)

    monkeypatch.setattr(unit_gates, "token_loss", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        sparsecc.sparsify_(model, {MLPS: L0Config(0.5, steps=5), "re:.*self_attn\\..*": sparsecc.WandaConfig(0.5)},
                           batches, progress=False)
    assert same(model, snap) and model.model.layers[0].mlp.gate_proj.weight.shape == (128, 64)
    assert all(q.requires_grad for q in model.parameters()) and not any(m._forward_pre_hooks for m in model.modules())
