"""Pruned checkpoints: round trips (dense and compressed N:M), compile after load, corrupt files,
refusing to overwrite, interrupted saves; the compressed N:M format itself."""
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparsecc
from sparsecc import checkpoint
from sparsecc.nm_format import compress, decompress

RECIPE = {"re:.*mlp\\..*": sparsecc.MagnitudeConfig(pattern="2:4"), "re:.*self_attn\\..*": sparsecc.WandaConfig(0.5),
          "lm_head": None}


@pytest.fixture
def pruned(make_model, batches):
    def make(family="llama", recipe=RECIPE):
        m = make_model(family)
        report = sparsecc.sparsify_(m, recipe, batches, progress=False)
        return m, report
    return make


def same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("compressed", [False, True])
def test_round_trip(pruned, family, compressed, tmp_path):
    recipe = {"default": sparsecc.MagnitudeConfig(pattern="2:4"), "lm_head": None} if family == "gpt2" else RECIPE
    m, report = pruned(family, recipe)
    out = sparsecc.save_pruned(m, tmp_path / "ckpt", report, recipe=recipe, compress=compressed)
    loaded, meta = sparsecc.load_pruned(out)
    assert same(m, loaded) and type(loaded) is type(m)
    assert sparsecc.load_recipe(meta["recipe"]) == sparsecc.load_recipe(recipe)
    assert [r["module"] for r in meta["rows"]] == [r["module"] for r in report.rows]
    assert bool(meta["compressed"]) == compressed
    if compressed:  # the N:M weights live only in their compressed form
        from safetensors.torch import load_file
        dense = load_file(str(out / "model.safetensors"))
        assert not set(meta["compressed"]) & set(dense)


def test_compiled_loaded_model_equals_model_right_after_pruning(pruned, tmp_path):
    m, report = pruned()
    loaded, _ = sparsecc.load_pruned(sparsecc.save_pruned(m, tmp_path / "c", report, compress=True))
    x = torch.randint(0, 128, (2, 12))
    torch._dynamo.reset()
    with torch.no_grad():
        want = m(x).logits
        got = torch.compile(loaded, backend="sparsecc")(x).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_load_into_own_module(pruned, make_model, tmp_path):
    m, report = pruned()
    out = sparsecc.save_pruned(m, tmp_path / "c", report)
    fresh = make_model("llama", seed=5)
    loaded, _ = sparsecc.load_pruned(out, model=fresh)
    assert loaded is fresh and same(m, fresh)


def test_existing_output_refused_then_overwritten(pruned, tmp_path):
    m, report = pruned()
    out = tmp_path / "c"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        sparsecc.save_pruned(m, out, report)
    assert (out / "keep.txt").read_text() == "mine"
    sparsecc.save_pruned(m, out, report, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / checkpoint.META).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temp or old folders left


def test_interrupted_save_leaves_nothing(pruned, tmp_path, monkeypatch):
    m, report = pruned()
    out = tmp_path / "c"
    sparsecc.save_pruned(m, out, report)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sparsecc.save_pruned(m, tmp_path / "new", report)
    with pytest.raises(KeyboardInterrupt):
        sparsecc.save_pruned(m, out, report, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["c"]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage, match", [
    (lambda d: (d / checkpoint.META).unlink(), "not a sparsecc checkpoint"),
    (lambda d: (d / checkpoint.META).write_text("{not json"), "corrupt"),
    (lambda d: (d / checkpoint.META).write_text(json.dumps({"format": 99})), "format 99"),
    (lambda d: _truncate(d / "model.safetensors"), "model weights"),
    (lambda d: _truncate(d / checkpoint.MASKS), "corrupt or truncated"),
    (lambda d: (d / checkpoint.MASKS).unlink(), "missing"),
])
def test_damaged_checkpoints_get_clear_errors(pruned, tmp_path, damage, match):
    m, report = pruned()
    out = sparsecc.save_pruned(m, tmp_path / "c", report)
    damage(out)
    with pytest.raises(sparsecc.PlanError, match=match):
        sparsecc.load_pruned(out)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(sparsecc.PlanError, match="does not exist"):
        sparsecc.load_pruned(tmp_path / "nothing")


def test_weights_edited_after_saving_are_detected(pruned, tmp_path):
    from safetensors.torch import load_file, save_file
    m, report = pruned()
    out = sparsecc.save_pruned(m, tmp_path / "c", report)
    state = load_file(str(out / "model.safetensors"))
    state["model.layers.0.mlp.up_proj.weight"] = torch.ones_like(state["model.layers.0.mlp.up_proj.weight"])
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(sparsecc.PlanError, match="up_proj.*nonzero weights where its mask prunes"):
        sparsecc.load_pruned(out)


@given(st.integers(1, 5), st.sampled_from([(1, 2), (2, 4), (4, 8), (3, 8), (1, 4), (5, 16)]), st.integers(1, 4),
       st.integers(0, 2 ** 16), st.booleans())
def test_nm_compression_round_trips(rows, nm, groups, seed, zeros):
    n, m = nm
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, groups * m, generator=g)
    keep = sparsecc.prune.magnitude(w, pattern=f"{n}:{m}")
    w = w * keep
    if zeros:  # some kept weights exactly zero: groups with fewer than N nonzeros
        w[:, ::3] = 0
    values, index = compress(w, n, m)
    assert values.shape == (rows, groups * n) and index.dtype == torch.uint8
    assert torch.equal(decompress(values, index, n, m, groups * m), w)


def test_two_to_four_metadata_is_two_bits_per_kept_value():
    w = torch.randn(8, 64) * sparsecc.prune.magnitude(torch.randn(8, 64), pattern="2:4")
    values, index = compress(w, 2, 4)
    assert index.numel() * 8 == values.numel() * 2
    with pytest.raises(sparsecc.PlanError, match="not 2:4 sparse"):
        compress(torch.randn(8, 64), 2, 4)
