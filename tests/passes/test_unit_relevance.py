"""Bonsai's unit relevance (passes/analysis/unit_relevance.py): the ridge fit, shapes, determinism,
the model left untouched, padding, the cost, and that dead units come out irrelevant and units
that carry the model's predictions most relevant."""
import pytest
import torch

import sparsecc
from sparsecc.graph.capture import capture
from sparsecc.passes.analysis import PRODUCERS, CollectUnitRelevance
from sparsecc.passes.analysis.unit_relevance import fit_relevance
from sparsecc.passes.pipeline import Pipeline
from sparsecc.techniques.structured import StructuredConfig

MLP1 = "model.layers.1.mlp"


def _relevance(model, batches, cap, names=None, kw=None, **cfg):
    """ctx.stats["unit_relevance"] for the gated MLPs and attention modules of `names` (None: all)."""
    config = StructuredConfig(cfg.pop("sparsity", 0.5), score="bonsai", **cfg)
    targets = {n: (config, s) for n, s in {**cap.gated, **cap.heads}.items() if names is None or n in names}
    res = Pipeline([CollectUnitRelevance(targets, **(kw or {}))], progress=False).run(model, batches, cap,
                                                                                       keep_changes=False)
    return res.stats["unit_relevance"]


def _spearman(a, b):
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def test_fit_recovers_known_coefficients():
    g = torch.Generator().manual_seed(0)
    beta = torch.randn(40, generator=g, dtype=torch.float64)
    p = torch.rand(40, generator=g) * 0.8 + 0.1
    masks = torch.rand(400, 40, generator=g) < p
    losses = 3.0 + masks.double() @ beta
    torch.testing.assert_close(fit_relevance(masks, losses, ridge=1e-8), -beta, rtol=0, atol=1e-5)
    # with noise, fewer samples than units, and the default ridge: the ranking survives
    beta = torch.randn(300, generator=g, dtype=torch.float64)
    masks = torch.rand(200, 300, generator=g) < 0.5
    losses = masks.double() @ beta + 0.5 * torch.randn(200, generator=g, dtype=torch.float64)
    assert _spearman(fit_relevance(masks, losses), -beta) > 0.5


def test_registered_and_whole_model():
    assert PRODUCERS["unit_relevance"] is CollectUnitRelevance and CollectUnitRelevance.whole_model
    assert "unit_relevance" in sparsecc.techniques.structured.StructuredTechnique().needs(
        StructuredConfig(0.5, score="bonsai"))


def test_shapes_for_every_mlp_and_attention_module(make_model, batches, state_tools):
    snapshot, same = state_tools
    model = make_model("llama")
    snap = snapshot(model)
    rel = _relevance(model, batches, capture(model, batches[0]), samples=8)
    assert set(rel) == {"model.layers.0.mlp", MLP1, "model.layers.0.self_attn", "model.layers.1.self_attn"}
    for name, r in rel.items():
        assert r.dtype == torch.float32 and r.device.type == "cpu" and torch.isfinite(r).all()
        assert r.shape == ((128,) if name.endswith("mlp") else (4,))  # channels; query heads
    assert same(model, snap) and not any(m._forward_pre_hooks for m in model.modules())


def test_a_dead_head_comes_out_irrelevant(make_model, batches):
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[:, 32:48] = 0  # head 2 (head_dim 16) cannot matter
    heads = ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    r = _relevance(model, batches, capture(model, batches[0]), heads, samples=48)["model.layers.1.self_attn"].abs()
    assert r[2] < 0.2 * r.max()  # the mask spans the head's 16 consecutive input columns of o_proj


def test_deterministic_with_a_seed(make_model, batches):
    model = make_model("llama")
    cap = capture(model, batches[0])
    a, b, c = (_relevance(model, batches, cap, [MLP1], samples=16, seed=s)[MLP1] for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cost_and_batches_per_sample(make_model, batches):
    model = make_model("llama")
    cap = capture(model, batches[0])
    calls = []
    model.lm_head.register_forward_hook(lambda *_: calls.append(1))  # only whole-model forwards reach it
    _relevance(model, batches, cap, [MLP1], samples=10)
    assert len(calls) == 10 * 3
    calls.clear()
    rel = _relevance(model, batches, cap, [MLP1], kw={"batches_per_sample": 1}, samples=10)
    assert len(calls) == 10 * 1 + 3 and torch.isfinite(rel[MLP1]).all()  # + the dense loss of each batch


def test_padding_is_skipped(make_model, batches):
    model = make_model("llama")
    cap = capture(model, batches[0])
    plain = _relevance(model, batches, cap, [MLP1], samples=12)[MLP1]
    padded = [{"input_ids": torch.cat([b, torch.full((2, 5), 3)], 1),
               "attention_mask": torch.cat([torch.ones(2, 16), torch.zeros(2, 5)], 1).long()} for b in batches]
    torch.testing.assert_close(_relevance(model, padded, cap, [MLP1], samples=12)[MLP1], plain, rtol=1e-3, atol=1e-6)


def test_hooks_removed_on_error(make_model, batches, state_tools):
    snapshot, same = state_tools
    model = make_model("llama")
    snap = snapshot(model)
    with pytest.raises(sparsecc.CalibrationError, match="2 real tokens"):
        _relevance(model, [b[:, :1] for b in batches], capture(model, batches[0]), [MLP1], samples=2)
    assert same(model, snap) and not any(m._forward_pre_hooks for m in model.modules())


def test_dead_channels_come_out_irrelevant(make_model, batches):
    """Half the channels of block 1's MLP get zero down_proj columns: they cannot change the loss.
    The other channels of a random model may help or hurt; only |relevance| separates them."""
    model = make_model("llama")
    dead = torch.randperm(128, generator=torch.Generator().manual_seed(0))[:64]
    with torch.no_grad():
        model.get_submodule(MLP1).down_proj.weight[:, dead] = 0
    batch = torch.cat(batches)  # one batch of [6, 16]: 256 forwards for 128 units
    r = _relevance(model, [batch], capture(model, batch), [MLP1], samples=256)[MLP1].abs()
    live = torch.ones(128, dtype=torch.bool)
    live[dead] = False
    assert r[dead].mean() < 0.25 * r[live].mean()
    assert (r.argsort(descending=True).argsort()[dead] >= 64).float().mean() > 0.75  # mostly the lower half


def test_channels_that_carry_the_predictions_rank_first(make_model):
    """Block 0's MLP made to predict a cycle of 12 tokens (attention and block 1's MLP silenced):
    channel j fires on token j (gate and up rows = its embedding's direction; silu(z)·z >= 0) and
    writes the lm_head direction of the token after j. The calibration text follows the cycle.
    Dropping the channel of a cycle token loses that prediction; other channels barely fire, and
    4 cycle channels are dead (zero down_proj columns, as are 60 other channels)."""
    model = make_model("llama")
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(0))
    dead, cycle = perm[:64], perm[60:72]  # 4 of the cycle's channels are dead
    emb, head, mlp = model.model.embed_tokens.weight, model.lm_head.weight, model.model.layers[0].mlp
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
        head.mul_(10)
        direction = emb / emb.norm(dim=1, keepdim=True)
        mlp.gate_proj.weight.copy_(direction)
        mlp.up_proj.weight.copy_(direction)
        following = torch.arange(128)
        following[cycle] = cycle.roll(-1)
        mlp.down_proj.weight.copy_(0.05 * (head[following] / head[following].norm(dim=1, keepdim=True)).T)
        mlp.down_proj.weight[:, dead] = 0
    starts = torch.randint(0, 12, (6, 1), generator=torch.Generator().manual_seed(1))
    batch = cycle[(starts + torch.arange(16)) % 12]
    name = "model.layers.0.mlp"
    r = _relevance(model, [batch], capture(model, batch), [name], samples=256)[name]
    carrying = perm[64:72]
    assert set(r.argsort(descending=True)[:8].tolist()) == set(carrying.tolist())
    assert r[perm[60:64]].abs().max() < 0.5 * r[carrying].min()  # the dead ones of the cycle
