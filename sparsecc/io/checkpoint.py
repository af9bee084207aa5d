"""Pruned checkpoints: a model folder plus what sparsecc knows about it. Never pickle.

    out/
      config.json, model.safetensors (or shards + model.safetensors.index.json, with max_shard_size),
      tokenizer files               `save_pretrained`
      sparsecc.json                 format, versions, recipe, per-layer report, calibration setup,
                                    sha256 of every tensor in the folder's safetensors files, and
                                    "size": weight bytes vs the dense equivalent (`checkpoint_size`)
      sparsecc_masks.safetensors    keep-mask of every pruned parameter not stored compressed, in the
                                    parameter's own layout, as bits (`codegen/bitmask.py`: uint8
                                    [rows, ceil(cols/8)], little-endian bit order); shapes in
                                    sparsecc.json "masks" (format 1 folders: bool masks)
      sparsecc_quant.safetensors    without compress: the quantization grid (codes, scales, zeros) of
                                    every quantized weight, whose dequantized values model.safetensors holds
      sparsecc_compressed.safetensors  with compress=True: every pruned/quantized weight, in the
                                    smallest layout that fits (sparsecc.json "compressed"[param]["layout"]):
          nm           kept values [out, in·N/M] + packed positions (`codegen/nm_format.py`)
          bitmask      kept values (row-major, 1-D) + bitmask [out, ceil(in/8)]
          int          packed codes + scales + zeros (`prune/int_format.py`)
          int-bitmask  packed codes of the kept weights only + scales + zeros + bitmask
          int-nm       packed codes of the N kept per group + scales + zeros + packed positions
                                    (all in [out, in] orientation; model.safetensors then holds an
                                    empty placeholder for each, and no separate mask is stored)
      plan/                         with plan=...: the Plan (decisions + statistics) to reproduce it

`load_pruned` is the way to load a folder; it rebuilds compressed weights bit for bit (pruned
zeros come back as +0.0) and puts quantization grids back on their modules (`grid_of`), so
`pack_` can use them. Plain transformers `from_pretrained` also loads a folder saved without
compress=True, if its config describes the model (a structurally pruned model whose MLPs, or heads,
all keep one width: `structured.shrunk_config`); a compressed one it refuses (the placeholders do
not fit the model) rather than initialising those weights randomly. For from_pretrained users,
one line makes a plain folder of a compressed one:

    model, _ = sparsecc.load_pruned(path); model.save_pretrained(dense_dir)

Folders of format 1 (bool masks, N:M weights in sparsecc_nm.safetensors) and folders saved before
tensors were hashed (no "sha256" in sparsecc.json, then unchecked by hash) still load.

The folder is written to a temporary sibling and renamed into place, so an interrupted save
(Ctrl-C included) leaves no half-written output; `save_pruned` first checks the report against
the model (and each quantized weight against its grid). `load_pruned` checks the format, the
metadata, every tensor's hash, dtypes, shapes and that every weight respects its mask before
changing or returning the model.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from .. import techniques as _techniques  # noqa: F401  (registers the built-in techniques by name)
from .. import __version__
from ..techniques.configs import config_from_dict
from ..errors import PlanError, SparseccError
from ..codegen.bitmask import pack_bits, packed_cols, unpack_bits
from ..prune.quantize import QUANTIZED, QuantGrid, grid_of
from ..techniques.rewrites import REWRITTEN, is_rewrite_row, restore_rewrites
from ..techniques.structured import shrunk_config
from ..prune.masks import follows_nm, parse_pattern, zero_share
from .folders import check_output_dir, writing_folder
from .layouts import (compress_weight, entry_error, expand_weight, float_dtype, getter, grid_fields, is_shape,
                      read_grid, weight_entry)
from .recipes import dump_recipe

FORMAT = 2
READS = (1, 2, 3)  # format 1: bool masks, N:M weights in NM; 3: sparsecc's files split by block ("files")
META, MASKS, PLAN = "sparsecc.json", "sparsecc_masks.safetensors", "plan"
PACKED, QUANT = "sparsecc_compressed.safetensors", "sparsecc_quant.safetensors"
NM = "sparsecc_nm.safetensors"  # format 1's compressed N:M weights
INDEX = "model.safetensors.index.json"  # save_pretrained's map of a sharded model's weights


def save_pruned(model: nn.Module, path, report, *, recipe=None, tokenizer=None, plan=None,
                compress: bool = False, overwrite: bool = False, max_shard_size=None) -> Path:
    """Save `model` (pruned by `sparsify_`, whose `report` says what was pruned) to folder `path`.

    `compress=True` stores every pruned or quantized weight compressed (such a folder loads with
    `load_pruned` only; see the module docstring for the layouts); sparsecc.json's "size" then says
    the bytes against the dense model (also `checkpoint_size(path)`). The report must be this
    model's: each row's parameter, shape, sparsity and N:M pattern are checked, and a quantized
    module's weight must still equal its grid's values, before anything is written. An existing
    `path` is refused unless `overwrite=True`, and is only replaced once the new folder is complete.
    `max_shard_size` (e.g. "5GB") is save_pretrained's: the model's weights in several files."""
    path = Path(path)
    check_output_dir(path, overwrite)
    adapted = [n for n, m in model.named_modules() if parametrize.is_parametrized(m)]
    if adapted:
        raise PlanError(f"{adapted[0]} still carries a parametrization (LoRA adapters kept by "
                        "finetune_(merge=False)?): merge them first with sparsecc.merge_adapters_(model)")
    params = dict(model.named_parameters(remove_duplicate=False))
    tensors, fields = checked_part(model, report.rows, params, compress)
    meta = checkpoint_meta(model, report, recipe) | fields

    state = saved_state(model, fields["compressed"])
    with writing_folder(path) as tmp:
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(tmp, state_dict=state,
                                  **({} if max_shard_size is None else {"max_shard_size": max_shard_size}))
            config = shrunk_config(model, report.rows)
            if config is not None:  # uniformly shrunk: plain from_pretrained builds the right shapes
                config.save_pretrained(tmp)
        else:
            save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for file, part in tensors.items():
            if part:
                save_file(part, str(tmp / file))
        if plan is not None:
            plan.save(tmp / PLAN)
        write_meta(tmp, meta)
    return path


def saved_state(model: nn.Module, compressed=()) -> dict[str, torch.Tensor]:
    """What model.safetensors holds for `model` (save_pruned gives it to save_pretrained; a folder
    written block by block, io/onload.py, takes each part's share of it): its state dict — parameters
    and persistent buffers, so no rotary inv_freq; what rewrites added (MoE experts and routers, FLAP's
    biases) and at the shapes they left (shrunk linears) — less the keys its class never saves, each
    weight stored compressed (`compressed`) an empty placeholder: plain from_pretrained then refuses
    the folder (size mismatch) instead of initialising that weight randomly. Tied weights are all
    in it (save_pretrained writes one of them)."""
    ignored = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    return {k: torch.empty(0, dtype=v.dtype) if k in compressed else v
            for k, v in model.state_dict().items() if k not in ignored}


def checkpoint_meta(model: nn.Module, report, recipe) -> dict:
    """sparsecc.json's description of the run (what checked_part and write_meta add is the rest)."""
    return {"format": FORMAT, "sparsecc": __version__, "torch": torch.__version__,
            "model_class": type(model).__name__, "recipe": dump_recipe(recipe) if recipe is not None else None,
            "rows": report.rows, "setup": report.setup}


def checked_part(model: nn.Module, rows: list[dict], params: dict, compress: bool) -> tuple[dict, dict]:
    """What sparsecc's files hold for the parameters `params` that the report `rows` pruned (the
    whole model, or one decoder block written while onloading): ({file: {tensor: value}},
    {"compressed", "quantized", "masks": sparsecc.json entries}), each row checked against its weight."""
    pruned = {}
    for row in rows:
        if is_rewrite_row(row):  # a module rewrite (CATS threshold, attention form): its row is the state
            _check_rewrite_row(row, model)
            continue
        if row.get("replaced_by"):  # pruned, then replaced by a rewrite (an MoE split): no parameter now
            continue
        _check_row(row, params)
        pruned[row["param"]] = row
    grids = {name: g for name, row in pruned.items() if (g := _checked_grid(model, row, params[name])) is not None}
    packed, entries = {}, {}
    if compress:
        for name, row in pruned.items():
            entries[name], tensors = compress_weight(params[name], row, grids.get(name))
            packed |= {f"{name}.{k}": v.contiguous() for k, v in tensors.items()}
    masks = {name: pack_bits((params[name].detach() != 0).cpu()) for name in pruned if name not in entries}
    quant, quant_meta = {}, {}
    for name, grid in grids.items():
        if name not in entries:  # the grid beside the dequantized weight, so it survives the round trip
            quant |= {f"{name}.{k}": getattr(grid, k).contiguous() for k in ("codes", "scales", "zeros")}
            quant_meta[name] = weight_entry(params[name], pruned[name]) | grid_fields(grid)
    return ({MASKS: masks, PACKED: packed, QUANT: quant},
            {"compressed": entries, "quantized": quant_meta, "masks": {name: list(params[name].shape) for name in masks}})


def write_meta(folder: Path, meta: dict) -> None:
    """Hash every safetensors file of the folder as written, add the size figures, write sparsecc.json."""
    meta["sha256"] = {f.name: _tensor_hashes(f) for f in sorted(folder.glob("*.safetensors"))}
    meta["size"] = _size(folder, meta)
    (folder / META).write_text(json.dumps(meta, indent=2, default=str) + "\n")


def _checked_grid(model: nn.Module, row: dict, p: torch.Tensor) -> QuantGrid | None:
    """The quantization grid of the row's module (on the CPU), checked against its weight; None if
    the module is not quantized."""
    bits, fix = (row.get("config") or {}).get("bits"), "pass the report sparsify_ returned for this model"
    try:
        grid = grid_of(model.get_submodule(row["module"]))
    except AttributeError:
        grid = None
    if grid is None:
        if bits is not None:
            raise PlanError(f"report row {row['module']!r} records {bits}-bit quantization, but the module holds no "
                            f"quantization grid; {fix}")
        return None
    if bits is not None and bits != grid.bits:
        raise PlanError(f"report row {row['module']!r} records {bits}-bit quantization, but the module's grid is "
                        f"{grid.bits}-bit; {fix}")
    grid = grid.to("cpu")
    w = p.detach().cpu()
    w = w.t() if row.get("transposed") else w
    try:
        same = grid.matches(w)
    except PlanError as e:
        raise PlanError(f"{row['module']}: its quantization grid is malformed ({e})") from None
    if not same:
        raise PlanError(f"{row['param']} no longer equals the values of its quantization grid: its weights changed "
                        "after quantizing; quantize it again (or drop the grid: "
                        f"del module.__dict__[{QUANTIZED!r}]) before saving")
    return grid


def _check_rewrite_row(row: dict, model: nn.Module) -> None:
    """A rewrite row must name a module of `model` that this config rewrote (rewrites.REWRITTEN)."""
    kind = row["config"].get("type")
    try:
        done = model.get_submodule(row["module"]).__dict__.get(REWRITTEN)
    except AttributeError:
        done = None
    if type(done).__name__ != kind:
        raise PlanError(f"report row {row['module']!r} records a {kind} rewrite this model does not have; "
                        "pass the report sparsify_ returned for this model")


def _check_row(row: dict, params: dict[str, nn.Parameter]) -> None:
    """A report row describes this model: its parameter exists with the row's shape and has the
    sparsity (and N:M pattern) the row records, so sparsecc.json will not lie about the weights."""
    module, name, fix = row.get("module"), row.get("param"), "pass the report sparsify_ returned for this model"
    p = params.get(name) if isinstance(name, str) else None
    if p is None:
        raise PlanError(f"report row {module!r} names no parameter of this model ({name!r}); {fix}")
    w = p.detach().t() if row.get("transposed") else p.detach()  # [out, in], as rows record shapes
    if list(w.shape) != list(row.get("shape") or []):
        raise PlanError(f"report row {module!r} records shape {row.get('shape')}, but {name} is {list(w.shape)}; {fix}")
    zeros = zero_share(w)
    recorded = row.get("sparsity")
    if not isinstance(recorded, (int, float)) or abs(zeros - recorded) > 1e-3 + 1 / max(w.numel(), 1):
        raise PlanError(f"report row {module!r} records sparsity {recorded}, but {name} has {zeros:.4f}; {fix}")
    nm = parse_pattern((row.get("config") or {}).get("pattern"))
    if nm is not None:
        n, m = nm
        if not follows_nm(w, n, m):
            raise PlanError(f"report row {module!r} records {n}:{m} sparsity, but {name} is not {n}:{m}; {fix}")


def _read_header(f) -> tuple[int, dict]:
    """(header length, header) of an open safetensors file."""
    size = int.from_bytes(f.read(8), "little")
    if size > os.fstat(f.fileno()).st_size:
        raise ValueError("the header ends past the end of the file")
    return size, json.loads(f.read(size))


def _header(file: Path) -> dict:
    with open(file, "rb") as f:
        return _read_header(f)[1]


def _tensor_hashes(file: Path) -> dict[str, str]:
    """sha256 of each tensor's bytes in a safetensors file, read from the file itself (its header
    gives every tensor's byte range), so the record holds exactly what was written."""
    hashes = {}
    with open(file, "rb") as f:
        size, header = _read_header(f)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            f.seek(8 + size + begin)
            h, left = hashlib.sha256(), end - begin
            while left > 0:
                chunk = f.read(min(left, 1 << 24))
                if not chunk:
                    raise ValueError(f"tensor {name!r} ends past the end of the file")
                h.update(chunk)
                left -= len(chunk)
            hashes[name] = h.hexdigest()
    return hashes


def _verify_hashes(path: Path, meta: dict) -> None:
    """Every tensor recorded in sparsecc.json still has its bytes (folders saved before tensors
    were hashed have no record and are not checked)."""
    for fname, expected in meta.get("sha256", {}).items():
        file = path / fname
        if not file.is_file():
            raise PlanError(f"checkpoint file {str(file)!r} is missing")
        try:
            found = _tensor_hashes(file)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # a malformed header
            raise PlanError(f"{str(file)!r} is corrupt or truncated: {e}") from None
        for name in sorted(expected.keys() | found.keys()):
            if name not in found:
                raise PlanError(f"checkpoint tensor {name!r} is missing from {fname}; re-save the checkpoint")
            if name not in expected:
                raise PlanError(f"checkpoint tensor {name!r} was added to {fname} after saving; re-save the checkpoint")
            if found[name] != expected[name]:
                raise PlanError(f"checkpoint tensor {name!r} changed since it was saved (sha256 mismatch); "
                                f"re-save it ({fname})")


def read_meta(path) -> dict:
    """sparsecc.json of a checkpoint, validated; errors say what is wrong with the folder."""
    path = Path(path)
    if not path.is_dir():
        raise PlanError(f"checkpoint {str(path)!r} does not exist (or is not a folder)")
    if not (path / META).is_file():
        raise PlanError(f"{str(path)!r} is not a sparsecc checkpoint (no {META}); "
                        "a plain transformers folder loads with from_pretrained")
    try:
        meta = json.loads((path / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlanError(f"{str(path / META)!r} is corrupt: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") not in READS or type(meta.get("format")) is not int:
        raise PlanError(f"{str(path / META)!r} has format {meta.get('format') if isinstance(meta, dict) else '?'}; "
                        f"this sparsecc ({__version__}) reads formats {', '.join(map(str, READS))}")
    _check_meta(meta, path / META)
    return meta


def _check_meta(meta: dict, file: Path) -> None:
    """The fields of sparsecc.json that loading reads have the types save_pruned writes."""
    def bad(what: str) -> PlanError:
        return PlanError(f"{str(file)!r}: {what}; re-save the checkpoint with save_pruned")

    for key, kind, word in (("rows", list, "a list"), ("setup", dict, "a dict"), ("compressed", dict, "a dict"),
                            ("quantized", dict, "a dict"), ("masks", dict, "a dict"), ("size", dict, "a dict"),
                            ("sha256", dict, "a dict"), ("recipe", (dict, type(None)), "a dict or null")):
        if key in meta and not isinstance(meta[key], kind):
            raise bad(f"{key!r} must be {word}, not {type(meta[key]).__name__}")
    if not all(c is None or isinstance(c, dict) for c in (meta.get("recipe") or {}).values()):
        raise bad("'recipe' must map targets to configs or null")
    for i, row in enumerate(meta.get("rows", [])):
        if not isinstance(row, dict):
            raise bad(f"rows[{i}] must be a dict, not {type(row).__name__}")
        for key, ok in (("module", isinstance(row.get("module"), str)),
                        ("param", row.get("param") is None or isinstance(row["param"], str)),
                        ("config", isinstance(row.get("config"), dict)),
                        ("shape", row.get("shape") is None or is_shape(row["shape"])),
                        ("transposed", isinstance(row.get("transposed", False), bool)),
                        ("sparsity", type(row.get("sparsity", 0.0)) in (int, float))):
            if not ok:
                raise bad(f"rows[{i}] has a bad or missing {key!r} ({row.get(key)!r})")
        try:
            config_from_dict(row["config"])
        except (SparseccError, TypeError, ValueError, AttributeError) as e:
            raise bad(f"rows[{i}] has a bad 'config' ({e})") from None
    for name, info in meta.get("compressed", {}).items():
        if meta["format"] == 1:
            ints = [info.get(k) for k in ("n", "m", "in_features")] if isinstance(info, dict) else []
            if not (len(ints) == 3 and all(type(v) is int and v > 0 for v in ints) and ints[0] <= ints[1]
                    and ints[2] % ints[1] == 0 and isinstance(info.get("transposed"), bool)):
                raise bad(f"compressed[{name!r}] must be {{n, m, in_features, transposed}} of an N:M weight, "
                          f"not {info!r}")
        elif (why := entry_error(info, compressed=True)) is not None:
            raise bad(f"compressed[{name!r}] {why}")
    for name, info in meta.get("quantized", {}).items():
        if (why := entry_error(info, compressed=False)) is not None:
            raise bad(f"quantized[{name!r}] {why}")
    for name, shape in meta.get("masks", {}).items():
        if not is_shape(shape):
            raise bad(f"masks[{name!r}] must be the [rows, cols] of its parameter, not {shape!r}")
    files = meta.get("files", {})
    if not (isinstance(files, dict) and set(files) <= {MASKS, PACKED, QUANT}
            and all(isinstance(v, list) and all(isinstance(n, str) and n.endswith(".safetensors") and Path(n).name == n
                                                for n in v) for v in files.values())):
        raise bad(f"'files' must map {MASKS}, {PACKED} or {QUANT} to lists of safetensors files of the folder")
    for fname, table in meta.get("sha256", {}).items():
        if not (isinstance(fname, str) and fname.endswith(".safetensors") and Path(fname).name == fname
                and fname not in (".", "..") and isinstance(table, dict)
                and all(isinstance(v, str) and len(v) == 64 for v in table.values())):
            raise bad("'sha256' must map safetensors files of the folder to {tensor: sha256 hex digest}")


def load_pruned(path, model: nn.Module | None = None):
    """Load a checkpoint written by `save_pruned` -> (model, meta).

    Without `model`, the transformers class named in config.json is built from the folder
    (`from_pretrained`, safetensors only, no remote code); with `model`, its parameters are
    loaded into it, only once everything has been checked (a failure leaves it as it was).
    Compressed weights are rebuilt exactly, every mask is checked, and quantized modules get
    their grids back (`sparsecc.prune.quantize.grid_of`)."""
    path = Path(path)
    meta = read_meta(path)
    _verify_hashes(path, meta)  # a changed bit in any recorded tensor is reported before anything is loaded
    masks = _read_masks(path, meta)
    compressed = meta.get("compressed", {})
    packed_file = path / (NM if meta["format"] == 1 else PACKED)
    packed = _load_kind(path, meta, PACKED if meta["format"] > 1 else NM) if compressed else {}
    _no_strays(packed_file, packed, compressed)
    state, grids = {}, {}
    for name, info in compressed.items():
        state[name], grid = expand_weight(packed_file, name, info, packed)
        if grid is not None:
            grids[name] = grid
    quantized = meta.get("quantized", {})
    quant = _load_kind(path, meta, QUANT) if quantized else {}
    _no_strays(path / QUANT, quant, quantized)
    kept = {}  # grids kept beside dense weights
    for name, info in quantized.items():
        try:
            kept[name] = read_grid(info, getter(path / QUANT, name, quant))[0]
        except PlanError as e:
            raise PlanError(f"quantized {name!r}: {e}; re-save the checkpoint") from None
    files = _model_files(path)
    file = files[0] if len(files) == 1 else path / INDEX  # for messages
    saved = None  # the model's weights as read here (with model=), for the modules restore_rewrites rebuilds
    rebuilt = [r["module"] for r in meta.get("rows", []) if is_rewrite_row(r)]  # their shapes may differ (shrunk)
    if model is None:
        model = _from_pretrained(path, compressed=set(compressed), rebuilt=rebuilt)
        own = model.state_dict()
    else:  # nothing changes in `model` until every check below has passed
        own, saved = model.state_dict(), _load_model_tensors(files)
        missing = {k for k in set(own) - set(saved) - set(compressed) if not _under(k, rebuilt)}
        if missing:
            raise PlanError(f"{str(file)!r} lacks {sorted(missing)[:3]}: not a checkpoint of this model")
        for k in own:
            if k in saved and k not in compressed and saved[k].shape != own[k].shape and not _under(k, rebuilt):
                raise PlanError(f"{str(file)!r}: {k} is {list(saved[k].shape)}; the model has {list(own[k].shape)}: "
                                "not a checkpoint of this model")
        state = {k: v for k, v in saved.items() if k in own and k not in compressed} | state
    for name in compressed:
        if name not in own or state[name].shape != own[name].shape:
            raise PlanError(f"compressed {name!r} is {list(state[name].shape)}, the model has "
                            f"{list(own[name].shape) if name in own else 'no such parameter'}")
    for name, mask in masks.items():
        p = state.get(name, own.get(name))
        if p is None or p.shape != mask.shape:
            raise PlanError(f"mask {name!r} {list(mask.shape)} does not fit the model "
                            f"({'no such parameter' if p is None else list(p.shape)})")
        if bool((p.detach()[~mask.to(p.device)] != 0).any()):
            raise PlanError(f"{name!r} has nonzero weights where its mask prunes: the checkpoint was "
                            "modified after saving")
    for name, grid in kept.items():  # a grid kept beside a dense weight must give exactly that weight
        p, info = state.get(name, own.get(name)), quantized[name]
        w = grid.dequantize().to(float_dtype(info["dtype"]))
        w = w.t() if info["transposed"] else w
        if p is None or p.shape != w.shape or not torch.equal(p.detach().cpu(), w):
            raise PlanError(f"{name!r} does not equal the values of its quantization grid in {QUANT}: the checkpoint "
                            "was modified after saving")
        grids[name] = grid
    # Module rewrites first: each technique checks its rows before swapping any module, so a bad
    # row fails before any weight is loaded; the weights then go into the rebuilt modules too.
    restored = restore_rewrites(model, meta.get("rows", []))
    if restored:  # modules rebuilt from their rows (MoE experts) get their saved weights
        own = model.state_dict()
        saved = saved if saved is not None else _load_model_tensors(files)
        state |= {k: v for k, v in saved.items() if k in own and k not in compressed
                  and any(k.startswith(name + ".") for name in restored)}
    holders = {name: model.get_submodule(name.rpartition(".")[0]) for name in grids}  # before any weight changes
    model.load_state_dict(state, strict=False)
    for name, module in model.named_modules():  # a grid of weights just replaced would describe the old ones
        if QUANTIZED in module.__dict__ and (f"{name}.weight" if name else "weight") in state:
            del module.__dict__[QUANTIZED]
    for name, grid in grids.items():
        holders[name].__dict__[QUANTIZED] = grid.to(model.get_parameter(name).device)
    return model.eval(), meta


def checkpoint_size(path) -> dict:
    """Weight bytes of a checkpoint against its dense equivalent:
    {"bytes", "dense_bytes", "ratio", "linear_bytes", "linear_dense_bytes", "linear_ratio"}.
    "bytes" counts the tensors of every safetensors file of the folder (masks, grids and compressed
    forms included; plan/ not); "dense_bytes" is the model's state at its dtypes, as a plain
    model.safetensors holds it; the linear_ figures are the same for the parameters the report
    pruned or quantized alone."""
    path = Path(path)
    meta = read_meta(path)
    try:
        return _size(path, meta)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PlanError(f"cannot read the tensor sizes of {str(path)!r}: {e}") from None


def _size(path: Path, meta: dict) -> dict:
    headers = {f.name: _header(f) for f in sorted(path.glob("*.safetensors"))}
    sizes = {f: {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in h.items() if k != "__metadata__"}
             for f, h in headers.items()}
    compressed = meta.get("compressed", {})
    model_sizes = {k: n for f in _model_files(path) for k, n in sizes.get(f.name, {}).items()}

    def dense(name: str) -> int:
        info = compressed.get(name)
        if info is None:
            return model_sizes.get(name, 0)
        if "shape" in info:
            return math.prod(info["shape"]) * float_dtype(info["dtype"]).itemsize
        return sizes[NM][f"{name}.values"] * info["m"] // info["n"]  # format 1: the kept values are N/M of it

    linears = {r["param"] for r in meta.get("rows", []) if r.get("param")}
    stored = sum(n for table in sizes.values() for n in table.values())
    linear = sum(n for table in sizes.values() for k, n in table.items()
                 if k in linears or k.rpartition(".")[0] in linears)
    total = sum(dense(k) for k in set(model_sizes) | set(compressed))
    linear_dense = sum(dense(k) for k in linears)
    return {"bytes": stored, "dense_bytes": total, "ratio": round(stored / total, 4) if total else None,
            "linear_bytes": linear, "linear_dense_bytes": linear_dense,
            "linear_ratio": round(linear / linear_dense, 4) if linear_dense else None}


def _read_masks(path: Path, meta: dict) -> dict[str, torch.Tensor]:
    """{param: bool keep-mask in the parameter's layout}: bit-packed (format 2) or bool (format 1)."""
    if meta["format"] == 1:
        masks = _load_tensors(path / MASKS)
        for name, mask in masks.items():
            if mask.dtype != torch.bool:
                raise PlanError(f"mask {name!r} is {mask.dtype}; expected torch.bool (keep-masks are bool); "
                                "re-save the checkpoint with save_pruned")
        return masks
    shapes = meta.get("masks", {})
    packed = _load_kind(path, meta, MASKS) if shapes else {}
    _no_strays(path / MASKS, packed, shapes)
    masks = {}
    for name, (rows, cols) in shapes.items():
        bits = packed.get(name)
        if bits is None:
            raise PlanError(f"{str(path / MASKS)!r} lacks the mask of {name!r}; re-save the checkpoint")
        if bits.dtype != torch.uint8 or bits.dim() != 2 or list(bits.shape) != [rows, packed_cols(cols)]:
            raise PlanError(f"mask {name!r} is {bits.dtype} {list(bits.shape)}; expected torch.uint8 "
                            f"{[rows, packed_cols(cols)]} (the bits of a [{rows}, {cols}] mask); re-save the checkpoint")
        masks[name] = unpack_bits(bits, cols)
    return masks


def _no_strays(file: Path, tensors: dict, entries: dict) -> None:
    """Every tensor of a sparsecc file belongs to a parameter sparsecc.json lists (unhashed folders)."""
    for key in tensors:
        if key not in entries and key.rpartition(".")[0] not in entries:
            raise PlanError(f"{str(file)!r} holds {key!r}, which sparsecc.json does not list; re-save the checkpoint")


def _model_files(path: Path) -> list[Path]:
    """The files save_pretrained wrote the weights to: model.safetensors, or the shards its index names."""
    single, index = path / "model.safetensors", path / INDEX
    if single.is_file() or not index.is_file():
        if not single.is_file():
            raise PlanError(f"checkpoint file {str(single)!r} is missing (and no {INDEX} names shards)")
        return [single]
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise PlanError(f"{str(index)!r} is corrupt ({type(e).__name__}: {e}); re-save the checkpoint") from None
    if not names or not all(isinstance(n, str) and n.endswith(".safetensors") and Path(n).name == n for n in names):
        raise PlanError(f"{str(index)!r} names no safetensors shards of this folder; re-save the checkpoint")
    return [path / n for n in names]


def kind_files(meta: dict, kind: str) -> list[str]:
    """The files holding one kind of sparsecc tensors (MASKS, QUANT, PACKED): that one file, or, in a
    folder written block by block (format 3), the parts sparsecc.json "files" lists."""
    return list(meta.get("files", {}).get(kind, [kind]))


def _load_kind(path: Path, meta: dict, kind: str) -> dict[str, torch.Tensor]:
    return _load_model_tensors([path / name for name in kind_files(meta, kind)])


def _load_model_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out |= _load_tensors(f)
    return out


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise PlanError(f"checkpoint file {str(file)!r} is missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise PlanError(f"{str(file)!r} is corrupt or truncated: {e}") from None


@contextmanager
def quiet_loading(quiet: bool = True):
    """Silence transformers' loading bar and load report (warnings) inside the block, when `quiet`."""
    from transformers.utils import logging as hf_logging

    if not quiet:
        yield
        return
    bar, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def _under(key: str, modules) -> bool:
    return any(key.startswith(m + ".") for m in modules)


def model_class(path: Path):
    """(transformers class, its config) of a model folder, from config.json; no remote code."""
    import transformers
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise PlanError(f"{str(path)!r} has no config.json, so it is no transformers model folder (one written by "
                        "save_pretrained); from Python, load_pruned(..., model=) loads into your own module") from None
    except json.JSONDecodeError as e:
        raise PlanError(f"{str(path / 'config.json')!r} is corrupt: {e}") from None
    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if cls is None:
        raise PlanError(f"config.json names architecture {arch!r}, which transformers does not provide "
                        "(remote code is never run): pass model= to load into your own module")
    return cls, transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)


def _from_pretrained(path: Path, compressed: set[str] = frozenset(), rebuilt=()):
    """The transformers model of a folder; `compressed` names weights stored elsewhere (N:M), whose
    placeholders (or absence, in older folders) load_pruned fills in afterwards; the weights of the
    `rebuilt` modules (module rewrites, shrunk ones included) are loaded after their rebuild."""
    cls, _ = model_class(path)
    arch = cls.__name__
    _model_files(path)  # present (one file, or the shards its index names)
    try:
        with quiet_loading(bool(compressed) or bool(rebuilt)):  # the placeholders' expected "MISMATCH" report would alarm
            model, info = cls.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                              trust_remote_code=False, dtype="auto",
                                              ignore_mismatched_sizes=bool(compressed) or bool(rebuilt),
                                              output_loading_info=True)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise PlanError(f"cannot load the model weights in {str(path)!r}: {e}") from None
    wrong = sorted(k[0] for k in info.get("mismatched_keys", ()) if k[0] not in compressed and not _under(k[0], rebuilt))
    if wrong:  # only possible with ignore_mismatched_sizes, which only placeholders should need
        raise PlanError(f"cannot load the model weights in {str(path)!r}: {wrong[:3]} do not fit {arch}")
    return model
