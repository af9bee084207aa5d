"""The torch.compile backend: same outputs as eager on five families (prefill + decode with a
KV cache), option validation, data-free recipes at compile time, discovery by entry point, the
attention lowering to sparsecc::window_attention and the kernel mode lowered into the graph."""
import copy
import functools
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import sparsecc
from conftest import FAMILIES, VOCAB
from sparsecc.codegen.window_attention import allowed
from sparsecc.ops import use_kernels
from sparsecc.ops.dispatch import WAYS


def _step(m, ids, nxt):
    out1 = m(ids, use_cache=True)
    out2 = m(nxt, past_key_values=out1.past_key_values, use_cache=True)
    return out1.logits, out2.logits


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_equals_eager_prefill_and_decode(family, make_model):
    torch._dynamo.reset()
    m = make_model(family)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    nxt = torch.randint(0, VOCAB, (2, 1), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        e1, e2 = _step(m, ids, nxt)
        c1, c2 = _step(torch.compile(m, backend="sparsecc"), ids, nxt)
    assert (e1 - c1).abs().max() <= 1e-4
    assert (e2 - c2).abs().max() <= 1e-4


def test_unknown_option_is_rejected_with_suggestion(make_model):
    torch._dynamo.reset()
    m = torch.compile(make_model("llama"), backend="sparsecc", options={"recipee": {}})
    with pytest.raises(Exception, match="unknown sparsecc backend option 'recipee'.*did you mean 'recipe'"):
        m(torch.zeros(1, 4, dtype=torch.long))


def test_options_parse_validates_values():
    with pytest.raises(sparsecc.RecipeError, match="debug"):
        sparsecc.backend.BackendOptions.parse({"debug": "yes"})
    with pytest.raises(sparsecc.RecipeError, match="sparsity"):
        sparsecc.MagnitudeConfig(sparsity=1.0)


def test_compile_time_recipe_matches_eager_sparsify(make_model, batches):
    torch._dynamo.reset()
    recipe = {"re:.*mlp\\..*_proj": sparsecc.MagnitudeConfig(0.5), "lm_head": None}
    dense = make_model("llama")
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    compiled = torch.compile(dense, backend="sparsecc", options={"recipe": recipe})
    eager = make_model("llama")
    report = sparsecc.sparsify_(eager, recipe, progress=False)
    assert len(report.rows) == 6 and abs(report.sparsity - 0.5) < 1e-6
    with torch.no_grad():
        got = compiled(batches[0]).logits
        want = eager(batches[0]).logits
        dense_out = dense(batches[0]).logits
    assert (got - want).abs().max() <= 1e-4
    assert (got - dense_out).abs().max() > 1e-3  # the rewrite really happened
    assert all(torch.equal(v, before[k]) for k, v in dense.state_dict().items())  # compile never mutates


def test_compile_time_recipe_that_matches_nothing_fails(make_model):
    torch._dynamo.reset()
    m = torch.compile(make_model("llama"), backend="sparsecc",
                      options={"recipe": {"re:.*mlpp.*": sparsecc.MagnitudeConfig(0.5)}})
    with pytest.raises(Exception, match="matches no linear module"):
        m(torch.zeros(1, 4, dtype=torch.long))


def test_backend_rewrites_transposed_gpt2_weights(make_model, batches):
    torch._dynamo.reset()
    recipe = {"default": sparsecc.MagnitudeConfig(0.5, group="output"), "lm_head": None}
    compiled = torch.compile(make_model("gpt2"), backend="sparsecc", options={"recipe": recipe})
    eager = make_model("gpt2")
    sparsecc.sparsify_(eager, recipe, progress=False)
    with torch.no_grad():
        assert (compiled(batches[0]).logits - eager(batches[0]).logits).abs().max() <= 1e-4


def test_backend_found_without_importing_sparsecc():
    code = ("import sys, torch\n"
            "f = torch.compile(lambda x: torch.nn.functional.linear(x, torch.ones(3, 4)), backend='sparsecc')\n"
            "print(float(f(torch.ones(2, 4)).sum()), 'sparsecc' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["24.0", "True"]


def _dump_texts(folder):
    """(before, after, info) of the graphs dumped into folder."""
    dumps = sorted(folder.glob("graph-*.json"))
    assert dumps and all(p.with_suffix(".before.py").exists() and p.with_suffix(".after.py").exists() for p in dumps)
    before = "".join(p.with_suffix(".before.py").read_text() for p in dumps)
    after = "".join(p.with_suffix(".after.py").read_text() for p in dumps)
    return before, after, [json.loads(p.read_text()) for p in dumps]


def _compressed_llama(make_model):
    model = make_model("llama")
    sparsecc.sparsify_(model, {"re:.*mlp\\..*_proj": sparsecc.MagnitudeConfig(pattern="2:4"), "lm_head": None},
                       progress=False)
    return model, sparsecc.compress_nm_(model, "2:4")


@pytest.mark.parametrize("kernels,runs", [("triton", "nm_linear_triton"), (None, "nm_linear_reference")])
def test_dump_shows_the_rewrite_and_what_each_op_runs(make_model, batches, tmp_path, kernels, runs):
    """option "dump": each graph's code before/after the rewrite, and a JSON of the rewrites and of
    the sparsecc ops with the kernel mode each node sets and the function it runs (CPU tensors:
    the reference unless forced)."""
    torch._dynamo.reset()
    model, compressed = _compressed_llama(make_model)
    recipe = {"re:.*self_attn": sparsecc.SlidingWindowConfig(window=4)}
    options = {"recipe": recipe, "dump": str(tmp_path)} | ({"kernels": kernels} if kernels else {})
    with torch.no_grad():
        torch.compile(model, backend="sparsecc", options=options)(batches[0])
    before, after, info = _dump_texts(tmp_path)
    ops = [o for i in info for o in i["sparsecc_ops"]]
    nm = [o for o in ops if o["op"] == "nm_linear"]
    attention = [o for o in ops if o["op"] == "window_attention"]
    assert len(nm) == len(compressed) and len(attention) == 2 and len(ops) == len(nm) + len(attention)
    assert {o["runs"] for o in nm} == {runs} and all(o["shapes"][0][-1] in (64, 128) for o in nm)
    assert {o["module"] for o in nm} == set(compressed)
    assert {o["kernels"] for o in ops} == {kernels}
    assert len([r for i in info for r in i["rewrites"]]) == 2  # the two attention calls got the window
    assert "torch.ops.sparsecc.window_attention(" in after and "sparsecc.window_attention" not in before
    assert "scaled_dot_product_attention" in before and "scaled_dot_product_attention" not in after
    assert ("kernels = " in after) == (kernels is not None)
    with pytest.raises(sparsecc.RecipeError, match="dump"):
        sparsecc.backend.BackendOptions.parse({"dump": 3})


def test_forced_kernel_mode_is_in_the_graph_and_beats_the_ambient_mode(make_model, batches, tmp_path, monkeypatch):
    """options={"kernels": "reference"}: every sparsecc op of graph-*.after.py carries
    kernels='reference', and the compiled model runs the reference even under use_kernels("triton").
    Each op stays one node through Inductor: one call of its function per op and forward."""
    torch._dynamo.reset()
    model, compressed = _compressed_llama(make_model)
    with torch.no_grad():
        eager = model(batches[0]).logits
    ways, calls = WAYS["nm_linear"], []
    reference = ways.reference
    monkeypatch.setattr(ways, "reference", functools.wraps(reference)(lambda *a: calls.append(1) or reference(*a)))
    monkeypatch.setattr(ways, "kernel", lambda *a: pytest.fail("the forced mode did not reach the graph"))
    compiled = torch.compile(model, backend="sparsecc", options={"kernels": "reference", "dump": str(tmp_path)})
    with torch.no_grad(), use_kernels("triton"):
        out = compiled(batches[0]).logits
    torch.testing.assert_close(out, eager)
    _, after, info = _dump_texts(tmp_path)
    op_lines = [line for line in after.splitlines() if "torch.ops.sparsecc." in line]
    assert len(op_lines) == len(compressed) and all("kernels = 'reference'" in line for line in op_lines)
    assert {(o["kernels"], o["runs"]) for i in info for o in i["sparsecc_ops"]} == {
        ("reference", "nm_linear_reference")}
    assert len(calls) == len(compressed)  # one call per op node: Inductor kept each op whole


def _windowed_sdpa(window, dilation, sinks):
    """The dense masked reference: torch's SDPA with the window pattern ANDed into the call's own mask
    (queries the last T of the N keys, or the first T for is_causal=True)."""
    sdpa = F.scaled_dot_product_attention

    def call(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        t, n = q.shape[-2], k.shape[-2]
        pos = torch.arange(n)
        keep = allowed(torch.arange(t) if is_causal else pos[n - t:], pos, window, dilation, sinks)
        keep = keep & attn_mask if attn_mask is not None else keep
        return sdpa(q, k, v, attn_mask=keep, dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa)
    return call


@pytest.mark.parametrize("family,key", [("llama", "re:.*self_attn"), ("gpt2", "re:.*attn")])
def test_compiled_window_runs_the_op_sparsify_runs(family, key, make_model, tmp_path, monkeypatch):
    """A SlidingWindowConfig at compile time lowers SDPA to sparsecc::window_attention (llama:
    grouped-query keys through enable_gqa) and gives sparsify_'s eager logits and the dense masked
    reference's."""
    recipe = {key: sparsecc.SlidingWindowConfig(window=5, dilation=2, global_tokens=2)}
    model = make_model(family)
    eager = copy.deepcopy(model)
    sparsecc.sparsify_(eager, recipe, progress=False)
    ids = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend="sparsecc", options={"recipe": recipe, "dump": str(tmp_path)})(ids).logits
        want = eager(ids).logits
        monkeypatch.setattr(F, "scaled_dot_product_attention", _windowed_sdpa(5, 2, 2))
        dense = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, dense, rtol=1e-4, atol=1e-4)
    _, after, info = _dump_texts(tmp_path)
    assert after.count("torch.ops.sparsecc.window_attention(") == 2 and "scaled_dot_product_attention" not in after
    assert [r["op"] for i in info for r in i["rewrites"]] == ["window_attention"] * 2


def test_the_models_own_mask_is_kept(make_model, monkeypatch):
    """The model's boolean mask goes to the op: a left-padded llama batch (a mask per query and key,
    keys repeated to the query heads) and mistral's own sliding window at prefill and at decode
    (one mask row per key), as in the dense masked reference. (Eager transformers would fold a
    decode step's query heads into the token axis (pack_gqa): the reference runs without that.)"""
    window = sparsecc.SlidingWindowConfig(window=5)
    for family, mask in [("llama", torch.tensor([[0] * 3 + [1] * 9, [1] * 12])), ("mistral", None)]:
        model = make_model(family)
        ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
        nxt = torch.randint(0, VOCAB, (2, 1), generator=torch.Generator().manual_seed(5))
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="sparsecc", options={"recipe": {"re:.*self_attn": window}})

        def run(m):
            first = m(ids, attention_mask=mask, use_cache=True)
            return first.logits, m(nxt, past_key_values=first.past_key_values, use_cache=True).logits
        with torch.no_grad():
            got = run(compiled)
            with monkeypatch.context() as patch:
                patch.setattr(F, "scaled_dot_product_attention", _windowed_sdpa(5, 1, 0))
                patch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "1")
                want = run(model)
        rows = mask.bool() if mask is not None else torch.ones(2, 12, dtype=torch.bool)
        torch.testing.assert_close(got[0][rows], want[0][rows], rtol=1e-4, atol=1e-4)  # padding rows: any value
        torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)


class _Attention(torch.nn.Module):
    def __init__(self, **sdpa):
        super().__init__()
        self.sdpa = sdpa

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, **self.sdpa)


class _Model(torch.nn.Module):
    def __init__(self, **sdpa):
        super().__init__()
        self.attn = _Attention(**sdpa)

    def forward(self, q, k, v):
        return self.attn(q, k, v)


def test_causal_calls_and_grouped_query_heads_without_a_cache():
    """is_causal=True with fewer queries than keys (torch's causal mask is upper-left: queries at
    0..T-1), an explicit scale, and grouped-query keys with a key padding mask and a mask per query
    and key, against the dense masked reference."""
    g = torch.Generator().manual_seed(6)
    q, k, v = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g), torch.randn(2, 2, 9, 8,
                                                                                                      generator=g)
    recipe = {"attn": sparsecc.SlidingWindowConfig(window=2, global_tokens=1)}
    padding = torch.rand(2, 1, 1, 9, generator=g) > 0.3
    per_query = torch.rand(1, 1, 5, 9, generator=g) > 0.3
    for sdpa in ({"is_causal": True, "enable_gqa": True}, {"enable_gqa": True, "scale": 0.3},
                 {"enable_gqa": True, "attn_mask": padding}, {"enable_gqa": True, "attn_mask": per_query}):
        torch._dynamo.reset()
        got = torch.compile(_Model(**sdpa), backend="sparsecc", options={"recipe": recipe})(q, k, v)
        torch.testing.assert_close(got, _windowed_sdpa(2, 1, 1)(q, k, v, **sdpa))


@pytest.mark.parametrize("mask,match", [(torch.zeros(5, 9), "additive torch.float32 attn_mask"),
                                        (torch.ones(1, 4, 5, 9, dtype=torch.bool), "different attn_mask per head"),
                                        (torch.ones(4, 5, 9, dtype=torch.bool), "different attn_mask per head")])
def test_masks_the_op_cannot_apply_are_refused(mask, match):
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 4, 9, 8)
    torch._dynamo.reset()
    compiled = torch.compile(_Model(attn_mask=mask), backend="sparsecc",
                             options={"recipe": {"attn": sparsecc.SlidingWindowConfig(window=2)}})
    with pytest.raises(Exception, match=f"attn: .*{match}.*sparsify_"):
        compiled(q, k, k)


def test_configs_the_backend_cannot_apply_say_why():
    with pytest.raises(sparsecc.RecipeError, match=r"recipe\['re:.\*'\]: .*shift_positions=False.*before compiling"):
        sparsecc.backend.BackendOptions.parse({"recipe": {"re:.*": sparsecc.AttentionSinkConfig(sinks=2, window=4)}})
