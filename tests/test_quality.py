"""Pruning quality on the zoo's tiny trained Llama as shipped (WikiText-2 test perplexity, the
shipped token ids: the same model and text on every machine), CI-bounded.

Every linear but lm_head is pruned, calibrating block-sequentially on 32 windows of the training
split; perplexity on the first 64 test windows (8,192 tokens). Thresholds sit a few points outside
the figures measured on 2026-11-25 (dense 54.6; 50%: magnitude 57.7, Wanda 57.3, SparseGPT 56.5,
OBS 55.9; 2:4: magnitude 61.1, Wanda 59.1, SparseGPT 57.8), so a regression in any algorithm
(e.g. SparseGPT without its weight update falls to Wanda-or-worse) fails them. The full table on
the larger `ref` model is `benchmarks/prune_quality.py`.
"""
import copy

import pytest
import torch

import sparsecc
from sparsecc.tools.evaluate import perplexity

WINDOWS = 64
CONFIGS = {
    "magnitude 50%": sparsecc.MagnitudeConfig(sparsity=0.5),
    "wanda 50%": sparsecc.WandaConfig(sparsity=0.5),
    "sparsegpt 50%": sparsecc.SparseGPTConfig(sparsity=0.5),
    "obs 50%": sparsecc.OBSConfig(sparsity=0.5),
    "magnitude 2:4": sparsecc.MagnitudeConfig(pattern="2:4"),
    "wanda 2:4": sparsecc.WandaConfig(pattern="2:4"),
    "sparsegpt 2:4": sparsecc.SparseGPTConfig(pattern="2:4"),
}


@pytest.fixture(scope="module")
def setup(tiny_zoo, tiny_streams):
    model, _, info, _ = tiny_zoo
    train_ids, test_ids = tiny_streams
    seqlen = model.config.max_position_embeddings
    batches = sparsecc.sample_batches(train_ids, nsamples=32, seqlen=seqlen, seed=0, batch_size=8)
    return model, batches, test_ids[: WINDOWS * seqlen], seqlen


@pytest.fixture(scope="module")
def pruned(setup):
    """name -> (pruned model, perplexity, report); each pruned once for the whole module."""
    model, batches, test_ids, seqlen = setup
    out = {}
    for name, cfg in CONFIGS.items():
        m = copy.deepcopy(model)
        report = sparsecc.sparsify_(m, {"default": cfg, "lm_head": None}, batches, progress=False)
        out[name] = (m, perplexity(m, test_ids, seqlen), report)
    return out


@pytest.fixture(scope="module")
def dense_ppl(setup):
    model, _, test_ids, seqlen = setup
    return perplexity(model, test_ids, seqlen)


def ppl(pruned, name):
    return pruned[name][1]


def test_dense_reference_quality(dense_ppl):
    assert dense_ppl < 60, f"tiny zoo model regressed: dense perplexity {dense_ppl:.2f} (measured 54.6)"


def test_every_method_reaches_its_target_sparsity(pruned):
    for name, (_, _, report) in pruned.items():
        assert abs(report.sparsity - 0.5) < 1e-6, name
        assert all(r["module"] != "lm_head" for r in report.rows)


def test_pruned_perplexity_stays_close_to_dense(pruned, dense_ppl):
    assert ppl(pruned, "sparsegpt 50%") < 1.06 * dense_ppl
    assert ppl(pruned, "obs 50%") < 1.06 * dense_ppl
    assert ppl(pruned, "sparsegpt 2:4") < 1.10 * dense_ppl
    for name in pruned:
        assert ppl(pruned, name) < 1.20 * dense_ppl, name


def test_seed_ordering_sparsegpt_beats_wanda_beats_magnitude(pruned):
    # 2:4 separates the methods most clearly on this model (gaps of ~3%); at 50% the gaps are ~1%
    assert ppl(pruned, "sparsegpt 2:4") < ppl(pruned, "wanda 2:4") < ppl(pruned, "magnitude 2:4")
    assert ppl(pruned, "sparsegpt 50%") < ppl(pruned, "magnitude 50%")
    assert ppl(pruned, "obs 50%") < 1.01 * ppl(pruned, "sparsegpt 50%")  # exact OBS: at least as good


def test_compiled_pruned_model_matches_eager(pruned, setup):
    _, _, test_ids, seqlen = setup
    m, eager, _ = pruned["sparsegpt 2:4"]
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="sparsecc")
    assert perplexity(compiled, test_ids[: 8 * seqlen], seqlen) == pytest.approx(
        perplexity(m, test_ids[: 8 * seqlen], seqlen), rel=1e-4)


def test_plan_saved_and_replayed_gives_the_same_model(setup, pruned, tmp_path):
    model, batches, test_ids, seqlen = setup
    recipe = {"default": CONFIGS["sparsegpt 50%"], "lm_head": None}
    plan = sparsecc.calibrate(model, batches, recipe, progress=False)
    replayed = copy.deepcopy(model)
    sparsecc.sparsify_(replayed, sparsecc.Plan.load(plan.save(tmp_path / "plan")))
    direct = pruned["sparsegpt 50%"][0].state_dict()
    for k, v in replayed.state_dict().items():
        assert torch.equal(v, direct[k]), k


def test_cats_hits_its_activation_sparsity_on_held_out_text_and_degrades_like_the_seed(setup, dense_ppl):
    """CATS at 50/70/90% (thresholds from the training split): on the test windows the zeroed share
    of MLP neurons is within 2 points of the target, and perplexity follows the seed's shape --
    small losses at 50 and 70%, a large one at 90% (measured 2026-11-25: 55.2, 56.9, 64.7 vs 54.6)."""
    model, batches, test_ids, seqlen = setup
    held = list(test_ids.reshape(-1, seqlen).split(8))
    ppls = {}
    for target in (0.5, 0.7, 0.9):
        m = copy.deepcopy(model)
        sparsecc.sparsify_(m, {"re:.*mlp": sparsecc.CATSConfig(target)}, batches, progress=False)
        for name, share in sparsecc.activation_sparsity(m, held).items():
            assert abs(share - target) <= 0.02, (target, name, share)
        ppls[target] = perplexity(m, test_ids, seqlen)
    assert ppls[0.5] < 1.03 * dense_ppl and ppls[0.7] < 1.07 * dense_ppl, ppls
    assert ppls[0.7] < ppls[0.9] < 1.30 * dense_ppl, ppls


def test_quantization_quality_gptq_beats_rtn_and_joint_costs_little(setup, pruned, dense_ppl):
    """Measured 2026-11-30 on these 64 windows: GPTQ 4-bit 54.51 (dense 54.56), GPTQ 3-bit 55.76 vs
    RTN 3-bit 56.63, SparseGPT 50% 56.49 vs joint 50% + 4-bit 56.93. GPTQ without its error feedback is
    RTN, and a joint sweep that let the rounding errors go uncompensated falls toward prune-then-round."""
    model, batches, test_ids, seqlen = setup
    got = {}
    for name, cfg in {"gptq4": sparsecc.GPTQConfig(bits=4), "gptq3": sparsecc.GPTQConfig(bits=3),
                      "rtn3": sparsecc.RTNConfig(bits=3), "joint4": sparsecc.SparseGPTConfig(0.5, bits=4)}.items():
        m = copy.deepcopy(model)
        report = sparsecc.sparsify_(m, {"default": cfg, "lm_head": None}, batches, progress=False)
        assert all(r.get("quant", "").startswith(f"int{cfg.bits} ") for r in report.rows), name
        got[name] = perplexity(m, test_ids, seqlen)
    assert got["gptq4"] < 1.01 * dense_ppl, got
    assert got["gptq3"] < got["rtn3"] - 0.4, got
    assert got["joint4"] < 1.02 * ppl(pruned, "sparsegpt 50%"), got


@pytest.mark.parametrize("method, lr, least", [("full", 3e-4, 0.30), ("lora", 3e-3, 0.25)])
def test_fine_tuning_closes_part_of_the_2_4_gap(setup, pruned, dense_ppl, tiny_streams, method, lr, least):
    """60 steps of 8 windows (measured 2026-12-01: full 41%, LoRA 39% of the gap closed; 200 steps:
    69% / 65%, benchmarks/finetune_quality.py has the ref model). Zeros kept is finetune_'s own check."""
    _, _, test_ids, seqlen = setup
    m, before, _ = pruned["sparsegpt 2:4"]
    m = copy.deepcopy(m)
    train = sparsecc.sample_batches(tiny_streams[0], 60 * 8, seqlen, seed=1, batch_size=8)
    report = sparsecc.finetune_(m, train, steps=60, lr=lr, method=method, progress=False)
    after = perplexity(m, test_ids, seqlen)
    closed = (before - after) / (before - dense_ppl)
    assert closed >= least, f"{method} fine-tuning closed {closed:.0%} of the 2:4 gap ({before:.2f} -> {after:.2f})"
    assert report.frozen_zeros == sum(r["shape"][0] * r["shape"][1] // 2 for r in pruned["sparsegpt 2:4"][2].rows)
