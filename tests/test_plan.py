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
