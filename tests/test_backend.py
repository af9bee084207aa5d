"""The torch.compile backend: same outputs as eager on five families (prefill + decode with a
KV cache), option validation, data-free recipes at compile time, discovery by entry point."""
import subprocess
import sys

import pytest
import torch

import sparsecc
from conftest import FAMILIES, VOCAB


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


@pytest.mark.parametrize("kernels,runs", [("triton", "nm_linear_triton"), (None, "nm_linear_reference")])
def test_dump_shows_the_rewrite_and_what_each_op_runs(make_model, batches, tmp_path, kernels, runs):
    """option "dump": each graph's code before/after the rewrite, and a JSON of the rewrites and of
    the sparsecc ops with the function each runs (CPU tensors: the reference unless forced)."""
    torch._dynamo.reset()
    model = make_model("llama")
    sparsecc.sparsify_(model, {"re:.*mlp\\..*_proj": sparsecc.MagnitudeConfig(pattern="2:4"), "lm_head": None},
                       progress=False)
    compressed = sparsecc.compress_nm_(model, "2:4")
    recipe = {"re:.*self_attn": sparsecc.SlidingWindowConfig(window=4)}
    options = {"recipe": recipe, "dump": str(tmp_path)} | ({"kernels": kernels} if kernels else {})
    with torch.no_grad():
        torch.compile(model, backend="sparsecc", options=options)(batches[0])
    dumps = sorted(tmp_path.glob("graph-*.json"))
    assert dumps and all(p.with_suffix(".before.py").exists() and p.with_suffix(".after.py").exists() for p in dumps)
    import json
    info = [json.loads(p.read_text()) for p in dumps]
    ops = [o for i in info for o in i["sparsecc_ops"]]
    assert len(ops) == len(compressed) and {o["op"] for o in ops} == {"nm_linear"}
    assert {o["runs"] for o in ops} == {runs} and all(o["shapes"][0][-1] in (64, 128) for o in ops)
    assert {o["module"] for o in ops} == set(compressed)
    assert len([r for i in info for r in i["rewrites"]]) == 2  # the two attention calls got the window
    after = "".join(p.with_suffix(".after.py").read_text() for p in dumps)
    before = "".join(p.with_suffix(".before.py").read_text() for p in dumps)
    assert "windowed_sdpa" in after and "windowed_sdpa" not in before
    with pytest.raises(sparsecc.RecipeError, match="dump"):
        sparsecc.backend.BackendOptions.parse({"dump": 3})


def test_lowering_names_the_kernel_each_op_runs():
    from sparsecc.codegen.ops import implementation
    assert implementation("nm_linear", "cpu", "auto") == "nm_linear_reference"
    assert implementation("nm_linear", "cuda", "auto") == "nm_linear_triton"
    assert implementation("window_attention", "cpu", "auto") == "window_attention_blocked"
    assert implementation("moe_ffn", "cpu", "triton") == "moe_ffn_triton"
    assert implementation("cats_mlp", "cpu", "reference") == "cats_mlp_reference"
    assert implementation("cats_mlp", "cpu", "auto") == "cats_mlp_cpu"
