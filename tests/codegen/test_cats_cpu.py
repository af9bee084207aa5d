"""The CPU CATS path that reads only active neurons (codegen/cats_cpu.py) against the reference:
odd shapes, fp32/fp16/bf16, every activation, thresholds that keep all or no neurons, both
layouts of W_down; when it is chosen; and the CATS rewrite storing W_down column-major."""
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import sparsecc
from sparsecc.codegen import cats_cpu
from sparsecc.codegen.cats_cpu import cats_mlp_cpu, column_major
from sparsecc.codegen.cats_mlp import cats_mlp_reference
from sparsecc.codegen.cats_mlp import ACTIVATIONS

TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}  # relative to max |y|


def weights(hidden, inter, seed, bias, dtype, down_column_major=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) / s[-1] ** 0.25).to(dtype)  # noqa: E731
    ws = [r(inter, hidden), r(inter) if bias else None, r(inter, hidden), r(inter) if bias else None,
          r(hidden, inter), r(hidden) if bias else None]
    if down_column_major:
        ws[4] = ws[4].t().contiguous().t()
    return ws


def ref64(x, ws, t, act):
    return cats_mlp_reference(x.double(), *[w.double() if w is not None else None for w in ws], t, act)


@given(tokens=st.integers(1, 6), hidden=st.integers(1, 70), inter=st.integers(1, 90),
       act=st.sampled_from(sorted(ACTIVATIONS)), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       bias=st.booleans(), quantile=st.floats(0.0, 0.95), layout=st.booleans(), seed=st.integers(0, 2**16))
def test_active_rows_equal_reference(tokens, hidden, inter, act, dtype, bias, quantile, layout, seed):
    ws = weights(hidden, inter, seed, bias, dtype, layout)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    v = ACTIVATIONS[act](torch.nn.functional.linear(x.double(), ws[0].double(), None if ws[1] is None else ws[1].double()))
    t = float(v.abs().flatten().quantile(quantile))
    # a neuron within rounding of t may be kept by one and dropped by the other: keep clear of it
    assume(t == 0 or not bool(((v.abs() - t).abs() < 2 * TOL[dtype] * max(t, 1e-3)).any()))
    y = cats_mlp_cpu(x, *ws, t, act, sparse=True)
    ref = ref64(x, ws, t, act)
    assert y.dtype == dtype and y.shape == ref.shape
    err = (y.double() - ref).abs().max().item()
    assert err <= TOL[dtype] * max(1.0, ref.abs().max().item()), err


@pytest.mark.parametrize("threads,shape", [(1, (3, 2, 24)), (3, (1, 24)), (5, (2, 1, 24))])
def test_all_and_no_neurons_active(threads, shape):
    ws = weights(24, 40, 0, True, torch.float32)
    x = torch.randn(*shape)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # bags per token depend on the thread count
    try:
        for t in (0.0, float("inf")):
            y = cats_mlp_cpu(x, *ws, t, "silu", sparse=True)
            torch.testing.assert_close(y.double(), ref64(x, ws, t, "silu"), rtol=1e-5, atol=1e-5)
        assert torch.equal(cats_mlp_cpu(x, *ws, float("inf"), "silu", sparse=True), ws[5].expand(*shape))
    finally:
        torch.set_num_threads(before)


def test_empty_batch_and_reference_mode(monkeypatch):
    from sparsecc.ops import use_kernels

    monkeypatch.setattr(cats_cpu, "MIN_WEIGHTS", 0)
    ws = weights(24, 40, 0, True, torch.float32)
    for shape in [(0, 24), (2, 0, 24)]:
        y = torch.ops.sparsecc.cats_mlp(torch.randn(*shape), *ws, 0.1, "silu")
        assert y.shape == (*shape[:-1], 24)
    monkeypatch.setattr(cats_cpu, "_active_rows", lambda *a: pytest.fail("mode reference ran the active-rows path"))
    with use_kernels("reference"):
        torch.ops.sparsecc.cats_mlp(torch.randn(1, 24), *ws, 0.1, "silu")


def test_chosen_only_where_it_pays(monkeypatch):
    """Few tokens x active fraction on large enough weights: active rows; otherwise the dense MLP."""
    assert not cats_cpu.pays(1, 0.5, 64, 32) and cats_cpu.pays(1, 0.5, 4096, 11008)
    assert cats_cpu.pays(2, 0.25, 4096, 11008) and not cats_cpu.pays(4, 0.5, 4096, 11008)
    chosen = []
    monkeypatch.setattr(cats_cpu, "MIN_WEIGHTS", 32 * 64)
    real = cats_cpu._active_rows
    monkeypatch.setattr(cats_cpu, "_active_rows", lambda *a: chosen.append(a[0].shape[0]) or real(*a))
    ws = weights(32, 64, 2, False, torch.float32)
    g = torch.Generator().manual_seed(3)
    t = float(ACTIVATIONS["silu"](torch.randn(256, 32, generator=g) @ ws[0].t()).abs().quantile(0.7))  # ~30% active
    for tokens in (1, 8):
        x = torch.randn(tokens, 32, generator=g)
        torch.testing.assert_close(torch.ops.sparsecc.cats_mlp(x, *ws, t, "silu"), cats_mlp_reference(x, *ws, t, "silu"))
    assert chosen == [1]
    chosen.clear()
    row_major = list(ws)
    row_major[4] = ws[4].contiguous()  # W_downᵀ not contiguous: reading its rows would copy it, so dense
    torch.ops.sparsecc.cats_mlp(torch.randn(1, 32), *row_major, t, "silu")
    assert chosen == []


def test_cats_rewrite_stores_down_column_major(make_model, batches):
    model = make_model("llama")
    x = batches[0]
    sparsecc.sparsify_(model, {"re:.*mlp": sparsecc.CATSConfig(0.5)}, batches)
    downs = [m.down_proj.weight for m in model.modules() if type(m).__name__ == "CATSMLP"]
    assert len(downs) == 2 and all(column_major(w) and not w.is_contiguous() for w in downs)
    with torch.no_grad():
        y = model(x).logits
        for m in model.modules():  # the op on the column-major weight = the reference on a row-major copy
            if type(m).__name__ == "CATSMLP":
                m.down_proj.weight.data = m.down_proj.weight.data.contiguous()
        torch.testing.assert_close(model(x).logits, y)


def test_half_weights_on_cpu_stay_row_major(make_model, batches):
    """On CPU the half/bf16 dense product is slower with a column-major weight: no relayout there."""
    model = make_model("llama").to(torch.bfloat16)
    sparsecc.sparsify_(model, {"re:.*mlp": sparsecc.CATSConfig(0.5)}, batches)
    downs = [m.down_proj.weight for m in model.modules() if type(m).__name__ == "CATSMLP"]
    assert len(downs) == 2 and all(w.is_contiguous() for w in downs)
    assert cats_cpu.wants_column_major(torch.zeros(2, 2)) and not cats_cpu.wants_column_major(torch.zeros(2, 2).half())


def test_layout_follows_dtype_changes(make_model, batches):
    model = make_model("llama")
    sparsecc.sparsify_(model, {"re:.*mlp": sparsecc.CATSConfig(0.5)}, batches)
    down = model.model.layers[0].mlp.down_proj
    assert column_major(down.weight)
    model.to(torch.bfloat16)
    assert down.weight.is_contiguous() and down.weight.dtype == torch.bfloat16
    model.float()
    assert column_major(down.weight) and not down.weight.is_contiguous()


def test_failed_rewrite_restores_row_major_layout(make_model, batches, monkeypatch):
    from sparsecc.techniques import cats

    model = make_model("llama")
    before = {n: p.clone() for n, p in model.named_parameters()}
    monkeypatch.setattr(cats, "CATSMLP", type("Broken", (cats.CATSMLP,), {}))
    real = cats.column_major_down
    calls = []

    def fail_second(mlp, tx=None):
        real(mlp, tx)
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
    monkeypatch.setattr(cats, "column_major_down", fail_second)
    with pytest.raises(RuntimeError, match="boom"):
        sparsecc.sparsify_(model, {"re:.*mlp": sparsecc.CATSConfig(0.5)}, batches)
    assert not any(type(m).__name__ == "Broken" for m in model.modules())
    for n, p in model.named_parameters():
        assert p.is_contiguous() and torch.equal(p, before[n]), n


def test_compiled_model_decodes_through_active_rows(make_model, batches, monkeypatch):
    """backend="sparsecc" on CPU: the op's CPU path (with its own Inductor gather-dot) runs inside
    the compiled graph and gives the eager model's logits."""
    import torch._dynamo

    model = make_model("llama")
    sparsecc.sparsify_(model, {"re:.*mlp": sparsecc.CATSConfig(0.7)}, batches)
    monkeypatch.setattr(cats_cpu, "MIN_WEIGHTS", 0)
    calls = []
    real = cats_cpu._active_rows
    monkeypatch.setattr(cats_cpu, "_active_rows", lambda *a: calls.append(1) or real(*a))
    ids = batches[0][:1, :1]
    with torch.no_grad():
        eager = model(ids).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="sparsecc")(ids).logits
    torch.testing.assert_close(compiled, eager)
    assert len(calls) == 4  # two MLPs, eager then compiled
