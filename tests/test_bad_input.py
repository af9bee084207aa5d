"""Bad input gets a clear error naming the fix, and the model is left exactly as it was."""
import re

import pytest
import torch

import sparsecc

RECIPE = {"default": sparsecc.MagnitudeConfig(0.5)}


@pytest.mark.parametrize("bad, match", [
    ([], "no calibration batches"),
    (torch.zeros(2, 8, dtype=torch.long), "list of batches"),
    ([torch.zeros(2, 8)], "dtype torch.float32.*integer"),
    ([torch.zeros(8, dtype=torch.long)], r"\[batch, seq_len\].*unsqueeze"),
    ([torch.zeros(2, 8, dtype=torch.long, device="meta")], "on meta but the model is on cpu"),
    ([torch.full((2, 8), 999, dtype=torch.long)], r"vocabulary is \[0, 128\)"),
    ([torch.zeros(2, 0, dtype=torch.long)], "empty"),
    (["text"], "use a tensor or a dict"),
    ([{"input_ids": torch.zeros(2, 8, dtype=torch.long), "attention_mask": torch.ones(2, 7)}], "attention_mask shape"),
])
@pytest.mark.parametrize("verb", ["sparsify_", "calibrate", "pipeline"])
def test_bad_batches(bad, match, verb, make_model, state_tools):
    snapshot, same = state_tools
    m = make_model("llama")
    snap = snapshot(m)
    with pytest.raises(sparsecc.CalibrationError, match=match):
        if verb == "sparsify_":
            sparsecc.sparsify_(m, RECIPE, bad, progress=False)
        elif verb == "calibrate":
            sparsecc.calibrate(m, bad, RECIPE, progress=False)
        else:
            sparsecc.Pipeline([sparsecc.CollectInputStats()], progress=False).run(m, bad)
    assert same(m, snap)


def test_float_model_wants_its_dtype():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(sparsecc.CalibrationError, match="float64.*convert"):
        sparsecc.sparsify_(m, RECIPE, [torch.zeros(2, 4, dtype=torch.float64)], progress=False)


def test_model_without_linear_layers():
    m = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.LayerNorm(4))
    with pytest.raises(sparsecc.CaptureError, match="no linear layers"):
        sparsecc.sparsify_(m, RECIPE, [torch.zeros(2, 4)], progress=False)


def test_nan_activation_names_module(make_model, batches, state_tools):
    snapshot, same = state_tools
    m = make_model("llama")
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")  # poisons down_proj's input in block 1
    snap = snapshot(m)
    with pytest.raises(sparsecc.CalibrationError, match="NaN/Inf in the input of model.layers.1.mlp.down_proj"):
        sparsecc.Pipeline([sparsecc.CollectInputStats(), sparsecc.ApplyRecipe(
            {"model.layers.0.mlp.up_proj": sparsecc.MagnitudeConfig(0.5)})], progress=False).run(m, batches)
    assert same(m, snap)


def test_nm_width_error_leaves_model_intact(state_tools):
    snapshot, same = state_tools
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 6), torch.nn.Linear(6, 2))
    snap = snapshot(m)
    with pytest.raises(sparsecc.RecipeError, match="4:8 pattern needs the input width to be a multiple of 8, but 2 has 6 inputs"):
        sparsecc.sparsify_(m, sparsecc.MagnitudeConfig(pattern="4:8"), [torch.randn(3, 8)], progress=False)
    assert same(m, snap)  # layers 0 and 1 were pruned before layer 2 failed, and were restored


@pytest.mark.parametrize("kwargs, match", [
    ({"sparsity": 1.0}, r"\[0, 1\)"), ({"sparsity": -0.1}, r"\[0, 1\)"), ({"pattern": "4:2"}, "0 < N < M"),
    ({"pattern": "2-4"}, "'N:M'"), ({"group": "row"}, "'layer' or 'output'"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(sparsecc.RecipeError, match=match):
        sparsecc.MagnitudeConfig(**kwargs)


def test_data_free_recipe_needs_no_batches(make_model):
    m = make_model("llama")
    rep = sparsecc.sparsify_(m, {"re:.*q_proj": sparsecc.MagnitudeConfig(0.25)}, progress=False)
    assert [r["module"] for r in rep.rows] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert rep.setup["data"].startswith("none")
    assert float((m.model.layers[0].self_attn.q_proj.weight == 0).float().mean()) == 0.25


def test_hessian_memory_is_checked_before_any_work(make_model, batches, state_tools, monkeypatch):
    import sparsecc.passes.memory
    snapshot, same = state_tools
    m = make_model("llama")
    snap = snapshot(m)
    monkeypatch.setattr(sparsecc.passes.memory, "available_bytes", lambda device: 100_000)
    with pytest.raises(sparsecc.CalibrationError, match=r"needs ~0\.\d+ GiB .*decoder block model\.layers\.\d.*WandaConfig"):
        sparsecc.sparsify_(m, sparsecc.SparseGPTConfig(0.5), batches, progress=False)
    assert same(m, snap)
    sparsecc.sparsify_(m, sparsecc.WandaConfig(0.5), batches, progress=False)  # no Hessian: no check


@pytest.mark.parametrize("compress", ["compress_nm_", "compress_csr_"])
def test_compressed_linears_are_refused_not_skipped(compress, make_model, batches, state_tools):
    """NMLinear/CSRLinear are not nn.Linear: a recipe reaching them must not silently leave them out."""
    snapshot, same = state_tools
    m = make_model("llama")
    prune = {"compress_nm_": sparsecc.MagnitudeConfig(0.5, pattern="2:4"), "compress_csr_": sparsecc.MagnitudeConfig(0.95)}
    sparsecc.sparsify_(m, {"default": prune[compress], "lm_head": None}, progress=False)
    plan = sparsecc.calibrate(m, batches, {"re:.*o_proj": sparsecc.MagnitudeConfig(0.6)}, progress=False)
    names = getattr(sparsecc, compress)(m)
    kind = "NMLinear" if compress == "compress_nm_" else "CSRLinear"
    assert len(names) == 14
    snap = snapshot(m)
    for recipe in ({"default": sparsecc.WandaConfig(0.5)}, {"re:.*mlp.*": sparsecc.MagnitudeConfig(0.5)},
                   {"model.layers.1.self_attn.o_proj": sparsecc.SparseGPTConfig(0.5)}):
        with pytest.raises(sparsecc.RecipeError, match=rf"model.layers.\d.\w+.\w+_proj .*compressed \({kind}\).*"
                                                      "prune before compressing.*uncompressed model"):
            sparsecc.sparsify_(m, recipe, batches, progress=False)
        assert same(m, snap)
    with pytest.raises(sparsecc.RecipeError, match=kind):
        sparsecc.calibrate(m, batches, {"default": sparsecc.WandaConfig(0.5)}, progress=False)
    with pytest.raises(sparsecc.PlanError, match=f"o_proj is compressed, {kind}: apply the plan before compressing"):
        sparsecc.sparsify_(m, plan)
    report = sparsecc.sparsify_(m, {"default": None, "lm_head": sparsecc.MagnitudeConfig(0.5)}, progress=False)
    assert [r["module"] for r in report.rows] == ["lm_head"]  # nothing compressed targeted: fine


def test_pruning_the_linears_of_a_cats_mlp_later_is_refused_not_skipped(make_model, batches, state_tools):
    """A CATS MLP runs its three linears inside one op, so capture sees none of them: a later
    pruning recipe reaching them must say so (it left them dense, silently)."""
    snapshot, same = state_tools
    m = make_model("llama")
    sparsecc.sparsify_(m, {"re:.*mlp": sparsecc.CATSConfig(0.5)}, batches, progress=False)
    snap = snapshot(m)
    for recipe in ({"default": sparsecc.WandaConfig(0.5)}, {"re:.*down_proj": sparsecc.MagnitudeConfig(0.5)}):
        with pytest.raises(sparsecc.RecipeError, match=r"model\.layers\.\d\.mlp\.\w+_proj.* cannot be pruned now: "
                                                      r"inside model\.layers\.\d\.mlp, rewritten by CATSConfig") as e:
            sparsecc.sparsify_(m, recipe, batches, progress=False)
        assert same(m, snap)
    skip = eval(re.search(r"skip them with (\{.*\})", str(e.value)).group(1))  # the key the message suggests
    report = sparsecc.sparsify_(m, {"default": sparsecc.WandaConfig(0.5), **skip}, batches, progress=False)
    assert report.rows and all(".mlp." not in r["module"] for r in report.rows)
    fresh = make_model("llama")  # in one recipe, pruning runs before the rewrite: fine
    both = sparsecc.sparsify_(fresh, {"default": sparsecc.WandaConfig(0.5), "re:.*mlp": sparsecc.CATSConfig(0.5)},
                              batches, progress=False)
    assert any(".mlp.down_proj" in r["module"] for r in both.rows)


@pytest.mark.parametrize("config", [sparsecc.MagnitudeConfig(0.5), sparsecc.WandaConfig(0.5),
                                    sparsecc.SparseGPTConfig(0.5), sparsecc.OBSConfig(0.5),
                                    sparsecc.WandaConfig(0.5, layerwise="owl")],
                         ids=["magnitude", "wanda", "sparsegpt", "obs", "wanda-owl"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(config, bad, make_model, batches, state_tools):
    """Magnitude kept NaN weights; the calibrated methods failed on the next module's input."""
    snapshot, _ = state_tools
    m = make_model("llama")
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[3, 5] = bad
    snap = snapshot(m)
    with pytest.raises(sparsecc.RecipeError, match=r"model.layers.1.mlp.up_proj: its weight holds NaN/Inf.*None"):
        sparsecc.sparsify_(m, {"default": config}, batches, progress=False)
    assert all(torch.equal(v.nan_to_num(), snap[k].nan_to_num()) for k, v in m.state_dict().items())  # NaN != NaN
    skip = {"model.layers.1.mlp": None, "lm_head": None}  # the bad weight, and what its output reaches
    assert len(sparsecc.sparsify_(m, {"default": config, **skip}, batches, progress=False).rows) == 11


def test_non_finite_weights_are_refused_by_a_plan(make_model, batches):
    m = make_model("llama")
    plan = sparsecc.calibrate(m, batches, {"default": sparsecc.MagnitudeConfig(0.5)}, progress=False)
    with torch.no_grad():
        m.lm_head.weight[0, 0] = float("inf")
    with pytest.raises(sparsecc.RecipeError, match="lm_head: its weight holds NaN/Inf"):
        sparsecc.sparsify_(m, plan, strict=False)


def test_non_finite_weights_are_refused_at_compile_time():
    torch._dynamo.reset()
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    with torch.no_grad():
        m[2].weight[0, 0] = float("nan")
    compiled = torch.compile(m, backend="sparsecc", options={"recipe": {"default": sparsecc.MagnitudeConfig(0.5)}})
    with pytest.raises(Exception, match="2: its weight holds NaN/Inf"):
        compiled(torch.randn(2, 8))


@pytest.mark.parametrize("packing", ["compress_nm_", "cats"])
def test_compile_time_recipes_refuse_linears_run_as_sparsecc_ops(packing, make_model, batches):
    """The backend sees a compressed linear or a CATS MLP as one sparsecc op: a compile-time recipe
    reaching it must say so (it left them dense, silently), and run once they are skipped."""
    m = make_model("llama")
    if packing == "cats":
        sparsecc.sparsify_(m, {"re:.*mlp": sparsecc.CATSConfig(0.5)}, batches, progress=False)
        why = "its linears run inside the CATS MLP op"
    else:
        sparsecc.sparsify_(m, {"re:.*mlp\\..*": sparsecc.MagnitudeConfig(pattern="2:4")}, progress=False)
        sparsecc.compress_nm_(m, "2:4")
        why = r"it is compressed \(NMLinear\)"
    torch._dynamo.reset()
    recipe = {"default": sparsecc.MagnitudeConfig(0.5), "lm_head": None}
    with pytest.raises(Exception, match=rf"model\.layers\.\d\.mlp\S* .*cannot be pruned at compile time: {why}"):
        torch.compile(m, backend="sparsecc", options={"recipe": recipe})(batches[0])
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(m, backend="sparsecc", options={"recipe": {**recipe, r"re:.*mlp.*": None}})(batches[0])


@pytest.mark.parametrize("kw", [{"seqlen": 0}, {"seqlen": -1}, {"nsamples": 0}, {"batch_size": 0}])
def test_sample_batches_refuses_empty_windows(kw):
    with pytest.raises(sparsecc.CalibrationError, match="must be at least 1, got .*seqlen: the model's context"):
        sparsecc.sample_batches(torch.arange(1000), **{"nsamples": 4, "seqlen": 16, **kw})


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_path_that_is_a_file_is_refused_naming_the_fix(overwrite, tmp_path, make_model):
    target = tmp_path / "file"
    target.write_text("mine")
    m = make_model("llama")
    report = sparsecc.sparsify_(m, {"default": sparsecc.MagnitudeConfig(0.5)}, progress=False)
    with pytest.raises(FileExistsError, match="is a file, not a folder; choose another output folder"):
        sparsecc.save_pruned(m, target, report, overwrite=overwrite)
    with pytest.raises(FileExistsError, match="is a file"):
        sparsecc.calibrate(m, [torch.randint(0, 128, (1, 8))], {"default": sparsecc.MagnitudeConfig(0.5)},
                           progress=False).save(target, overwrite=overwrite)
    assert target.read_text() == "mine"
