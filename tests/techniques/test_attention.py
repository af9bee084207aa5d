"""Attention rewrites on transformers models: window >= length is the model itself, streaming
token by token with the rolling cache equals the masked full-sequence forward, the cache stays
bounded (also under generate and torch.compile, which does not recompile as the stream grows),
checkpoints, composition with weight pruning and CATS, and bad input."""
import copy

import pytest
import torch
from transformers import DynamicCache, StaticCache

import sparsecc
from sparsecc.techniques import attention

ATTN = {"gpt2": "re:.*attn"}


def key(family):
    return ATTN.get(family, "re:.*self_attn")


def stream(model, ids, cache=None):
    """Logits of feeding ids one token at a time, and the largest cache length seen."""
    cache = DynamicCache() if cache is None else cache
    logits, longest = [], 0
    with torch.no_grad():
        for t in range(ids.shape[1]):
            logits.append(model(ids[:, t:t + 1], **sparsecc.cache_kwargs(cache), use_cache=True).logits)
            longest = max(longest, *sparsecc.kv_cache_lengths(cache))
    return torch.cat(logits, 1), longest


@pytest.mark.parametrize("family", ["llama", "mistral", "opt", "gpt2"])
def test_window_covering_the_sequence_is_the_original_model(make_model, family):
    """... and for Mistral, whose own attention is a sliding window, the same window is the model."""
    model = make_model(family)
    ids = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    window = getattr(model.config, "sliding_window", None) or 30
    report = sparsecc.sparsify_(model, {key(family): sparsecc.SlidingWindowConfig(window=window)}, progress=False)
    assert [r["technique"] for r in report.rows] == ["SlidingWindowConfig"] * 2
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,config,bound", [
    ("llama", sparsecc.AttentionSinkConfig(sinks=2, window=6), 2 + 5),
    ("llama", sparsecc.AttentionSinkConfig(sinks=3, cache_size=8, shift_positions=False), 3 + 4),
    ("mistral", sparsecc.AttentionSinkConfig(sinks=1, window=5), 1 + 4),
    ("llama", sparsecc.SlidingWindowConfig(window=4, dilation=2, global_tokens=1), 1 + 6),
    ("gpt2", sparsecc.AttentionSinkConfig(sinks=2, window=5, shift_positions=False), 2 + 4),
    ("opt", sparsecc.SlidingWindowConfig(window=7), 6),
])
def test_streaming_with_the_rolling_cache_equals_the_masked_forward(make_model, family, config, bound):
    model = make_model(family)
    sparsecc.sparsify_(model, {key(family): config}, progress=False)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
    steps, longest = stream(model, ids)
    assert longest == bound  # never more than sinks + window - 1 kept between steps
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)
    # a prefill chunk then token-by-token decode gives the same logits too
    cache = DynamicCache()
    with torch.no_grad():
        head = model(ids[:, :17], **sparsecc.cache_kwargs(cache), use_cache=True).logits
    tail, _ = stream(model, ids[:, 17:], cache)
    torch.testing.assert_close(torch.cat([head, tail], 1), full, rtol=1e-4, atol=1e-4)


def test_sinks_matter_once_tokens_are_evicted(make_model):
    """With eviction, sinks + window differs from window alone, and shifting positions changes
    the sink scores; before any eviction every form is the dense model."""
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(2))
    outs = {}
    for name, cfg in {"dense": None, "window": sparsecc.SlidingWindowConfig(window=6),
                      "sinks": sparsecc.AttentionSinkConfig(sinks=2, window=6),
                      "noshift": sparsecc.AttentionSinkConfig(sinks=2, window=6, shift_positions=False)}.items():
        model = make_model("llama")
        if cfg is not None:
            sparsecc.sparsify_(model, {"re:.*self_attn": cfg}, progress=False)
        with torch.no_grad():
            outs[name] = model(ids).logits[0]
    for name in ("window", "sinks", "noshift"):
        torch.testing.assert_close(outs[name][:6], outs["dense"][:6])
    assert not torch.allclose(outs["sinks"][10:], outs["window"][10:], atol=1e-3)
    assert not torch.allclose(outs["sinks"][10:], outs["noshift"][10:], atol=1e-3)
    torch.testing.assert_close(outs["sinks"][:8], outs["noshift"][:8])  # no shift until a token is evicted


def test_generate_streams_with_a_bounded_cache(make_model):
    model = make_model("llama")
    sparsecc.sparsify_(model, {"re:.*self_attn": sparsecc.AttentionSinkConfig(sinks=2, window=8)}, progress=False)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(3))
    out = model.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape == (1, 45)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    assert max(sparsecc.kv_cache_lengths(cache)) == 2 + 7
    steps, _ = stream(model, out.sequences[:, :-1])
    # greedy choices are the streamed argmax (after the first, where min_new_tokens barred EOS)
    assert torch.equal(steps.argmax(-1)[0, 5:], out.sequences[0, 6:])


def test_compiled_model_streams_without_recompiling(make_model):
    from torch._dynamo.utils import counters

    model = make_model("llama")
    sparsecc.sparsify_(model, {"re:.*self_attn": sparsecc.AttentionSinkConfig(sinks=2, window=6)}, progress=False)
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(4))
    eager, _ = stream(model, ids)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="sparsecc")
    cache, logits = DynamicCache(), []
    with torch.no_grad():
        for t in range(ids.shape[1]):
            logits.append(compiled(ids[:, t:t + 1], **sparsecc.cache_kwargs(cache), use_cache=True).logits)
            if t == 15:  # the cache has been full for several steps
                graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs
    assert max(sparsecc.kv_cache_lengths(cache)) == 2 + 5
    torch.testing.assert_close(torch.cat(logits, 1), eager, rtol=1e-4, atol=1e-4)


def test_composes_with_nm_pruning_and_cats(make_model):
    model = make_model("llama")
    ids = torch.randint(0, 128, (4096,), generator=torch.Generator().manual_seed(5))
    report = sparsecc.sparsify_(model, {"default": sparsecc.SparseGPTConfig(pattern="2:4"), "lm_head": None,
                                        "re:.*mlp": sparsecc.CATSConfig(0.5),
                                        "re:.*self_attn": sparsecc.AttentionSinkConfig(sinks=2, window=6)},
                                sparsecc.sample_batches(ids, 8, 16, seed=0), progress=False)
    kinds = {r["technique"] for r in report.rows}
    assert kinds == {"SparseGPTConfig", "CATSConfig", "AttentionSinkConfig"}
    assert "w=6 s=2" in report.table()
    q = model.get_submodule("model.layers.0.self_attn.q_proj").weight
    assert (q.reshape(-1, 4) != 0).sum(-1).max() <= 2
    x = ids[:25][None]
    with torch.no_grad():
        full = model(x).logits
    steps, longest = stream(model, x)
    assert longest == 2 + 5
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)


def test_checkpoint_round_trip_restores_the_attention_form(make_model, tmp_path):
    model = make_model("llama")
    report = sparsecc.sparsify_(model, {"re:.*self_attn": sparsecc.AttentionSinkConfig(sinks=1, window=4),
                                        "re:.*mlp.*": sparsecc.MagnitudeConfig(0.5)}, progress=False)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        before = model(ids).logits
    sparsecc.save_pruned(model, tmp_path / "ck", report)
    loaded, meta = sparsecc.load_pruned(tmp_path / "ck")
    assert isinstance(loaded.model.layers[1].self_attn.sparsecc_attention.window, int)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, before)


def test_a_failure_leaves_the_model_as_it_was(make_model, monkeypatch):
    model = make_model("llama")
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        before = model(ids).logits
    real, calls = attention.apply_form, []

    def apply_then_fail(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(attention, "apply_form", apply_then_fail)
    with pytest.raises(KeyboardInterrupt):
        sparsecc.sparsify_(model, {"re:.*self_attn": sparsecc.SlidingWindowConfig(window=3)}, progress=False)
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "sparsecc_attention") or m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before)


@pytest.mark.parametrize("make,match", [
    (lambda: sparsecc.SlidingWindowConfig(window=0), "window must be an integer >= 1"),
    (lambda: sparsecc.SlidingWindowConfig(window=4, dilation=0), "dilation must be an integer >= 1"),
    (lambda: sparsecc.AttentionSinkConfig(sinks=8, cache_size=8), "8 sinks do not fit a cache of 8"),
    (lambda: sparsecc.AttentionSinkConfig(sinks=4), "exactly one of window= .* or cache_size="),
    (lambda: sparsecc.AttentionSinkConfig(sinks=-1, window=4), "sinks must be an integer >= 0"),
])
def test_bad_configs(make, match):
    with pytest.raises(sparsecc.RecipeError, match=match):
        make()


def test_bad_use(make_model):
    gpt2 = make_model("gpt2")
    with pytest.raises(sparsecc.RecipeError, match="no rotary position embedding.*shift_positions=False"):
        sparsecc.sparsify_(gpt2, {"re:.*attn": sparsecc.AttentionSinkConfig(sinks=2, window=4)}, progress=False)
    model = make_model("llama")
    with pytest.raises(sparsecc.RecipeError, match="matches no attention module"):
        sparsecc.sparsify_(model, {"re:.*mlp": sparsecc.SlidingWindowConfig(window=4)}, progress=False)
    sparsecc.sparsify_(model, {"re:.*self_attn": sparsecc.AttentionSinkConfig(sinks=1, window=4)}, progress=False)
    ids = torch.randint(0, 128, (2, 6))
    with pytest.raises(ValueError, match="padded batches"):
        model(ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6]))
    with pytest.raises(ValueError, match="pass a DynamicCache"):
        model(ids, **sparsecc.cache_kwargs(StaticCache(config=model.config, max_cache_len=16)), use_cache=True)
    filled = DynamicCache()
    plain = make_model("llama")
    with torch.no_grad():
        plain(ids, **sparsecc.cache_kwargs(filled), use_cache=True)
    with pytest.raises(ValueError, match="start a new cache"):
        model(ids, **sparsecc.cache_kwargs(filled), use_cache=True)


def test_a_second_rewrite_names_the_first(make_model):
    """After one attention rewrite the model no longer calls SDPA: say what rewrote it, not 'load it with sdpa'."""
    model = make_model("llama")
    sparsecc.sparsify_(model, {"re:.*self_attn": sparsecc.AttentionSinkConfig(sinks=1, window=4)}, progress=False)
    with pytest.raises(sparsecc.RecipeError, match="model.layers.0.self_attn is already rewritten by AttentionSinkConfig"):
        sparsecc.sparsify_(model, {"re:.*self_attn": sparsecc.AttentionSinkConfig(sinks=1, window=4)}, progress=False)
    model = make_model("llama")
    sparsecc.sparsify_(model, {"model.layers.0.self_attn": sparsecc.SlidingWindowConfig(window=4)}, progress=False)
    twin = copy.deepcopy(model)
    for recipe in ({"model.layers.0.self_attn": sparsecc.SlidingWindowConfig(window=3)},
                   {"model.layers.1.self_attn": sparsecc.SlidingWindowConfig(window=3)}):  # no layer calls SDPA now
        with pytest.raises(sparsecc.RecipeError, match="model.layers.0.self_attn is already rewritten by "
                                                       "SlidingWindowConfig"):
            sparsecc.sparsify_(twin, recipe, progress=False)


def test_data_free_and_deepcopy(make_model):
    """No batches needed; a deep copy of a rewritten model keeps its form."""
    model = make_model("llama")
    sparsecc.sparsify_(model, {"model.layers.0.self_attn": sparsecc.SlidingWindowConfig(window=3)}, progress=False)
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).logits, model(ids).logits)
    assert not hasattr(model.model.layers[1].self_attn, "sparsecc_attention")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_backend_option_rewrites_attention_like_sparsify(make_model, family):
    """torch.compile(backend="sparsecc", options={"recipe": ...}) masks the same attention (with
    data-free weight pruning beside it) as sparsify_ does eagerly."""
    model = make_model(family)
    recipe = {key(family): sparsecc.SlidingWindowConfig(window=5, dilation=2, global_tokens=2),
              "default": sparsecc.MagnitudeConfig(0.5), "lm_head": None}
    eager = copy.deepcopy(model)
    sparsecc.sparsify_(eager, recipe, progress=False)
    ids = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(8))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sparsecc", options={"recipe": recipe})
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, eager(ids).logits, rtol=1e-4, atol=1e-4)


def test_backend_refuses_what_needs_sparsify(make_model):
    model = make_model("llama")
    ids = torch.randint(0, 128, (1, 8))
    for cfg, match in [(sparsecc.AttentionSinkConfig(sinks=2, window=4), "shift_positions=False"),
                       (sparsecc.CATSConfig(0.5), "needs calibration data")]:
        torch._dynamo.reset()
        with pytest.raises(Exception, match=match):
            torch.compile(model, backend="sparsecc", options={"recipe": {"re:.*self_attn": cfg}})(ids)


def test_cache_kwargs_names_the_keyword_the_forward_takes():
    """Whichever transformers is installed, both spellings are met: a forward naming `cache`, one
    naming `past_key_values`, the same behind torch.compile's wrapper; a model that names neither
    (and no model) gets the installed transformers' own, read from LlamaModel.forward."""
    import inspect

    from transformers import LlamaModel

    class New(torch.nn.Module):
        def forward(self, ids, cache=None, **kwargs):
            return ids

    class Old(torch.nn.Module):
        def forward(self, ids, past_key_values=None, **kwargs):
            return ids

    class Neither(torch.nn.Module):
        def forward(self, ids, **kwargs):
            return ids

    c = DynamicCache()
    assert sparsecc.cache_kwargs(c, New()) == {"cache": c} == sparsecc.cache_kwargs(c, torch.compile(New()))
    assert sparsecc.cache_kwargs(c, Old()) == {"past_key_values": c} == sparsecc.cache_kwargs(c, torch.compile(Old()))
    installed = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
    assert sparsecc.cache_kwargs(c, Neither()) == {installed: c} == sparsecc.cache_kwargs(c)
