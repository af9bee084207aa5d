"""LayerDropConfig: whole decoder blocks removed by Block Influence (ShortGPT) or calibration loss, the
rest renumbered; the KV cache and generate, composition with pruning (stages), plans, checkpoints
(load_pruned and plain from_pretrained), the command line, bad input and failures."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecc
from sparsecc.techniques.rewrites import restore_rewrites

VOCAB = 128


def llama4():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, max_position_embeddings=64, hidden_size=64,
                                        intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                        num_key_value_heads=2)).eval()


def qwen4():
    """Four blocks of two attention types: config.layer_types must be sliced with the blocks."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, max_position_embeddings=64, hidden_size=64,
                                        intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                        num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                                        max_window_layers=2)).eval()


def calib(seed=0, n=8):
    ids = torch.randint(0, VOCAB, (4096,), generator=torch.Generator().manual_seed(seed))
    return sparsecc.sample_batches(ids, n, 16, seed=seed, batch_size=4)


def stack(model) -> tuple[str, nn.ModuleList]:
    names = {n: m for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n.endswith("layers")}
    return next(iter(names.items()))


class Skip(nn.Module):
    """A block replaced by the identity: its input hidden state passes through, in its output's form."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        out = self.block(*args, **kwargs)
        x = args[0] if args else kwargs["hidden_states"]
        return (x, *out[1:]) if isinstance(out, tuple) else x


def with_skipped(model, drop):
    ref = copy.deepcopy(model)
    _, layers = stack(ref)
    for i in drop:
        layers[i] = Skip(layers[i])
    return ref


def logits(model, x):
    with torch.no_grad():
        return model(x, use_cache=False).logits


def block_io(model, batches):
    """{block index: [(input, output)] per batch} of the dense model, by forward hooks."""
    seen = {}
    _, layers = stack(model)
    handles = [blk.register_forward_hook(
        lambda m, a, k, o, i=i: seen.setdefault(i, []).append((a[0] if a else k["hidden_states"],
                                                              o[0] if isinstance(o, tuple) else o)),
        with_kwargs=True) for i, blk in enumerate(layers)]
    with torch.no_grad():
        for b in batches:
            model(**b, use_cache=False) if isinstance(b, dict) else model(b, use_cache=False)
    for h in handles:
        h.remove()
    return seen


def test_block_influence_is_one_minus_the_mean_cosine_over_real_tokens():
    model = llama4()
    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(0, VOCAB, (2, 12), generator=g),
                "attention_mask": torch.tensor([[1] * 12, [0] * 4 + [1] * 8])} for _ in range(2)]
    plan = sparsecc.calibrate(model, batches, {"model.layers": sparsecc.LayerDropConfig(n=1)}, progress=False)
    expect = []
    for i, pairs in sorted(block_io(model, batches).items()):
        cos = [F.cosine_similarity(x.double(), y.double(), dim=-1)[b["attention_mask"].bool()]
               for (x, y), b in zip(pairs, batches)]
        expect.append(1 - float(torch.cat(cos).mean()))
    scores = plan.decisions["model.layers"]["scores"]
    torch.testing.assert_close(scores, torch.tensor(expect, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    assert plan.decisions["model.layers"]["drop"].tolist() == [min(range(4), key=expect.__getitem__)]


def test_loss_score_is_the_loss_increase_with_the_block_skipped():
    model, batches = llama4(), calib(n=4)

    def loss(m):
        total = count = 0
        for b in batches:
            out = logits(m, b)
            total += float(F.cross_entropy(out[:, :-1].reshape(-1, VOCAB), b[:, 1:].reshape(-1), reduction="sum"))
            count += b[:, 1:].numel()
        return total / count

    dense = loss(model)
    expect = torch.tensor([loss(with_skipped(model, [i])) - dense for i in range(4)], dtype=torch.float64)
    plan = sparsecc.calibrate(model, batches, {"model.layers": sparsecc.LayerDropConfig(n=2, score="loss")},
                              progress=False)
    torch.testing.assert_close(plan.decisions["model.layers"]["scores"], expect, rtol=1e-4, atol=1e-5)
    assert plan.decisions["model.layers"]["drop"].tolist() == sorted(expect.argsort()[:2].tolist())


@pytest.mark.parametrize("family, n, score", [("llama4", 2, "bi"), ("qwen4", 2, "loss"), ("opt", 1, "bi"),
                                               ("mistral", 1, "loss")])
def test_the_dropped_model_is_the_model_with_those_blocks_skipped_and_generates(family, n, score, make_model):
    model = {"llama4": llama4, "qwen4": qwen4}[family]() if family in ("llama4", "qwen4") else make_model(family)
    name, layers = stack(model)
    count, types = len(layers), getattr(model.config, "layer_types", None)
    dropped = copy.deepcopy(model)
    report = sparsecc.sparsify_(dropped, {name: sparsecc.LayerDropConfig(n=n, score=score)}, calib(), progress=False)
    (row,) = report.rows
    assert row["module"] == name and len(row["dropped"]) == n and row["blocks"] == count
    kept = [i for i in range(count) if i not in row["dropped"]]
    _, new_layers = stack(dropped)
    assert len(new_layers) == dropped.config.num_hidden_layers == count - n
    assert all(torch.equal(next(new_layers[j].parameters()), next(layers[i].parameters())) for j, i in enumerate(kept))
    assert [m.layer_idx for m in dropped.modules() if hasattr(m, "layer_idx") and not isinstance(m, nn.ModuleList)
            and m.__class__.__name__.endswith("Attention")] == list(range(count - n))
    if types is not None:
        assert dropped.config.layer_types == [types[i] for i in kept]
    x = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(logits(dropped, x), logits(with_skipped(model, row["dropped"]), x), rtol=1e-5, atol=1e-5)
    prompt = x[:1, :6]
    cached = dropped.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True)
    plain = dropped.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False)
    assert cached.shape == (1, 11) and torch.equal(cached, plain)


def test_drop_and_wanda_in_one_recipe_equal_two_calls_and_wanda_sees_the_new_names():
    model, batches = llama4(), calib()
    drop, wanda = sparsecc.LayerDropConfig(n=2), sparsecc.WandaConfig(0.5)
    one = copy.deepcopy(model)
    recipe = sparsecc.load_recipe({"default": {"method": "wanda", "sparsity": 0.5}, "lm_head": None,
                                   "model.layers": {"method": "layerdrop", "n": 2}})
    report = sparsecc.sparsify_(one, recipe, batches, progress=False, debug=True)  # checks after every pass
    two = copy.deepcopy(model)
    sparsecc.sparsify_(two, {"model.layers": drop}, batches, progress=False)
    sparsecc.sparsify_(two, {"default": wanda, "lm_head": None}, batches, progress=False)
    assert [r["module"] for r in report.rows][:2] == ["model.layers", "model.layers.0.self_attn.q_proj"]
    assert {r["module"].split(".")[2] for r in report.rows[1:]} == {"0", "1"}  # renumbered before resolving
    for (k, v), (k2, v2) in zip(one.state_dict().items(), two.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k
    # keys name modules after the drop: block 3 is gone once two blocks are
    with pytest.raises(sparsecc.RecipeError, match="model.layers.3"):
        sparsecc.sparsify_(copy.deepcopy(model), {"model.layers": drop, "model.layers.3": wanda}, batches, progress=False)


def test_plan_round_trip_replays_both_stages(tmp_path, state_tools):
    snapshot, same_state = state_tools
    model, batches = llama4(), calib()
    recipe = {"model.layers": sparsecc.LayerDropConfig(n=1, score="loss"), "re:.*mlp\\..*": sparsecc.SparseGPTConfig(0.5)}
    before = snapshot(model)
    plan = sparsecc.calibrate(model, batches, recipe, progress=False)
    assert same_state(model, before) and len(model.model.layers) == model.config.num_hidden_layers == 4
    assert list(plan.configs)[0] == "model.layers" and len(plan.stages()) == 2
    plan.save(tmp_path / "plan")
    loaded = sparsecc.Plan.load(tmp_path / "plan")
    assert torch.equal(loaded.decisions["model.layers"]["drop"], plan.decisions["model.layers"]["drop"])
    replayed, direct = copy.deepcopy(model), copy.deepcopy(model)
    report = sparsecc.sparsify_(replayed, loaded)
    sparsecc.sparsify_(direct, recipe, batches, progress=False)
    assert [r["module"] for r in report.rows][0] == "model.layers" and len(report.rows) == 1 + 3 * 3
    x = torch.randint(0, VOCAB, (2, 10))
    assert torch.equal(logits(replayed, x), logits(direct, x))
    with pytest.raises(sparsecc.PlanError, match="already rewritten"):  # a plan applies to the model it was made on
        sparsecc.sparsify_(replayed, loaded)


@pytest.mark.parametrize("make", [llama4, qwen4])
def test_checkpoints_load_with_load_pruned_and_plain_from_pretrained(make, tmp_path):
    from transformers import AutoModelForCausalLM
    model = make()
    recipe = {"model.layers": sparsecc.LayerDropConfig(n=2), "default": sparsecc.MagnitudeConfig(0.5), "lm_head": None}
    report = sparsecc.sparsify_(model, recipe, calib(), progress=False)
    sparsecc.save_pruned(model, tmp_path / "out", report, recipe=recipe)
    x = torch.randint(0, VOCAB, (2, 10))
    loaded, meta = sparsecc.load_pruned(tmp_path / "out")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    for m in (loaded, plain):
        assert m.config.num_hidden_layers == len(m.model.layers) == 2
        assert getattr(m.config, "layer_types", None) == getattr(model.config, "layer_types", None)
        torch.testing.assert_close(logits(m, x), logits(model, x), rtol=0, atol=0)
    assert plain.generate(x[:1, :4], max_new_tokens=5, do_sample=False).shape == (1, 9)
    # into a model that still has every block: restore drops the same blocks
    full = make()
    restore_rewrites(full, meta["rows"])
    full.load_state_dict(model.state_dict())
    torch.testing.assert_close(logits(full, x), logits(model, x), rtol=0, atol=0)
    into, _ = sparsecc.load_pruned(tmp_path / "out", model=make())  # the same through load_pruned(model=)
    assert len(into.model.layers) == 2
    torch.testing.assert_close(logits(into, x), logits(model, x), rtol=0, atol=0)


def test_bad_input_is_one_line_and_changes_nothing(state_tools):
    snapshot, same_state = state_tools
    model, batches = llama4(), calib()
    before = snapshot(model)
    for bad in (dict(n=0), dict(n=-1), dict(n=1.5), dict(n=True), dict(score="x")):
        with pytest.raises(sparsecc.RecipeError) as e:
            sparsecc.LayerDropConfig(**bad)
        assert "\n" not in str(e.value)
    for n in (4, 5):
        with pytest.raises(sparsecc.RecipeError, match=f"n={n}.*every one of its 4 blocks.*at most 3") as e:
            sparsecc.sparsify_(model, {"model.layers": sparsecc.LayerDropConfig(n=n)}, batches, progress=False)
        assert "\n" not in str(e.value)
    with pytest.raises(sparsecc.RecipeError, match="LayerDropConfig.*score"):
        sparsecc.load_recipe({"model.layers": {"method": "layerdrop", "n": 1, "score": "cos"}})
    with pytest.raises(sparsecc.CalibrationError, match="calibration data"):
        sparsecc.sparsify_(model, {"model.layers": sparsecc.LayerDropConfig(n=1)})
    with pytest.raises(sparsecc.RecipeError, match="runs before the rest"):  # one pipeline cannot hold both stages
        sparsecc.Pipeline.from_recipe(model, {"model.layers": sparsecc.LayerDropConfig(), "default": sparsecc.WandaConfig()},
                                      batches)
    assert same_state(model, before) and len(model.model.layers) == model.config.num_hidden_layers == 4


@pytest.mark.parametrize("verb", ["sparsify_", "calibrate"])
def test_a_failure_in_the_second_stage_restores_every_block(verb, monkeypatch, state_tools):
    from sparsecc.techniques.pruning import Wanda
    snapshot, same_state = state_tools
    model, batches = llama4(), calib()
    before, layers = snapshot(model), list(model.model.layers)
    calls = []

    def fail(self, config, site, weight, stats):
        calls.append(site.name)
        if len(calls) > 3:  # after some of the shrunk model's linears were pruned
            raise RuntimeError("boom")
        return original(self, config, site, weight, stats)

    original = Wanda.plan
    monkeypatch.setattr(Wanda, "plan", fail)
    # drops blocks 0 and 2 (tests above): the linears pruned before the failure are those of old block 1, now
    # model.layers.0, so restoring them by name once the blocks are back would corrupt block 0
    recipe = {"model.layers": sparsecc.LayerDropConfig(n=2, score="loss"), "default": sparsecc.WandaConfig(0.5),
              "lm_head": None}
    with pytest.raises(RuntimeError, match="boom"):
        getattr(sparsecc, verb)(*((model, recipe, batches) if verb == "sparsify_" else (model, batches, recipe)),
                                progress=False)
    assert calls[0].startswith("model.layers.0.")
    assert list(model.model.layers) == layers and model.config.num_hidden_layers == 4
    assert [blk.self_attn.layer_idx for blk in model.model.layers] == [0, 1, 2, 3]
    assert same_state(model, before)
    assert "sparsecc_rewritten" not in model.model.layers.__dict__


def test_command_line_recipe_drops_blocks(tiny_zoo, tmp_path, capsys):
    from sparsecc.tools import cli
    from sparsecc.zoo import load_tokens
    model, tok, _, _ = tiny_zoo
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    (tmp_path / "calib.txt").write_text(tok.decode(load_tokens().train[:8_000].tolist()))
    (tmp_path / "recipe.yaml").write_text("model.layers: {method: layerdrop, n: 1}\n"
                                          "default: {method: wanda, sparsity: 0.5}\nlm_head: null\n")
    code = cli.main([str(a) for a in ("prune", tmp_path / "tiny", "--recipe", tmp_path / "recipe.yaml", "--calib",
                                      tmp_path / "calib.txt", "--out", tmp_path / "out", "--nsamples", 4,
                                      "--seqlen", 64, "--quiet", "--save-plan")])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "LayerDrop" in out.out
    loaded, meta = sparsecc.load_pruned(tmp_path / "out")
    assert loaded.config.num_hidden_layers == len(loaded.model.layers) == 1
    assert meta["rows"][0]["technique"] == "LayerDropConfig" and len(meta["rows"]) == 1 + 7


# score="l0": learned hard-concrete gates over whole blocks (issue 17's layer gates)

def l0(n, **kw):
    return {"model.layers": sparsecc.LayerDropConfig(n=n, score="l0", **{"steps": 20, **kw})}


def test_l0_drops_exactly_n_blocks_and_the_model_runs_and_generates():
    model, batches = llama4(), calib()
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.train()  # the gates train in eval mode; the mode is restored
    plan = sparsecc.calibrate(model, batches, l0(2), progress=False)
    assert model.training and {name: p.requires_grad for name, p in model.named_parameters()} == flags
    scores, drop = plan.decisions["model.layers"]["scores"], plan.decisions["model.layers"]["drop"]
    assert scores.shape == (4,) and bool(torch.isfinite(scores).all())
    assert drop.tolist() == sorted(scores.argsort()[:2].tolist())  # the two lowest log_alpha
    model.eval()
    dropped = copy.deepcopy(model)
    (row,) = sparsecc.sparsify_(dropped, l0(2), batches, progress=False).rows
    assert row["dropped"] == drop.tolist() and len(dropped.model.layers) == dropped.config.num_hidden_layers == 2
    x = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(logits(dropped, x), logits(with_skipped(model, row["dropped"]), x), rtol=1e-5, atol=1e-5)
    out = dropped.generate(x[:1, :6], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 10)


def test_l0_scores_are_deterministic_given_the_seed_and_depend_on_it():
    batches = calib()

    def scores(**kw):
        return sparsecc.calibrate(llama4(), batches, l0(1, **kw), progress=False).decisions["model.layers"]["scores"]

    a, b = scores(seed=3), scores(seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, scores(seed=4))


def test_l0_gates_match_the_module_docstring_and_reach_the_target(monkeypatch):
    """E (the expected number of blocks kept) is driven from init_keep * L toward L - n."""
    from sparsecc.passes.analysis import block_influence
    model, batches = llama4(), calib()
    history = []
    real = block_influence.gated_blocks
    monkeypatch.setattr(block_influence, "gated_blocks",
                        lambda *a, **k: real(*a, **{**k, "history": history}))
    sparsecc.calibrate(model, batches, l0(2, steps=120, warmup=0.25), progress=False)
    assert len(history) == 120 and abs(history[0][1] - 0.95 * 4) < 0.1
    assert abs(history[-1][1] - 2) < 0.5


@pytest.mark.parametrize("block", [0, 1])
def test_l0_drops_a_block_that_does_nothing_in_a_trained_model(block, tiny_zoo, tiny_streams):
    model = copy.deepcopy(tiny_zoo[0])
    with torch.no_grad():  # the block's residual branches write zeros: it is the identity
        model.model.layers[block].self_attn.o_proj.weight.zero_()
        model.model.layers[block].mlp.down_proj.weight.zero_()
    batches = sparsecc.sample_batches(tiny_streams[0], 8, 64, seed=0, batch_size=4)
    plan = sparsecc.calibrate(model, batches, l0(1, steps=30), progress=False)
    assert plan.decisions["model.layers"]["drop"].tolist() == [block]


def test_l0_bad_config_is_one_line_naming_the_fix():
    for bad, field in ((dict(steps=0), "steps"), (dict(steps=2.5), "steps"), (dict(steps=True), "steps"),
                       (dict(lr=0), "lr"), (dict(lr=-1.0), "lr"), (dict(lambda_lr="x"), "lambda_lr"),
                       (dict(init_keep=1.0), "init_keep"), (dict(init_keep=0), "init_keep"),
                       (dict(warmup=1.5), "warmup"), (dict(warmup=-0.1), "warmup"),
                       (dict(seed=-1), "seed"), (dict(seed=1.0), "seed")):
        with pytest.raises(sparsecc.RecipeError, match=rf"LayerDropConfig\.{field}\b.*e\.g\.") as e:
            sparsecc.LayerDropConfig(n=1, score="l0", **bad)
        assert "\n" not in str(e.value)
    with pytest.raises(sparsecc.RecipeError, match="LayerDropConfig.steps"):
        sparsecc.load_recipe({"model.layers": {"method": "layerdrop", "n": 1, "score": "l0", "steps": 0}})


def test_l0_failure_changes_nothing_and_restores_grad_flags_and_mode(monkeypatch, state_tools):
    from sparsecc.passes.analysis import block_influence
    snapshot, same_state = state_tools
    model, batches = llama4(), calib()
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.train()
    before = snapshot(model)
    calls = []
    real = block_influence.token_loss

    def fail(*a, **k):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(block_influence, "token_loss", fail)
    with pytest.raises(RuntimeError, match="boom"):
        sparsecc.sparsify_(model, l0(1), batches, progress=False)
    assert model.training and {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(not m._forward_hooks for m in model.modules())
    assert same_state(model, before) and len(model.model.layers) == 4
    with torch.inference_mode(), pytest.raises(sparsecc.CalibrationError, match="inference_mode"):
        sparsecc.sparsify_(model, l0(1), batches, progress=False)
    assert same_state(model, before) and len(model.model.layers) == 4


def test_l0_recipe_round_trips_with_its_fields():
    cfg = sparsecc.LayerDropConfig(n=2, score="l0", steps=7, lr=0.05, lambda_lr=0.2, init_keep=0.9, warmup=0.3, seed=5)
    data = sparsecc.dump_recipe({"model.layers": cfg})
    assert {k: data["model.layers"][k] for k in ("steps", "lr", "lambda_lr", "init_keep", "warmup", "seed")} == \
        dict(steps=7, lr=0.05, lambda_lr=0.2, init_keep=0.9, warmup=0.3, seed=5)
    assert sparsecc.load_recipe(data)["model.layers"] == cfg
    import json
    assert sparsecc.load_recipe(json.loads(json.dumps(data)))["model.layers"] == cfg
    short = sparsecc.load_recipe({"model.layers": {"method": "layerdrop", "n": 1, "score": "l0"}})["model.layers"]
    assert short == sparsecc.LayerDropConfig(n=1, score="l0") and short.steps == 100 and short.seed == 0
