"""Structured pruning of gated-MLP channels: the linears really shrink, the scores and the refit do
what they say, plans and checkpoints carry it."""
import copy

import pytest
import torch

import sparsecc

MLPS = "re:.*mlp"


def _mlp_io(model, batches, k=0):
    """(input, output) of block k's MLP on the batches (hooked)."""
    seen = []
    h = model.model.layers[k].mlp.register_forward_hook(lambda m, a, out: seen.append((a[0], out)))
    with torch.no_grad():
        for b in batches:
            model(b)
    h.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x, _ in seen]), torch.cat([y.reshape(-1, y.shape[-1])
                                                                               for _, y in seen])


def test_magnitude_shrinks_every_mlp_without_data(make_model):
    model = make_model("llama")
    params = sum(p.numel() for p in model.parameters())
    report = sparsecc.sparsify_(model, {MLPS: sparsecc.StructuredConfig(0.25, score="magnitude")}, progress=False)
    for layer in model.model.layers:
        assert (layer.mlp.gate_proj.weight.shape, layer.mlp.up_proj.weight.shape,
                layer.mlp.down_proj.weight.shape) == ((96, 64), (96, 64), (64, 96))
    assert sum(p.numel() for p in model.parameters()) == params - 2 * 3 * 32 * 64
    assert [(r["kept"], r["units"]) for r in report.rows] == [(96, 128)] * 2
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 128, (1, 9))).logits).all()


@pytest.mark.parametrize("score", ["wanda-sp", "flap"])
def test_refit_reconstructs_the_mlp_better_than_dropping_the_channels(score, make_model, batches):
    dense = make_model("llama")
    x, want = _mlp_io(dense, batches)
    errors = {}
    for update in (None, "refit"):
        m = copy.deepcopy(dense)
        sparsecc.sparsify_(m, {"model.layers.0.mlp": sparsecc.StructuredConfig(0.5, score=score, update=update)},
                           batches, progress=False)
        with torch.no_grad():
            errors[update] = float(((m.model.layers[0].mlp(x) - want) ** 2).sum() / (want ** 2).sum())
    assert errors["refit"] < errors[None] < 1


def test_flap_keeps_the_mean_of_the_mlp_output(make_model, batches):
    model = make_model("llama")
    x, want = _mlp_io(model, batches)
    sparsecc.sparsify_(model, {"model.layers.0.mlp": sparsecc.StructuredConfig(0.5, score="flap")}, batches,
                       progress=False)
    with torch.no_grad():
        got = model.model.layers[0].mlp(x)
    assert model.model.layers[0].mlp.down_proj.bias is not None
    torch.testing.assert_close(got.mean(0), want.mean(0), atol=1e-5, rtol=1e-4)


def test_wanda_sp_keeps_the_channels_with_the_largest_scores(make_model, batches):
    model = make_model("llama")
    mlp = model.model.layers[0].mlp
    x, _ = _mlp_io(model, batches)
    with torch.no_grad():
        h = torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
    score = mlp.down_proj.weight.abs().sum(0) * h.norm(dim=0)
    keep = torch.sort(torch.topk(score, 32).indices).values
    plan = sparsecc.calibrate(model, batches, {"model.layers.0.mlp": sparsecc.StructuredConfig(0.75)}, progress=False)
    assert torch.equal(plan.decisions["model.layers.0.mlp"]["keep"], keep)


def test_plans_and_checkpoints_carry_the_shrunk_model(make_model, batches, tmp_path):
    model = make_model("llama")
    recipe = {MLPS: sparsecc.StructuredConfig(0.5, score="flap", update="refit"),
              "re:.*self_attn\\..*": sparsecc.WandaConfig(0.5)}
    check_plan_and_checkpoint(model, recipe, batches, tmp_path)


def check_plan_and_checkpoint(model, recipe, batches, tmp_path):
    """A saved Plan replays the recipe exactly, and the checkpoint reloads the shrunk model (the MLPs
    of block 1 at 64 channels)."""
    plan = sparsecc.Plan.load(sparsecc.calibrate(model, batches, recipe, progress=False).save(tmp_path / "plan"))
    direct, replayed = copy.deepcopy(model), copy.deepcopy(model)
    report = sparsecc.sparsify_(direct, recipe, batches, progress=False)
    sparsecc.sparsify_(replayed, plan)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = direct(ids).logits
        torch.testing.assert_close(replayed(ids).logits, want, rtol=0, atol=0)
    sparsecc.save_pruned(direct, tmp_path / "ckpt", report)
    loaded, _ = sparsecc.load_pruned(tmp_path / "ckpt")
    assert loaded.model.layers[1].mlp.down_proj.weight.shape == (64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want)


def test_bad_input_leaves_the_model_as_it_was(make_model, batches, state_tools):
    snapshot, same = state_tools
    model = make_model("llama")
    snap = snapshot(model)
    with pytest.raises(sparsecc.RecipeError, match="would leave no channel"):
        sparsecc.sparsify_(model, {MLPS: sparsecc.StructuredConfig(0.999, score="magnitude")}, progress=False)
    with pytest.raises(sparsecc.RecipeError, match="score must be one of"):
        sparsecc.StructuredConfig(0.5, score="taylor")
    with pytest.raises(sparsecc.CalibrationError, match="needs calibration data"):
        sparsecc.sparsify_(model, {MLPS: sparsecc.StructuredConfig(0.5, score="flap")}, progress=False)
    assert same(model, snap) and model.model.layers[0].mlp.gate_proj.weight.shape == (128, 64)
    assert sparsecc.load_recipe({MLPS: {"method": "structured", "sparsity": 0.3, "score": "flap"}}) == {
        MLPS: sparsecc.StructuredConfig(0.3, score="flap")}


@pytest.mark.parametrize("rewrite", ["structured", "moe"])
def test_unstructured_pruning_then_a_rewrite_in_one_recipe_saves_what_it_reports(rewrite, make_model, batches,
                                                                                  tmp_path):
    """The rows pruning records for a module's linears follow its rewrite: a shrunk linear's new shape
    and sparsity; the linears an MoE split replaced marked so; the checkpoint saves and loads."""
    model = make_model("llama")
    mlp = sparsecc.StructuredConfig(0.5) if rewrite == "structured" else sparsecc.MoEConfig(num_experts=4, top_k=2)
    report = sparsecc.sparsify_(model, {"default": sparsecc.SparseGPTConfig(0.5), "lm_head": None, MLPS: mlp},
                                batches, progress=False)
    params = dict(model.named_parameters())
    linears = [r for r in report.rows if r.get("param") and not r.get("replaced_by")]
    assert len(linears) == (14 if rewrite == "structured" else 8)  # MoE: only the attention linears
    replaced = [r["module"] for r in report.rows if r.get("replaced_by")]
    assert replaced == ([] if rewrite == "structured" else
                        [f"model.layers.{k}.mlp.{p}_proj" for k in (0, 1) for p in ("gate", "up", "down")])
    for r in linears:
        w = params[r["param"]].detach()
        assert r["shape"] == list(w.shape) and r["sparsity"] == float((w == 0).float().mean())
    if rewrite == "structured":
        assert dict((r["module"], r["shape"]) for r in linears)["model.layers.0.mlp.down_proj"] == [64, 64]
    sparsecc.save_pruned(model, tmp_path / "out", report)
    loaded, _ = sparsecc.load_pruned(tmp_path / "out")
    x = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_a_shrink_that_cuts_nm_groups_is_refused_and_leaves_the_model(make_model, batches):
    model = make_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(sparsecc.RecipeError, match=r"StructuredConfig on model.layers.0.mlp removed inputs of "
                                                   r"model.layers.0.mlp.down_proj, pruned 2:4.*apply it first"):
        sparsecc.sparsify_(model, {"default": sparsecc.WandaConfig(pattern="2:4"), "lm_head": None,
                                   MLPS: sparsecc.StructuredConfig(0.3)}, batches, progress=False)
    assert {n: p.shape for n, p in model.named_parameters()} == {n: p.shape for n, p in before.items()}
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
