"""Capture through dynamo finds linears and blocks generically, for every family."""
import pytest
import torch

import sparsecc
from conftest import FAMILIES

EXPECTED = {  # family -> (linear sites, block prefix)
    "llama": (15, "model.layers."), "mistral": (15, "model.layers."),
    "mixtral": (11, "model.layers."),  # 4 attention projections + router per block; experts are 3-D parameters
    "opt": (13, "model.decoder.layers."), "gpt2": (9, "transformer.h."),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_sites_and_blocks(family, make_model, batches):
    m = make_model(family)
    cap = sparsecc.capture(m, batches[0])
    n, prefix = EXPECTED[family]
    assert len(cap.sites) == n
    assert cap.blocks == [f"{prefix}0", f"{prefix}1"]
    for site in cap.sites.values():
        w = site.weight(m)
        assert tuple(w.shape) == (site.out_features, site.in_features)
        assert w.data_ptr() == m.get_parameter(site.param).data_ptr()  # a view, not a copy


def test_gpt2_conv1d_is_transposed(make_model, batches):
    cap = sparsecc.capture(make_model("gpt2"), batches[0])
    assert cap.sites["transformer.h.0.mlp.c_fc"].transposed
    assert (cap.sites["transformer.h.0.mlp.c_fc"].out_features, cap.sites["transformer.h.0.mlp.c_fc"].in_features) == (256, 64)


def test_tied_lm_head_is_owned_by_lm_head(make_model, batches):
    cap = sparsecc.capture(make_model("gpt2"), batches[0])
    assert cap.sites["lm_head"].param == "lm_head.weight"
    assert cap.sites["lm_head"].tied == ("transformer.wte.weight",)


def test_repeated_capture_does_not_exhaust_dynamo_cache(make_model, batches):
    for seed in range(12):
        assert len(sparsecc.capture(make_model("llama", seed), batches[0]).sites) == 15


def _raise(*_):
    raise RuntimeError("hook failed")


FAILURES = {  # how a batch makes the model's own code raise under dynamo
    "dict batch without input_ids": lambda m, ids: [{"attention_mask": torch.ones_like(ids)}],
    "forward hook that raises": lambda m, ids: m.model.layers[0].mlp.register_forward_hook(_raise) and [ids],
}


def _torch_without_regions(monkeypatch):
    """Make torch._dynamo.optimize refuse isolate_recompiles, as torch < 2.12 (the GPU machines' 2.11) does."""
    import importlib

    import torch._dynamo
    capture_mod = importlib.import_module("sparsecc.graph.capture")
    optimize = torch._dynamo.optimize

    def old_optimize(*args, **kwargs):
        if kwargs.pop("isolate_recompiles", False):
            raise TypeError("_optimize() got an unexpected keyword argument 'isolate_recompiles'")
        return optimize(*args, **kwargs)
    monkeypatch.setattr(torch._dynamo, "optimize", old_optimize)
    monkeypatch.setattr(capture_mod, "_region", None)
    monkeypatch.setattr(capture_mod, "_ISOLATED", True)


@pytest.mark.parametrize("regions", ["isolated", "torch<2.12"])
@pytest.mark.parametrize("then", ["sparsify_", "compile"])
@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_capture_failure_leaves_dynamo_as_it_was(failure, then, regions, make_model, batches, state_tools, monkeypatch):
    """Dynamo marks the frames a failing forward ran through "skip" for good, among them
    transformers' forward decorators that every model shares: later captures and compiles must not
    see that (it hid every linear from the next capture, and lm_head from torch.compile). Where
    torch has no isolated regions, capture clears dynamo's cache after a failure instead."""
    if regions != "isolated":
        _torch_without_regions(monkeypatch)
    torch._dynamo.reset()
    recipe = {"default": sparsecc.MagnitudeConfig(0.5)}
    eager = make_model("llama")
    sparsecc.sparsify_(eager, recipe, progress=False)
    snapshot, same_state = state_tools
    m = make_model("llama")
    snap = snapshot(m)
    with pytest.raises(sparsecc.CaptureError, match="LlamaForCausalLM"):
        sparsecc.sparsify_(m, {"default": sparsecc.WandaConfig(0.5)}, FAILURES[failure](m, batches[0]), progress=False)
    assert same_state(m, snap)
    if then == "sparsify_":
        report = sparsecc.sparsify_(make_model("llama"), {"default": sparsecc.WandaConfig(0.5)}, batches, progress=False)
        assert len(report.rows) == 15
        return
    with torch.no_grad():
        got = torch.compile(make_model("llama"), backend="sparsecc", options={"recipe": recipe})(batches[0]).logits
        torch.testing.assert_close(got, eager(batches[0]).logits, rtol=1e-4, atol=1e-4)  # lm_head pruned too
        compiled = torch.compile(make_model("llama"), backend="sparsecc", options={"recipe": {**recipe, "lm_head": None}})
        compiled(batches[0])  # lm_head is found, so the key matches


def test_captures_leave_the_recompile_limit_of_torch_compile_alone(batches):
    """Every capture recompiles the forward decorator transformers shares between models: past
    torch.compile's recompile limit (8), the user's compile ran eagerly and left lm_head dense."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(hidden):
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=128)).eval()
    torch._dynamo.reset()
    for hidden in range(32, 104, 8):  # 9 shapes, 9 compiles
        sparsecc.capture(make(hidden), batches[0])
    recipe = {"default": sparsecc.MagnitudeConfig(0.5)}
    eager = make(64)
    sparsecc.sparsify_(eager, recipe, progress=False)
    with torch.no_grad():
        got = torch.compile(make(64), backend="sparsecc", options={"recipe": recipe})(batches[0]).logits
        torch.testing.assert_close(got, eager(batches[0]).logits, rtol=1e-4, atol=1e-4)


def test_plain_modules_without_blocks():
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    cap = sparsecc.capture(m, torch.randn(3, 4))
    assert list(cap.sites) == ["0", "2"] and cap.blocks == []


FED = {"llama": ("model.layers.0.mlp.down_proj", 2), "opt": ("model.decoder.layers.0.fc2", 2),
       "gpt2": ("transformer.h.0.mlp.c_proj", 2), "mistral": ("model.layers.1.mlp.down_proj", 2)}


@pytest.mark.parametrize("family", sorted(FED))
def test_feeders_found_and_permuting_them_keeps_function(family, make_model, batches):
    m = make_model(family)
    cap = sparsecc.capture(m, batches[0])
    consumer, n = FED[family]
    site = cap.sites[consumer]
    assert len(site.feeders) == n
    # attention outputs mix heads and the residual stream feeds everything: never permutable
    assert not any(s.feeders for name, s in cap.sites.items() if "attn" in name or "lm_head" in name)
    with torch.no_grad():
        before = m(batches[0]).logits
        perm = torch.randperm(site.in_features, generator=torch.Generator().manual_seed(0))
        for name, transposed in site.feeders:
            t = m.get_parameter(name).data
            view = t.t() if transposed else t
            view.copy_(view[perm].clone())
        w = site.weight(m)
        w.copy_(w[:, perm].clone())
        after = m(batches[0]).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_linears_reading_one_input_are_grouped(make_model, batches):
    """q/k/v and gate/up read one tensor; o, down and GPT-2's fused c_attn read their own."""
    from sparsecc.graph.capture import capture
    groups = {f: set(capture(make_model(f), batches[0]).same_input.values()) for f in ("llama", "opt", "gpt2")}
    attn, mlp = "model.layers.1.self_attn.", "model.layers.1.mlp."
    assert (attn + "q_proj", attn + "k_proj", attn + "v_proj") in groups["llama"]
    assert (mlp + "gate_proj", mlp + "up_proj") in groups["llama"] and len(groups["llama"]) == 4  # 2 per block
    assert {len(g) for g in groups["opt"]} == {3} and len(groups["opt"]) == 2
    assert groups["gpt2"] == set()


def test_a_module_called_twice_shares_with_nothing():
    from torch import nn

    from sparsecc.graph.capture import capture

    class TwoCalls(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.a(x) + self.b(x) + self.c(x) + self.a(x * 2)  # a also reads another input

    captured = capture(TwoCalls(), torch.randn(2, 8))
    assert set(captured.same_input.values()) == {("b", "c")}
