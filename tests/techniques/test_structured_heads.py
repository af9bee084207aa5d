"""Structured pruning of attention heads (grouped-query aware) and of plain MLPs: the shrunk model
computes what the dense one computes without the removed units, caches and generate keep working,
and a uniformly shrunk checkpoint loads with plain from_pretrained."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import sparsecc

ATTN = "re:.*self_attn"
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))


def _without_heads(model, attn_path, plan, head_dim):
    """The dense model with the o_proj columns of each module's removed heads zeroed: what the
    shrunk model must compute when q/k/v of the kept heads are unchanged."""
    ref = copy.deepcopy(model)
    for name, decision in plan.decisions.items():
        o = getattr(ref.get_submodule(name), attn_path)
        drop = torch.ones(o.in_features // head_dim, dtype=torch.bool)
        drop[decision["keep"]] = False
        with torch.no_grad():
            o.weight[:, drop.repeat_interleave(head_dim)] = 0
    return ref


@pytest.mark.parametrize("family,o,unit,sparsity,shape", [
    ("llama", "o_proj", "head", 0.5, ((32, 64), (32, 64), (32, 64), (64, 32))),      # 1 of 2 heads per group
    ("llama", "o_proj", "kv_group", 0.5, ((32, 64), (16, 64), (16, 64), (64, 32))),  # 1 of 2 groups
    ("mistral", "o_proj", "head", 0.5, ((32, 64), (32, 64), (32, 64), (64, 32))),
    ("opt", "out_proj", "head", 0.25, ((48, 64), (48, 64), (48, 64), (64, 48))),    # MHA: heads are groups
])
def test_removed_heads_are_exactly_gone(family, o, unit, sparsity, shape, make_model, batches):
    model = make_model(family)
    recipe = {ATTN: sparsecc.StructuredConfig(sparsity, score="wanda-sp", unit=unit)}
    plan = sparsecc.calibrate(model, batches, recipe, progress=False)
    ref = _without_heads(model, o, plan, 16)
    report = sparsecc.sparsify_(model, plan)
    assert len(report.rows) == 2
    for name in plan.decisions:
        attn = model.get_submodule(name)
        assert tuple(getattr(attn, n).weight.shape for n in ("q_proj", "k_proj", "v_proj", o)) == shape
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=1e-4, atol=1e-5)
        cached = model.generate(IDS[:1], max_new_tokens=6, do_sample=False)
        assert torch.equal(cached, model.generate(IDS[:1], max_new_tokens=6, do_sample=False, use_cache=False))


def test_heads_go_evenly_per_group_by_score(make_model, batches):
    model = make_model("llama")
    plan = sparsecc.calibrate(model, batches, {ATTN: sparsecc.StructuredConfig(0.5, score="magnitude")},
                              progress=False)
    attn = model.model.layers[0].self_attn
    score = (attn.q_proj.weight.abs().sum(1) + attn.o_proj.weight.abs().sum(0)).reshape(2, 2, 16).sum(-1)
    want = score.argmax(1) + torch.tensor([0, 2])  # the better head of each group of 2
    assert torch.equal(plan.decisions["model.layers.0.self_attn"]["keep"], want)
    assert "keep_kv" not in plan.decisions["model.layers.0.self_attn"]


def _attention_out(model, batches):
    """Block 0's attention output on the batches (hooked)."""
    seen = []
    hook = model.model.layers[0].self_attn.register_forward_hook(lambda m, a, out: seen.append(out[0]))
    with torch.no_grad():
        for b in batches:
            model(b)
    hook.remove()
    return torch.cat(seen)


def test_refit_of_o_proj_reconstructs_attention_better(make_model, batches):
    dense = make_model("llama")
    want = _attention_out(dense, batches)
    errors = {}
    for update in (None, "refit"):
        m = copy.deepcopy(dense)
        recipe = {"model.layers.0.self_attn": sparsecc.StructuredConfig(0.5, score="flap", update=update)}
        sparsecc.sparsify_(m, recipe, batches, progress=False)
        errors[update] = float(((_attention_out(m, batches) - want) ** 2).sum() / (want ** 2).sum())
    assert errors["refit"] < errors[None] < 1


def test_plain_mlp_channels_of_opt(make_model, batches):
    model = make_model("opt")
    layers = r"re:model\.decoder\.layers\.\d+"
    plan = sparsecc.calibrate(model, batches, {layers: sparsecc.StructuredConfig(0.25)}, progress=False)
    ref = copy.deepcopy(model)
    for name, decision in plan.decisions.items():
        drop = torch.ones(128, dtype=torch.bool)
        drop[decision["keep"]] = False
        with torch.no_grad():
            ref.get_submodule(name).fc2.weight[:, drop] = 0
    sparsecc.sparsify_(model, plan)
    assert model.model.decoder.layers[1].fc1.weight.shape == (96, 64)
    assert model.model.decoder.layers[1].fc2.weight.shape == (64, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=1e-4, atol=1e-5)


def test_uniform_shrink_loads_with_plain_from_pretrained(make_model, batches, tmp_path):
    model = make_model("llama")
    # wanda-sp adds no bias (FLAP's compensation would: Llama's config cannot say "o_proj has one")
    recipe = {"re:.*mlp": sparsecc.StructuredConfig(0.5, score="wanda-sp", update="refit"),
              ATTN: sparsecc.StructuredConfig(0.5, score="wanda-sp", unit="kv_group")}
    report = sparsecc.sparsify_(model, recipe, batches, progress=False)
    with torch.no_grad():
        want = model(IDS).logits
    sparsecc.save_pruned(model, tmp_path / "ckpt", report)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert (plain.config.intermediate_size, plain.config.num_attention_heads, plain.config.num_key_value_heads,
            plain.config.head_dim) == (64, 2, 1, 16)
    loaded, _ = sparsecc.load_pruned(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(plain(IDS).logits, want)
        torch.testing.assert_close(loaded(IDS).logits, want)
        assert torch.equal(plain.generate(IDS[:1], max_new_tokens=4, do_sample=False),
                           model.generate(IDS[:1], max_new_tokens=4, do_sample=False))


def test_non_uniform_widths_load_through_load_pruned(make_model, batches, tmp_path):
    model = make_model("llama")
    recipe = {"model.layers.0.mlp": sparsecc.StructuredConfig(0.5), "model.layers.1.mlp": sparsecc.StructuredConfig(0.25),
              "model.layers.0.self_attn": sparsecc.StructuredConfig(0.5, score="flap")}
    report = sparsecc.sparsify_(model, recipe, batches, progress=False)
    sparsecc.save_pruned(model, tmp_path / "ckpt", report)
    loaded, _ = sparsecc.load_pruned(tmp_path / "ckpt")
    assert loaded.config.intermediate_size == 128  # the folder's config is the dense one
    assert loaded.model.layers[1].mlp.up_proj.weight.shape == (96, 64)
    assert loaded.model.layers[0].self_attn.num_key_value_groups == 1
    assert loaded.model.layers[0].self_attn.o_proj.bias is not None  # FLAP's bias compensation
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits)


def test_bad_head_input_leaves_the_model_as_it_was(make_model, batches, state_tools):
    snapshot, same = state_tools
    model = make_model("llama")
    snap = snapshot(model)
    with pytest.raises(sparsecc.RecipeError, match="would leave no query head in a key/value group"):
        sparsecc.sparsify_(model, {ATTN: sparsecc.StructuredConfig(0.8, score="magnitude")}, progress=False)
    with pytest.raises(sparsecc.RecipeError, match="no whole number of heads; use a multiple of 0.5000; or unit="):
        sparsecc.sparsify_(model, {ATTN: sparsecc.StructuredConfig(0.25, score="magnitude")}, progress=False)
    with pytest.raises(sparsecc.RecipeError, match="unit must be one of"):
        sparsecc.StructuredConfig(0.5, unit="layer")
    gpt2 = make_model("gpt2")  # fused c_attn: its heads cannot be located
    with pytest.raises(sparsecc.RecipeError, match="c_attn|no MLP|matches no"):
        sparsecc.sparsify_(gpt2, {"re:.*attn": sparsecc.StructuredConfig(0.25, score="magnitude")}, progress=False)
    assert same(model, snap) and model.model.layers[0].self_attn.num_key_value_groups == 2


def test_global_widths_rank_standardised_scores_across_modules(make_model, batches):
    model = make_model("llama")
    with torch.no_grad():  # make the two MLPs' score distributions differ in shape, not only scale
        model.model.layers[1].mlp.down_proj.weight[:, :16] *= 8
    cfg = sparsecc.StructuredConfig(0.5, score="magnitude", layerwise="global")
    plan = sparsecc.calibrate(model, batches, {"re:.*mlp": cfg}, progress=False)
    z = []
    for layer in model.model.layers:
        mlp = layer.mlp
        s = mlp.down_proj.weight.abs().sum(0) + mlp.gate_proj.weight.abs().sum(1) + mlp.up_proj.weight.abs().sum(1)
        z.append((s - s.mean()) / s.std())
    lowest = torch.argsort(torch.cat(z).double(), stable=True)[:128]
    want = [int((lowest < 128).sum()), int((lowest >= 128).sum())]
    kept = [plan.decisions[f"model.layers.{i}.mlp"]["keep"].numel() for i in range(2)]
    assert [128 - k for k in kept] == want and want[0] != want[1] and sum(want) == 128
    report = sparsecc.sparsify_(model, plan)
    assert [r["kept"] for r in report.rows] == kept
