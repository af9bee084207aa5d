"""Checkpoints smaller than dense: masks as bits, compressed layouts (bitmask, N:M, quantized codes),
their sizes, quantization grids surviving a round trip, corrupt or tampered files, format-1 folders."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import sparsecc
from sparsecc.codegen.bitmask import unpack_bits
from sparsecc.io import checkpoint
from sparsecc.prune.quantize import QUANTIZED, grid_of, rtn

UP = "model.layers.0.mlp.up_proj.weight"


def _llama(dtype=torch.float32, hidden=128, inter=256):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def quantize_(model, report, bits=4, group_size=128, sym=False):
    """RTN-quantize every reported weight (pruned ones stay zero) and attach its grid, as the
    quantizing configs do; the rows then record the weights' final sparsity."""
    for row in report.rows:
        p = model.get_parameter(row["param"])
        w = p.detach().t() if row["transposed"] else p.detach()
        dq, grid = rtn(w, bits, group_size, sym)
        with torch.no_grad():
            p.copy_(dq.t() if row["transposed"] else dq)
        model.get_submodule(row["module"]).__dict__[QUANTIZED] = grid
        row["sparsity"] = float((dq == 0).float().mean())


KINDS = {  # kind -> (recipe config, quantized, expected layout when compressed)
    "unstructured": (sparsecc.MagnitudeConfig(0.5), False, "bitmask"),
    "nm": (sparsecc.MagnitudeConfig(pattern="2:4"), False, "nm"),
    "quantized": (sparsecc.MagnitudeConfig(0.0), True, "int"),
    "quantized+unstructured": (sparsecc.MagnitudeConfig(0.5), True, "int-bitmask"),
    "quantized+nm": (sparsecc.MagnitudeConfig(pattern="2:4"), True, "int-nm"),
}


def make(kind, dtype=torch.float32, group_size=128, model=None, **widths):
    config, quantized, _ = KINDS[kind]
    m = model if model is not None else _llama(dtype, **widths)
    report = sparsecc.sparsify_(m, {"default": config, "lm_head": None})
    if quantized:
        quantize_(m, report, group_size=group_size)
    return m, report


def bits_of(t):
    """The bit pattern of a float tensor, with -0.0 as +0.0 (pruned zeros load as +0.0)."""
    t = t.detach() + 0.0
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same_bits(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(bits_of(sa[k]), bits_of(sb[k]))
                                          for k in sa)


def same_grids(a, b):
    names = [n for n, mod in a.named_modules() if grid_of(mod) is not None]
    if names != [n for n, mod in b.named_modules() if grid_of(mod) is not None]:
        return False
    for n in names:
        ga, gb = grid_of(a.get_submodule(n)), grid_of(b.get_submodule(n))
        if (ga.bits, ga.group_size, ga.sym, ga.in_features) != (gb.bits, gb.group_size, gb.sym, gb.in_features):
            return False
        if not all(torch.equal(x, y) for x, y in ((ga.codes, gb.codes), (ga.scales, gb.scales), (ga.zeros, gb.zeros))):
            return False
    return True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("compress", [True, False], ids=["compressed", "plain"])
def test_round_trip_is_bit_exact(kind, dtype, compress, tmp_path):
    m, report = make(kind, dtype)
    out = sparsecc.save_pruned(m, tmp_path / "c", report, compress=compress)
    loaded, meta = sparsecc.load_pruned(out)
    assert same_bits(m, loaded) and loaded.dtype == dtype
    assert same_grids(m, loaded)
    quantized = KINDS[kind][1]
    assert (grid_of(loaded.get_submodule(UP.removesuffix(".weight"))) is not None) == quantized
    if compress:
        assert {e["layout"] for e in meta["compressed"].values()} == {KINDS[kind][2]}
        assert meta["masks"] == {} and not (out / checkpoint.MASKS).exists()  # the layouts say the masks
        assert not (out / checkpoint.QUANT).exists()
        assert all(e["dtype"] == str(dtype).removeprefix("torch.") for e in meta["compressed"].values())
    else:
        assert meta["compressed"] == {} and set(meta["masks"]) == {r["param"] for r in report.rows}
        assert set(meta["quantized"]) == ({r["param"] for r in report.rows} if quantized else set())
        plain = type(m).from_pretrained(out)  # the dequantized weights: plain transformers loads them
        assert same_bits(m, plain)
    fresh = _llama(dtype)
    fresh = sparsecc.load_pruned(out, model=fresh)[0]
    assert same_bits(m, fresh) and same_grids(m, fresh)


@pytest.mark.parametrize("kind", ["quantized+unstructured", "nm", "quantized+nm"])
def test_transposed_weights_round_trip(make_model, kind, tmp_path):
    """GPT-2's Conv1D weights are [in, out]; grids and compressed forms are [out, in]."""
    m, report = make(kind, group_size=32, model=make_model("gpt2"))
    assert any(r["transposed"] for r in report.rows)
    out = sparsecc.save_pruned(m, tmp_path / "c", report, compress=True)
    loaded, meta = sparsecc.load_pruned(out)
    assert same_bits(m, loaded) and same_grids(m, loaded)
    entry = meta["compressed"]["transformer.h.0.mlp.c_fc.weight"]
    assert entry["transposed"] and entry["shape"] == [256, 64]


def test_quantized_rows_fall_back_when_codes_are_not_nm(tmp_path):
    """A grid whose nonzero codes break the row's N:M pattern is stored with a bitmask instead."""
    m, report = make("quantized+nm")
    lin = m.get_submodule(UP.removesuffix(".weight"))
    grid = grid_of(lin)
    codes = grid.unpacked().clone()
    codes[0, :4] = grid.zeros[0, 0] + 1  # the first group: four nonzero codes ...
    from sparsecc.prune.quantize import make_grid
    lin.__dict__[QUANTIZED] = g = make_grid(codes, grid.scales, grid.zeros, grid.bits, grid.group_size, grid.sym)
    with torch.no_grad():
        lin.weight.copy_(g.dequantize())
    report.rows[[r["param"] for r in report.rows].index(UP)]["config"]["pattern"] = None  # ... so no longer 2:4
    report.rows[[r["param"] for r in report.rows].index(UP)]["sparsity"] = float((lin.weight == 0).float().mean())
    out = sparsecc.save_pruned(m, tmp_path / "c", report, compress=True)
    loaded, meta = sparsecc.load_pruned(out)
    assert meta["compressed"][UP]["layout"] == "int-bitmask"
    assert same_bits(m, loaded) and same_grids(m, loaded)


@pytest.mark.parametrize("kind, at_most", [("unstructured", 0.6), ("nm", 0.56), ("quantized+unstructured", 0.2)])
def test_compressed_linears_are_smaller_than_dense(kind, at_most, tmp_path):
    m, report = make(kind)  # fp32; 4-bit groups of 128 for the quantized one
    out = sparsecc.save_pruned(m, tmp_path / "c", report, compress=True)
    size = sparsecc.io.checkpoint.checkpoint_size(out)
    meta = json.loads((out / checkpoint.META).read_text())
    assert meta["size"] == size
    linear_dense = sum(r["shape"][0] * r["shape"][1] * 4 for r in report.rows)
    assert size["linear_dense_bytes"] == linear_dense
    assert size["linear_bytes"] / linear_dense == pytest.approx(size["linear_ratio"], abs=1e-4)
    assert size["linear_ratio"] <= at_most
    dense_bytes = sum(v.numel() * v.element_size() for v in m.state_dict().values())  # untied: all of them
    assert size["dense_bytes"] == dense_bytes and size["ratio"] < 1
    plain = sparsecc.io.checkpoint.checkpoint_size(sparsecc.save_pruned(m, tmp_path / "p", report))
    extra = 1 / 32 + (4 / 32 + 5 / 128 / 4 if KINDS[kind][1] else 0)  # mask bits (+ codes, scales and zeros)
    assert plain["dense_bytes"] == dense_bytes and plain["linear_ratio"] == pytest.approx(1 + extra, abs=0.005)
    assert size["bytes"] < plain["bytes"]


@pytest.mark.parametrize("recipe, layout", [
    ({"default": sparsecc.RTNConfig(bits=4, group_size=64)}, "int"),
    ({"default": sparsecc.SparseGPTConfig(0.5, bits=4, group_size=64)}, "int-bitmask"),
    ({"default": sparsecc.SparseGPTConfig(pattern="2:4", bits=8, group_size=None)}, "int-nm"),
], ids=["rtn", "sparsegpt-4bit", "sparsegpt-2:4-8bit"])
def test_quantizing_configs_round_trip(make_model, batches, recipe, layout, tmp_path):
    m = make_model("llama")
    report = sparsecc.sparsify_(m, recipe | {"lm_head": None}, batches, progress=False)
    for compress in (True, False):
        out = sparsecc.save_pruned(m, tmp_path / str(compress), report, recipe=recipe, compress=compress)
        loaded, meta = sparsecc.load_pruned(out)
        assert same_bits(m, loaded) and same_grids(m, loaded) and grid_of(loaded.get_submodule("model.layers.0.mlp.up_proj"))
        assert {e["layout"] for e in meta["compressed"].values()} == ({layout} if compress else set())


def test_masks_are_bits(tmp_path):
    m, report = make("unstructured")
    out = sparsecc.save_pruned(m, tmp_path / "c", report)
    packed = load_file(str(out / checkpoint.MASKS))
    numel = sum(r["shape"][0] * r["shape"][1] for r in report.rows)  # what bool masks (format 1) took
    assert sum(v.numel() for v in packed.values()) * 8 == numel
    assert (out / checkpoint.MASKS).stat().st_size < numel / 4
    for name, bits in packed.items():
        assert bits.dtype == torch.uint8 and torch.equal(unpack_bits(bits, bits.shape[1] * 8), m.get_parameter(name) != 0)


def test_compressed_folder_refuses_from_pretrained_and_one_line_makes_a_plain_one(tmp_path):
    m, report = make("quantized+unstructured")
    out = sparsecc.save_pruned(m, tmp_path / "c", report, compress=True)
    assert all(t.numel() == 0 for k, t in load_file(str(out / "model.safetensors")).items()
               if k in json.loads((out / checkpoint.META).read_text())["compressed"])
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        type(m).from_pretrained(out)
    model, _ = sparsecc.load_pruned(out)
    model.save_pretrained(tmp_path / "dense")
    assert same_bits(m, type(m).from_pretrained(tmp_path / "dense"))


def test_save_refuses_weights_changed_after_quantizing(tmp_path):
    m, report = make("quantized+unstructured")
    with torch.no_grad():
        m.get_parameter(UP)[m.get_parameter(UP) != 0] *= 1.001  # same mask, other values
    for compress in (False, True):
        with pytest.raises(sparsecc.PlanError, match=f"{UP} no longer equals the values of its quantization grid: "
                                                     "its weights changed after quantizing"):
            sparsecc.save_pruned(m, tmp_path / "c", report, compress=compress)
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_a_row_recording_bits_without_a_grid(tmp_path):
    m, report = make("unstructured")
    report.rows[0]["config"] = sparsecc.RTNConfig(bits=4).to_dict()
    with pytest.raises(sparsecc.PlanError, match="records 4-bit quantization, but the module holds no quantization grid"):
        sparsecc.save_pruned(m, tmp_path / "c", report)
    quantize_(m, report, bits=8)
    with pytest.raises(sparsecc.PlanError, match="records 4-bit quantization, but the module's grid is 8-bit"):
        sparsecc.save_pruned(m, tmp_path / "c", report)


def _strip_hashes(out):
    meta = json.loads((out / checkpoint.META).read_text())
    meta.pop("sha256")
    (out / checkpoint.META).write_text(json.dumps(meta))


def _edit(file, key, fn):
    s = load_file(str(file))
    s[key] = fn(s[key])
    save_file(s, str(file))


def _flip(file, key):
    data = bytearray(file.read_bytes())
    n = int.from_bytes(data[:8], "little")
    data[8 + n + json.loads(data[8:8 + n])[key]["data_offsets"][0]] ^= 1
    file.write_bytes(bytes(data))


def _inc(t):
    t = t.clone()
    t.view(-1)[0] += 1
    return t


@pytest.mark.parametrize("compress, damage, match", [
    (True, lambda o: _flip(o / checkpoint.PACKED, UP + ".codes"), f"tensor '{UP}.codes' changed since it was saved"),
    (True, lambda o: _flip(o / checkpoint.PACKED, UP + ".scales"), f"tensor '{UP}.scales' changed"),
    (False, lambda o: _flip(o / checkpoint.QUANT, UP + ".zeros"), f"tensor '{UP}.zeros' changed"),
    (True, lambda o: (_edit(o / checkpoint.PACKED, UP + ".zeros", lambda z: z[:, :0].contiguous()), _strip_hashes(o)),
     f"compressed '{UP}': scales .* must be torch.float32 and torch.uint8 \\[256, 1\\]"),
    (True, lambda o: (_edit(o / checkpoint.PACKED, UP + ".codes", lambda c: c[:, 1:].contiguous()), _strip_hashes(o)),
     f"compressed '{UP}': 4-bit codes of \\d+ columns must be uint8"),
    (True, lambda o: (_edit(o / checkpoint.PACKED, UP + ".zeros", lambda z: z + 16), _strip_hashes(o)),
     f"compressed '{UP}': codes or zero points exceed 4 bits"),
    (False, lambda o: (_edit(o / checkpoint.QUANT, UP + ".scales", _inc), _strip_hashes(o)),
     f"'{UP}' does not equal the values of its quantization grid"),
    (False, lambda o: (_edit(o / "model.safetensors", UP, lambda w: w * 2), _strip_hashes(o)),
     f"'{UP}' does not equal the values of its quantization grid"),
    (False, lambda o: (_edit(o / checkpoint.QUANT, UP + ".codes", lambda c: c.long()), _strip_hashes(o)),
     f"quantized '{UP}': 4-bit codes .* must be uint8"),
], ids=["codes-bit", "scales-bit", "plain-zeros-bit", "zeros-shape", "codes-shape", "zeros-range", "plain-scales",
        "plain-weight", "plain-codes-dtype"])
def test_damaged_quantized_checkpoints_leave_the_model_unchanged(compress, damage, match, tmp_path, state_tools):
    snapshot, same_state = state_tools
    m, report = make("quantized+unstructured")
    out = sparsecc.save_pruned(m, tmp_path / "c", report, compress=compress)
    damage(out)
    with pytest.raises(sparsecc.PlanError, match=match):
        sparsecc.load_pruned(out)
    fresh = _llama()
    other, _ = make("quantized", model=_llama())  # a quantized model keeps its own grids too
    for target in (fresh, other):
        snap, grids = snapshot(target), {n: id(grid_of(mod)) for n, mod in target.named_modules()}
        with pytest.raises(sparsecc.PlanError, match=match):
            sparsecc.load_pruned(out, model=target)
        assert same_state(target, snap)
        assert {n: id(grid_of(mod)) for n, mod in target.named_modules()} == grids  # none attached, none dropped


def test_loading_replaces_stale_grids(tmp_path):
    m, report = make("unstructured")  # not quantized
    out = sparsecc.save_pruned(m, tmp_path / "c", report, compress=True)
    q, _ = make("quantized", model=_llama())
    loaded, _ = sparsecc.load_pruned(out, model=q)
    assert same_bits(m, loaded) and all(grid_of(mod) is None for mod in loaded.modules())


def test_malformed_entries_get_clear_errors(tmp_path):
    m, report = make("quantized+nm")
    out = sparsecc.save_pruned(m, tmp_path / "c", report, compress=True)
    meta = json.loads((out / checkpoint.META).read_text())
    for edit, match in [(lambda e: e.update(layout="zip"), "layout 'zip'"), (lambda e: e.update(bits=5), "bits 5"),
                        (lambda e: e.update(group_size=100), "group_size dividing the width 128"),
                        (lambda e: e.update(dtype="int8"), "dtype 'int8'"), (lambda e: e.update(m=3), "m dividing"),
                        (lambda e: e.update(shape=[1]), "bad 'shape'")]:
        broken = json.loads(json.dumps(meta))
        edit(broken["compressed"][UP])
        (out / checkpoint.META).write_text(json.dumps(broken))
        with pytest.raises(sparsecc.PlanError, match=f"compressed\\['{UP}'\\] .*{match}"):
            sparsecc.load_pruned(out)


def _format1(model, report, out, compress):
    """A folder as format 1 wrote it: bool masks of every pruned weight, N:M weights in sparsecc_nm."""
    from sparsecc.codegen.nm_format import compress as nm_compress
    params = dict(model.named_parameters())
    nm, entries = {}, {}
    if compress:
        for row in report.rows:
            if row["config"]["pattern"]:
                nm[row["param"] + ".values"], nm[row["param"] + ".index"] = nm_compress(params[row["param"]].detach(), 2, 4)
                entries[row["param"]] = {"n": 2, "m": 4, "in_features": row["shape"][1], "transposed": False}
    out.mkdir()
    model.save_pretrained(out, state_dict={k: torch.empty(0, dtype=v.dtype) if k in entries else v
                                           for k, v in model.state_dict().items()})
    save_file({r["param"]: (params[r["param"]] != 0).contiguous() for r in report.rows}, str(out / checkpoint.MASKS))
    if nm:
        save_file(nm, str(out / checkpoint.NM))
    meta = {"format": 1, "sparsecc": "0.1", "torch": torch.__version__, "model_class": type(model).__name__,
            "recipe": None, "rows": report.rows, "setup": {}, "compressed": entries}
    meta["sha256"] = {f.name: checkpoint._tensor_hashes(f) for f in sorted(out.glob("*.safetensors"))}
    (out / checkpoint.META).write_text(json.dumps(meta))
    return out


@pytest.mark.parametrize("compress", [False, True])
def test_format_1_folders_still_load(compress, tmp_path, state_tools):
    m = _llama()
    report = sparsecc.sparsify_(m, {"re:.*mlp\\..*": sparsecc.MagnitudeConfig(pattern="2:4"),
                                    "re:.*self_attn\\..*": sparsecc.MagnitudeConfig(0.5), "lm_head": None})
    out = _format1(m, report, tmp_path / "old", compress)
    loaded, meta = sparsecc.load_pruned(out)
    assert meta["format"] == 1 and same_bits(m, loaded)
    size = sparsecc.io.checkpoint.checkpoint_size(out)
    assert size["dense_bytes"] == sum(v.numel() * v.element_size() for v in m.state_dict().values())
    assert (size["linear_ratio"] < 1) == compress
    _edit(out / checkpoint.MASKS, UP, lambda k: ~k)  # the old checks still apply to old folders
    snapshot, same_state = state_tools
    fresh = _llama()
    snap = snapshot(fresh)
    with pytest.raises(sparsecc.PlanError, match=f"checkpoint tensor '{UP}' changed since it was saved"):
        sparsecc.load_pruned(out, model=fresh)
    assert same_state(fresh, snap)


def test_unknown_format_is_refused(tmp_path):
    m, report = make("nm")
    out = sparsecc.save_pruned(m, tmp_path / "c", report)
    meta = json.loads((out / checkpoint.META).read_text())
    (out / checkpoint.META).write_text(json.dumps(meta | {"format": 4}))
    with pytest.raises(sparsecc.PlanError, match="has format 4; this sparsecc .* reads formats 1, 2, 3"):
        sparsecc.load_pruned(out)


def test_size_line():
    from sparsecc.tools.cli import size_line
    assert size_line({"bytes": 1_234_567, "ratio": 0.3123, "linear_ratio": 0.1049}) == \
        "checkpoint 1.23 MB = 0.31x dense; pruned linears 0.10x"
    assert size_line({"bytes": 999, "ratio": None, "linear_ratio": None}) == "checkpoint 999 B"


def test_cli_prune_prints_the_size(tiny_zoo, tmp_path, capsys):
    from sparsecc.tools import cli
    from sparsecc.zoo import load_tokens
    model, tok, _, _ = tiny_zoo
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    (tmp_path / "calib.txt").write_text(tok.decode(load_tokens().train[:8_000].tolist()))
    (tmp_path / "r.yaml").write_text('default: {method: magnitude, sparsity: 0.5}\nlm_head: null\n')
    code = cli.main([str(a) for a in ("prune", tmp_path / "tiny", "--recipe", tmp_path / "r.yaml", "--calib",
                                      tmp_path / "calib.txt", "--out", tmp_path / "out", "--nsamples", 2, "--quiet",
                                      "--compress")])
    stdout = capsys.readouterr().out
    size = checkpoint.checkpoint_size(tmp_path / "out")
    assert code == 0 and size["linear_ratio"] < 0.6 and size["ratio"] < 1
    assert cli.size_line(size) in stdout and "x dense; pruned linears 0.5" in stdout


@pytest.mark.parametrize("compress", [False, True])
def test_sharded_folders_save_and_load(compress, tmp_path):
    """A model saved in several shards (save_pretrained's max_shard_size, as large models are) loads
    back bit for bit, fresh and into a model, and its size is counted over every shard."""
    m, report = make("quantized+unstructured")
    out = sparsecc.save_pruned(m, tmp_path / "m", report, compress=compress, max_shard_size="100KB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    loaded, _ = sparsecc.load_pruned(out)
    assert same_bits(loaded, m) and same_grids(loaded, m)
    into = _llama()
    sparsecc.load_pruned(out, model=into)
    assert same_bits(into, m) and same_grids(into, m)
    size = sparsecc.checkpoint_size(out)
    assert size["dense_bytes"] == sum(v.numel() * v.element_size() for v in m.state_dict().values())
    (out / checkpoint.INDEX).write_text("{not json")
    with pytest.raises(sparsecc.PlanError, match="model.safetensors.index.json.* is corrupt"):
        sparsecc.load_pruned(out, model=_llama())
