"""calibrate -> Plan -> save/load -> sparsify_(model, plan) reproduces sparsify_(model, recipe, batches)."""
import json

import pytest
import torch

import sparsecc

RECIPE = {"re:.*mlp\\..*": sparsecc.MagnitudeConfig(0.5, group="output"), "re:.*self_attn\\.o_proj": sparsecc.MagnitudeConfig(pattern="2:4")}


def test_calibrate_leaves_model_unchanged_and_plan_replays(make_model, batches, tmp_path, state_tools):
    snapshot, same = state_tools
    m = make_model("llama")
    snap = snapshot(m)
    plan = sparsecc.calibrate(m, batches, RECIPE, progress=False)
    assert same(m, snap)
    assert plan.setup["num_batches"] == 3 and len(plan.setup["batches_sha256"]) == 64
    path = plan.save(tmp_path / "p")
    loaded = sparsecc.Plan.load(path)
    assert loaded.configs == plan.configs
    rep = sparsecc.sparsify_(m, loaded)
    ref = make_model("llama")
    sparsecc.sparsify_(ref, RECIPE, batches, progress=False)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, m.state_dict()[k]), k
    assert len(rep.rows) == 8 and all(abs(r["sparsity"] - 0.5) < 1e-9 for r in rep.rows)
    with pytest.raises(sparsecc.PlanError, match="already sparsified"):
        sparsecc.sparsify_(m, loaded)  # weights now differ from the plan's fingerprints


def test_plan_keeps_stats_and_setup(make_model, tmp_path):
    m = make_model("llama")
    cs = sparsecc.sample_batches(torch.randint(0, 128, (500,)), nsamples=4, seqlen=16, seed=3, batch_size=2,
                                 source={"corpus": "synthetic"})
    plan = sparsecc.calibrate(m, cs, RECIPE, progress=False)
    assert plan.setup["seed"] == 3 and plan.setup["nsamples"] == 4 and plan.setup["corpus"] == "synthetic"
    loaded = sparsecc.Plan.load(plan.save(tmp_path / "p"))
    assert loaded.setup == json.loads(json.dumps(plan.setup))


def test_missing_and_corrupt_plans(tmp_path, make_model, batches):
    with pytest.raises(sparsecc.PlanError, match="not a sparsecc plan"):
        sparsecc.Plan.load(tmp_path / "nothing")
    path = sparsecc.calibrate(make_model("llama"), batches, RECIPE, progress=False).save(tmp_path / "p")
    data = (path / "tensors.safetensors").read_bytes()
    (path / "tensors.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(sparsecc.PlanError, match="corrupt or truncated"):
        sparsecc.Plan.load(path)


def test_plan_for_other_shapes_is_rejected(make_model, batches, tmp_path, state_tools):
    snapshot, same = state_tools
    plan = sparsecc.calibrate(make_model("llama"), batches, RECIPE, progress=False)
    other = make_model("llama", seed=1)  # same names and shapes, other weights
    snap = snapshot(other)
    with pytest.raises(sparsecc.PlanError, match="differ from those the plan was calibrated on"):
        sparsecc.sparsify_(other, plan)
    assert same(other, snap)
    gpt2 = make_model("gpt2")
    with pytest.raises(sparsecc.PlanError, match="does not have"):
        sparsecc.sparsify_(gpt2, plan)


def _plan(make_model, batches, tmp_path, name="p"):
    return sparsecc.calibrate(make_model("llama"), batches, RECIPE, progress=False).save(tmp_path / name)


def test_save_refuses_an_existing_path_unless_told(make_model, batches, tmp_path):
    plan = sparsecc.calibrate(make_model("llama"), batches, RECIPE, progress=False)
    folder, file = tmp_path / "folder", tmp_path / "file"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    file.write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        plan.save(folder)
    for overwrite in (False, True):  # a file is never replaced by a plan folder
        with pytest.raises(FileExistsError, match="is a file, not a folder; choose another output folder"):
            plan.save(file, overwrite=overwrite)
    assert (folder / "keep.txt").read_text() == "mine" and file.read_text() == "mine"
    plan.save(folder, overwrite=True)
    assert sparsecc.Plan.load(folder).configs == plan.configs and not (folder / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]  # nothing stray


def test_interrupted_save_leaves_the_old_plan_and_nothing_stray(make_model, batches, tmp_path, monkeypatch):
    from sparsecc.io import plan as plan_module
    path = _plan(make_model, batches, tmp_path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    plan = sparsecc.Plan.load(path)

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(plan_module, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        plan.save(tmp_path / "new")
    with pytest.raises(KeyboardInterrupt):
        plan.save(path, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["p"]
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before


SITE = "model.layers.0.mlp.up_proj"


def _edit_tensors(path, edit):
    from safetensors.torch import load_file, save_file
    t = load_file(str(path / "tensors.safetensors"))
    edit(t)
    save_file(t, str(path / "tensors.safetensors"))


def _edit_json(path, edit):
    doc = json.loads((path / "plan.json").read_text())
    edit(doc)
    (path / "plan.json").write_text(json.dumps(doc))


def _put(key, tensor):
    """A damage: tensor `key` of the plan set to `tensor`."""
    return lambda path: _edit_tensors(path, lambda t: t.update({key: tensor}))


D = f"decision/{SITE}"


@pytest.mark.parametrize("damage, match", [
    (_put(f"{D}/mask", torch.full((128, 64), float("nan"))), f"{D}/mask.*bool"),
    (_put(f"{D}/mask", torch.ones(3, 5, dtype=torch.bool)), f"{D}/mask.*\\[3, 5\\].*\\[128, 64\\]"),
    (_put(f"{D}/weight", torch.full((128, 64), float("inf"))), f"{D}/weight.*not finite"),
    (_put(f"{D}/perm", torch.zeros(64, dtype=torch.long)), f"{D}/perm.*permutation"),
    (_put("decision/model.nowhere/mask", torch.ones(2, 2, dtype=torch.bool)), "model.nowhere/mask.*no such site"),
    (_put("junk", torch.ones(2)), "'junk'"),
    (lambda p: _edit_json(p, lambda d: d.pop("sites")), "'sites'"),
    (lambda p: _edit_json(p, lambda d: d.update(sites=[1, 2])), "'sites'"),
    (lambda p: _edit_json(p, lambda d: d["sites"][SITE].update(out_features="many")), f"site {SITE!r}"),
    (lambda p: _edit_json(p, lambda d: d["configs"][SITE].update(sparsity=7)), f"config of {SITE!r}"),
    (lambda p: _edit_json(p, lambda d: d.update(rows="hello")), "'rows'"),
    (lambda p: _edit_json(p, lambda d: d["meta"]["fingerprints"].update({SITE: "x"})), "fingerprint"),
], ids=["nan-mask", "mask-shape", "inf-weight", "perm", "unknown-site", "unknown-tensor", "no-sites", "sites-list",
        "site-field", "config-field", "rows", "fingerprint"])
def test_load_checks_the_contents(make_model, batches, tmp_path, damage, match):
    path = _plan(make_model, batches, tmp_path)
    damage(path)
    with pytest.raises(sparsecc.PlanError, match=match):
        sparsecc.Plan.load(path)


def test_plan_for_a_model_of_other_shapes_changes_nothing(make_model, batches, tmp_path, state_tools):
    from transformers import LlamaConfig, LlamaForCausalLM
    snapshot, same = state_tools
    plan = sparsecc.Plan.load(_plan(make_model, batches, tmp_path))
    narrow = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2)).eval()
    snap = snapshot(narrow)
    with pytest.raises(sparsecc.PlanError, match=r"plan expects \[128, 64\], model has \[96, 64\]"):
        sparsecc.sparsify_(narrow, plan, strict=False)
    assert same(narrow, snap)


def test_plans_of_module_rewrites_round_trip_and_refuse_a_second_application(make_model, batches, tmp_path):
    from safetensors.torch import load_file, save_file
    recipe = {"model.layers.0.mlp": sparsecc.CATSConfig(0.5), "model.layers.1.mlp": sparsecc.MoEConfig(4, 2, router="centroid"),
              "re:.*self_attn": sparsecc.SlidingWindowConfig(window=4)}
    path = sparsecc.calibrate(make_model("llama"), batches, recipe, progress=False).save(tmp_path / "p")
    plan = sparsecc.Plan.load(path)  # a centroid router has no fit statistics (no R²): still a valid plan
    assert "router_r2" not in plan.decisions["model.layers.1.mlp"]
    m = make_model("llama")
    report = sparsecc.sparsify_(m, plan)
    assert [r["module"] for r in report.rows] == list(plan.decisions)  # in the order calibration made them
    for strict in (True, False):
        with pytest.raises(sparsecc.PlanError, match="already rewritten by"):
            sparsecc.sparsify_(m, plan, strict=strict)
    tensors = load_file(str(path / "tensors.safetensors"))
    del tensors["decision/model.layers.0.mlp/threshold"]
    save_file(tensors, str(path / "tensors.safetensors"))
    with pytest.raises(sparsecc.PlanError, match="decision of 'model.layers.0.mlp' .*needs a threshold"):
        sparsecc.Plan.load(path)


def test_the_reported_pass_order_is_the_order_they_run(make_model, batches):
    recipe = {"re:.*self_attn": sparsecc.SlidingWindowConfig(window=4),
              "re:.*mlp\\..*": sparsecc.WandaConfig(0.5, layerwise="owl")}
    pipe = sparsecc.Pipeline.from_recipe(make_model("llama"), recipe, batches)
    assert [p.name for p in pipe.order] == ["collect_outlier_ratios", "rewrite_module_forms", "collect_input_stats",
                                            "apply_recipe"]
