"""Pruned checkpoints: round trips (dense and compressed N:M), compile after load, corrupt files,
refusing to overwrite, interrupted saves; the compressed N:M format itself."""
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparsecc
from sparsecc.io import checkpoint
from sparsecc.codegen.nm_format import compress, decompress

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
    if compressed:  # the N:M weights live only in their compressed form: empty placeholders in model.safetensors
        from safetensors.torch import load_file
        dense = load_file(str(out / "model.safetensors"))
        assert all(dense[name].numel() == 0 for name in meta["compressed"])
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # plain transformers refuses the folder
            type(m).from_pretrained(out)


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
    (lambda d: _truncate(d / "model.safetensors"), "model.safetensors' is corrupt or truncated"),
    (lambda d: (_truncate(d / "model.safetensors"), _strip_hashes(d)), "model weights"),  # unhashed: transformers
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


def _edit_meta(out, **fields):
    meta = json.loads((out / checkpoint.META).read_text())
    meta.update(fields)
    (out / checkpoint.META).write_text(json.dumps(meta))


def _strip_hashes(out):  # as a folder written before tensors were hashed (format 1 without "sha256")
    meta = json.loads((out / checkpoint.META).read_text())
    meta.pop("sha256", None)
    (out / checkpoint.META).write_text(json.dumps(meta))


def _edit_tensors(file, edit):
    from safetensors.torch import load_file, save_file
    state = load_file(str(file))
    edit(state)
    save_file(state, str(file), metadata={"format": "pt"})


def _ones_up_proj(out):
    _edit_tensors(out / "model.safetensors", lambda s: s.update({UP: torch.ones_like(s[UP])}))


def _float_masks(out):
    _edit_tensors(out / checkpoint.MASKS, lambda s: s.update({UP: s[UP].float()}))


UP = "model.layers.0.mlp.up_proj.weight"
IX = UP + ".index"
Q = "model.layers.0.self_attn.q_proj.weight"  # 50% unstructured (Wanda): a bitmask when compressed


def test_weights_edited_after_saving_are_detected(pruned, tmp_path):
    m, report = pruned()
    out = sparsecc.save_pruned(m, tmp_path / "c", report)
    _ones_up_proj(out)
    with pytest.raises(sparsecc.PlanError, match=f"checkpoint tensor '{UP}' changed since it was saved "
                                                 r"\(sha256 mismatch\); re-save it"):
        sparsecc.load_pruned(out)
    _strip_hashes(out)  # an older folder: the masks still catch it
    with pytest.raises(sparsecc.PlanError, match="up_proj.*nonzero weights where its mask prunes"):
        sparsecc.load_pruned(out)


def _flip_bit(file, name):
    """Flip the lowest bit of the first byte of tensor `name` in a safetensors file."""
    data = bytearray(file.read_bytes())
    n = int.from_bytes(data[:8], "little")
    begin = json.loads(data[8:8 + n])[name]["data_offsets"][0]
    data[8 + n + begin] ^= 1
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("file, name, compressed", [
    ("model.safetensors", "model.norm.weight", True), (checkpoint.MASKS, UP, False),
    (checkpoint.PACKED, UP + ".values", True), (checkpoint.PACKED, UP + ".index", True),
    (checkpoint.PACKED, Q + ".values", True), (checkpoint.PACKED, Q + ".bitmask", True)])
def test_a_flipped_bit_is_reported_naming_the_tensor(pruned, tmp_path, make_model, state_tools, file, name, compressed):
    snapshot, same_state = state_tools
    m, report = pruned()
    out = sparsecc.save_pruned(m, tmp_path / "c", report, compress=compressed)
    _flip_bit(out / file, name)
    msg = f"checkpoint tensor '{name}' changed since it was saved"
    with pytest.raises(sparsecc.PlanError, match=msg):
        sparsecc.load_pruned(out)
    fresh = make_model("llama", seed=5)
    snap = snapshot(fresh)
    with pytest.raises(sparsecc.PlanError, match=msg):
        sparsecc.load_pruned(out, model=fresh)
    assert same_state(fresh, snap)


def test_folders_without_hashes_still_load(pruned, tmp_path):
    m, report = pruned()
    out = sparsecc.save_pruned(m, tmp_path / "c", report, compress=True)
    _strip_hashes(out)
    assert same(m, sparsecc.load_pruned(out)[0])


def _llama(**widths):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**dict(vocab_size=128, hidden_size=64, intermediate_size=128,
                                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                  max_position_embeddings=64), **widths})).eval()


@pytest.mark.parametrize("damage, model, match", [
    (lambda out: (_ones_up_proj(out), _strip_hashes(out)), {}, "nonzero weights where its mask prunes"),
    (_ones_up_proj, {}, "sha256 mismatch"),
    (lambda out: None, {"intermediate_size": 96}, r"gate_proj.weight.* is \[128, 64\]; the model has \[96, 64\]"),
    (lambda out: (_float_masks(out), _strip_hashes(out)), {}, f"mask '{UP}' is torch.float32 .*expected torch.uint8"),
], ids=["tampered", "tampered-hashed", "other-width", "float-mask"])
def test_failed_load_into_a_model_leaves_it_unchanged(pruned, tmp_path, state_tools, damage, model, match):
    snapshot, same_state = state_tools
    m, report = pruned()
    out = sparsecc.save_pruned(m, tmp_path / "c", report)
    damage(out)
    fresh = _llama(**model)
    snap = snapshot(fresh)
    with pytest.raises(sparsecc.PlanError, match=match):
        sparsecc.load_pruned(out, model=fresh)
    assert same_state(fresh, snap)


@pytest.mark.parametrize("fields, match", [
    ({"rows": "hello"}, "'rows' must be a list"), ({"rows": None}, "'rows' must be a list"),
    ({"rows": [1]}, r"rows\[0\]"), ({"rows": [{"module": "x"}]}, r"rows\[0\].*'config'"),
    ({"rows": [{"module": "x", "param": 3, "config": {}}]}, r"rows\[0\].*'param'"),
    ({"compressed": "x"}, "'compressed'"), ({"compressed": {UP: {"n": 2}}}, f"compressed\\['{UP}'\\]"),
    ({"setup": 3}, "'setup'"), ({"recipe": "x"}, "'recipe'"), ({"sha256": {"model.safetensors": "x"}}, "'sha256'"),
    ({"sha256": {"../x.safetensors": {}}}, "'sha256'"),
], ids=["rows-str", "rows-null", "row-int", "row-no-config", "row-param", "compressed-str", "compressed-entry",
        "setup", "recipe", "sha256-entry", "sha256-path"])
def test_malformed_metadata_gets_clear_errors(pruned, tmp_path, fields, match):
    m, report = pruned()
    out = sparsecc.save_pruned(m, tmp_path / "c", report, compress=True)
    _edit_meta(out, **fields)
    with pytest.raises(sparsecc.PlanError, match=match):
        sparsecc.load_pruned(out)


def _edit_mask_shape(out, shape):
    meta = json.loads((out / checkpoint.META).read_text())
    meta["masks"][UP] = shape
    (out / checkpoint.META).write_text(json.dumps(meta))


P = checkpoint.PACKED


@pytest.mark.parametrize("compressed, damage, match", [
    (False, _float_masks, f"mask '{UP}' is torch.float32 \\[128, 8\\]; expected torch.uint8 \\[128, 8\\]"),
    (False, lambda out: _edit_tensors(out / checkpoint.MASKS, lambda s: s.update({UP: s[UP][:3]})),
     f"mask '{UP}' is torch.uint8 \\[3, 8\\]; expected torch.uint8 \\[128, 8\\]"),
    (False, lambda out: _edit_mask_shape(out, [128, 60]), f"mask '{UP}' \\[128, 60\\] does not fit the model"),
    (False, lambda out: _edit_tensors(out / checkpoint.MASKS, lambda s: s.pop(UP)), f"lacks the mask of '{UP}'"),
    (False, lambda out: _edit_tensors(out / checkpoint.MASKS, lambda s: s.update(x=s[UP].clone())), "holds 'x'.*does not list"),
    (True, lambda out: _edit_tensors(out / P, lambda s: s.update({IX: s[IX].long()})), "index.*uint8"),
    (True, lambda out: _edit_tensors(out / P, lambda s: s.update({IX: s[IX][:, :3].contiguous()})), "index.*shape"),
    (True, lambda out: _edit_tensors(out / P, lambda s: s.pop(IX)), f"lacks '{IX}'"),
    (True, lambda out: _edit_tensors(out / P, lambda s: s.update({Q + ".values": s[Q + ".values"][1:]})),
     f"compressed '{Q}': values are torch.float32 \\[\\d+\\]; expected torch.float32 \\[\\d+\\] .one per set bit"),
    (True, lambda out: _edit_tensors(out / P, lambda s: s.update({Q + ".values": s[Q + ".values"].double()})),
     f"compressed '{Q}': values are torch.float64"),
    (True, lambda out: _edit_tensors(out / P, lambda s: s.update({Q + ".bitmask": s[Q + ".bitmask"][:, 1:].contiguous()})),
     "bit-packed mask of 64 columns must be uint8 \\[rows, 8\\]"),
], ids=["float-mask", "short-mask", "mask-shape", "no-mask", "stray-mask", "index-dtype", "index-shape", "no-index",
        "short-values", "values-dtype", "bitmask-shape"])
def test_malformed_tensors_get_clear_errors(pruned, tmp_path, compressed, damage, match):
    m, report = pruned()
    out = sparsecc.save_pruned(m, tmp_path / "c", report, compress=compressed)
    damage(out)
    _strip_hashes(out)  # past the hashes, to the checks of what the tensors hold
    with pytest.raises(sparsecc.PlanError, match=match):
        sparsecc.load_pruned(out)


def test_save_pruned_refuses_another_models_report(pruned, make_model, tmp_path):
    _, report = pruned()  # 2:4 MLPs, 50% attention
    end = "pass the report sparsify_ returned for this model"
    with pytest.raises(sparsecc.PlanError, match=r"report row 'model\.layers\.0\..*' .*shape.*" + end):
        sparsecc.save_pruned(_llama(hidden_size=32, intermediate_size=64), tmp_path / "a", report)
    with pytest.raises(sparsecc.PlanError, match=r"report row 'model\.layers\.0\..*' .*sparsity.*" + end):
        sparsecc.save_pruned(make_model("llama"), tmp_path / "b", report)  # dense, same shapes
    unstructured = make_model("llama")
    sparsecc.sparsify_(unstructured, {"re:.*mlp\\..*": sparsecc.MagnitudeConfig(0.5),
                                      "re:.*self_attn\\..*": sparsecc.MagnitudeConfig(0.5), "lm_head": None})
    with pytest.raises(sparsecc.PlanError, match=r"report row 'model\.layers\.0\.mlp\..*' .*2:4.*" + end):
        sparsecc.save_pruned(unstructured, tmp_path / "c", report)  # same sparsity, not 2:4
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_save_pruned_refuses_another_models_rewrite_rows(make_model, batches, tmp_path):
    """A CATS report saved with a model that has no CATS MLPs made load_pruned rebuild them."""
    cats = make_model("llama")
    report = sparsecc.sparsify_(cats, {"re:.*mlp": sparsecc.CATSConfig(0.5)}, batches, progress=False)
    with pytest.raises(sparsecc.PlanError, match=r"report row 'model\.layers\.0\.mlp' records a CATSConfig rewrite "
                                                 "this model does not have; pass the report sparsify_ returned"):
        sparsecc.save_pruned(make_model("llama"), tmp_path / "a", report)
    assert list(tmp_path.iterdir()) == []
    sparsecc.save_pruned(cats, tmp_path / "b", report)  # its own report: fine


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


def test_compressed_weights_inside_rewritten_modules(make_model, batches, tmp_path):
    """2:4 linears inside CATS-gated MLPs: the rewrite is restored and the compressed weights expanded."""
    m = make_model("llama")
    report = sparsecc.sparsify_(m, {"default": sparsecc.MagnitudeConfig(pattern="2:4"), "lm_head": None,
                                    "re:.*mlp": sparsecc.CATSConfig(0.5)}, batches, progress=False)
    out = sparsecc.save_pruned(m, tmp_path / "c", report, compress=True)
    assert "model.layers.0.mlp.up_proj.weight" in json.loads((out / checkpoint.META).read_text())["compressed"]
    assert same(m, sparsecc.load_pruned(out)[0])
    assert same(m, sparsecc.load_pruned(out, model=make_model("llama", seed=5))[0])
