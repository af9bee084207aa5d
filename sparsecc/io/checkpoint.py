"""Pruned checkpoints: a model folder plus what sparsecc knows about it. Never pickle.

    out/
      config.json, model.safetensors, tokenizer files   `save_pretrained`
      sparsecc.json                 format, versions, recipe, per-layer report, calibration setup,
                                    sha256 of every tensor in the folder's safetensors files
      sparsecc_masks.safetensors    bool keep-mask of every pruned parameter (its own layout)
      sparsecc_nm.safetensors       with compress=True: N:M weights as kept values + packed positions
                                    (model.safetensors then holds an empty placeholder for each)
      plan/                         with plan=...: the Plan (decisions + statistics) to reproduce it

`load_pruned` is the way to load a folder. Plain transformers `from_pretrained` also loads one
saved without compress=True, if its config describes the model (a structurally pruned model whose
MLPs, or heads, all keep one width: `structured.shrunk_config`); a compressed one it refuses (the
placeholders do not fit the model) rather than initialising those weights randomly. Folders saved before tensors were hashed (no
"sha256" in sparsecc.json) still load, unchecked by hash.

The folder is written to a temporary sibling and renamed into place, so an interrupted save
(Ctrl-C included) leaves no half-written output; `save_pruned` first checks the report against
the model. `load_pruned` checks the format, the metadata, every tensor's hash, dtypes, shapes and
that every weight respects its mask before changing or returning the model.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .. import techniques as _techniques  # noqa: F401  (registers the built-in techniques by name)
from .. import __version__
from ..techniques.configs import config_from_dict
from ..errors import PlanError, SparseccError
from ..codegen.nm_format import compress as nm_compress
from ..codegen.nm_format import decompress as nm_decompress
from ..techniques.rewrites import REWRITTEN, is_rewrite_row, restore_rewrites
from ..techniques.structured import shrunk_config
from ..prune.masks import parse_pattern
from .folders import check_output_dir, writing_folder
from .recipes import dump_recipe

FORMAT = 1
META, MASKS, NM, PLAN = "sparsecc.json", "sparsecc_masks.safetensors", "sparsecc_nm.safetensors", "plan"


def save_pruned(model: nn.Module, path, report, *, recipe=None, tokenizer=None, plan=None,
                compress: bool = False, overwrite: bool = False) -> Path:
    """Save `model` (pruned by `sparsify_`, whose `report` says what was pruned) to folder `path`.

    `compress=True` stores N:M-pruned weights compressed (such a folder loads with `load_pruned`
    only). The report must be this model's: each row's parameter, shape, sparsity and N:M pattern
    are checked before anything is written. An existing `path` is refused unless `overwrite=True`,
    and is only replaced once the new folder is complete."""
    path = Path(path)
    check_output_dir(path, overwrite)
    params = dict(model.named_parameters(remove_duplicate=False))
    pruned = {}
    for row in report.rows:
        if is_rewrite_row(row):  # a module rewrite (CATS threshold, attention form): its row is the state
            _check_rewrite_row(row, model)
            continue
        _check_row(row, params)
        pruned[row["param"]] = row
    masks = {name: (params[name].detach() != 0).cpu().contiguous() for name in pruned}
    nm_tensors, nm_meta = {}, {}
    if compress:
        for name, row in pruned.items():
            nm = parse_pattern(row["config"].get("pattern"))
            if nm is None:
                continue
            w = params[name].detach().cpu()
            w = w.t() if row.get("transposed") else w
            values, index = nm_compress(w, *nm)
            nm_tensors[f"{name}.values"], nm_tensors[f"{name}.index"] = values.contiguous(), index
            nm_meta[name] = {"n": nm[0], "m": nm[1], "in_features": w.shape[1], "transposed": bool(row.get("transposed"))}
    meta = {"format": FORMAT, "sparsecc": __version__, "torch": torch.__version__,
            "model_class": type(model).__name__, "recipe": dump_recipe(recipe) if recipe is not None else None,
            "rows": report.rows, "setup": report.setup, "compressed": nm_meta}

    # A compressed weight is an empty placeholder in model.safetensors: plain from_pretrained then
    # refuses the folder (size mismatch) instead of initialising the weight randomly.
    state = {k: torch.empty(0, dtype=v.dtype) if k in nm_meta else v for k, v in model.state_dict().items()}
    with writing_folder(path) as tmp:
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(tmp, state_dict=state)
            config = shrunk_config(model, report.rows)
            if config is not None:  # uniformly shrunk: plain from_pretrained builds the right shapes
                config.save_pretrained(tmp)
        else:
            save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(masks, str(tmp / MASKS))
        if nm_tensors:
            save_file(nm_tensors, str(tmp / NM))
        if plan is not None:
            plan.save(tmp / PLAN)
        meta["sha256"] = {f.name: _tensor_hashes(f) for f in sorted(tmp.glob("*.safetensors"))}
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return path


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
    zeros = int((w == 0).sum()) / max(w.numel(), 1)
    recorded = row.get("sparsity")
    if not isinstance(recorded, (int, float)) or abs(zeros - recorded) > 1e-3 + 1 / max(w.numel(), 1):
        raise PlanError(f"report row {module!r} records sparsity {recorded}, but {name} has {zeros:.4f}; {fix}")
    nm = parse_pattern((row.get("config") or {}).get("pattern"))
    if nm is not None:
        n, m = nm
        if w.shape[1] % m or (w.numel() and int((w.reshape(w.shape[0], -1, m) != 0).sum(-1).max()) > n):
            raise PlanError(f"report row {module!r} records {n}:{m} sparsity, but {name} is not {n}:{m}; {fix}")


def _tensor_hashes(file: Path) -> dict[str, str]:
    """sha256 of each tensor's bytes in a safetensors file, read from the file itself (its header
    gives every tensor's byte range), so the record holds exactly what was written."""
    hashes = {}
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if size > os.fstat(f.fileno()).st_size:
            raise ValueError("the header ends past the end of the file")
        header = json.loads(f.read(size))
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
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PlanError(f"{str(path / META)!r} has format {meta.get('format') if isinstance(meta, dict) else '?'}; "
                        f"this sparsecc ({__version__}) reads format {FORMAT}")
    _check_meta(meta, path / META)
    return meta


def _check_meta(meta: dict, file: Path) -> None:
    """The fields of sparsecc.json that loading reads have the types save_pruned writes."""
    def bad(what: str) -> PlanError:
        return PlanError(f"{str(file)!r}: {what}; re-save the checkpoint with save_pruned")

    for key, kind, word in (("rows", list, "a list"), ("setup", dict, "a dict"), ("compressed", dict, "a dict"),
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
                        ("shape", row.get("shape") is None or _is_shape(row["shape"])),
                        ("transposed", isinstance(row.get("transposed", False), bool)),
                        ("sparsity", type(row.get("sparsity", 0.0)) in (int, float))):
            if not ok:
                raise bad(f"rows[{i}] has a bad or missing {key!r} ({row.get(key)!r})")
        try:
            config_from_dict(row["config"])
        except (SparseccError, TypeError, ValueError, AttributeError) as e:
            raise bad(f"rows[{i}] has a bad 'config' ({e})") from None
    for name, info in meta.get("compressed", {}).items():
        ints = [info.get(k) for k in ("n", "m", "in_features")] if isinstance(info, dict) else []
        if not (len(ints) == 3 and all(type(v) is int and v > 0 for v in ints) and ints[0] <= ints[1]
                and ints[2] % ints[1] == 0 and isinstance(info.get("transposed"), bool)):
            raise bad(f"compressed[{name!r}] must be {{n, m, in_features, transposed}} of an N:M weight, not {info!r}")
    for fname, table in meta.get("sha256", {}).items():
        if not (isinstance(fname, str) and fname.endswith(".safetensors") and Path(fname).name == fname
                and fname not in (".", "..") and isinstance(table, dict)
                and all(isinstance(v, str) and len(v) == 64 for v in table.values())):
            raise bad("'sha256' must map safetensors files of the folder to {tensor: sha256 hex digest}")


def _is_shape(shape) -> bool:
    return isinstance(shape, list) and len(shape) == 2 and all(type(v) is int and v >= 0 for v in shape)


def load_pruned(path, model: nn.Module | None = None):
    """Load a checkpoint written by `save_pruned` -> (model, meta).

    Without `model`, the transformers class named in config.json is built from the folder
    (`from_pretrained`, safetensors only, no remote code); with `model`, its parameters are
    loaded into it, only once everything has been checked (a failure leaves it as it was).
    Compressed N:M weights are expanded; every mask is checked."""
    path = Path(path)
    meta = read_meta(path)
    _verify_hashes(path, meta)  # a changed bit in any recorded tensor is reported before anything is loaded
    masks = _load_tensors(path / MASKS)
    for name, mask in masks.items():
        if mask.dtype != torch.bool:
            raise PlanError(f"mask {name!r} is {mask.dtype}; expected torch.bool (keep-masks are bool); "
                            "re-save the checkpoint with save_pruned")
    compressed = meta.get("compressed", {})
    nm = _load_tensors(path / NM) if compressed else {}
    state = {name: _expand(path, name, info, nm) for name, info in compressed.items()}
    file = path / "model.safetensors"
    saved = None  # model.safetensors as read here (with model=), for the modules restore_rewrites rebuilds
    rebuilt = [r["module"] for r in meta.get("rows", []) if is_rewrite_row(r)]  # their shapes may differ (shrunk)
    if model is None:
        model = _from_pretrained(path, compressed=set(compressed), rebuilt=rebuilt)
        own = model.state_dict()
    else:  # nothing changes in `model` until every check below has passed
        own, saved = model.state_dict(), _load_tensors(file)
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
    # Module rewrites first: each technique checks its rows before swapping any module, so a bad
    # row fails before any weight is loaded; the weights then go into the rebuilt modules too.
    restored = restore_rewrites(model, meta.get("rows", []))
    if restored:  # modules rebuilt from their rows (MoE experts) get their saved weights
        own = model.state_dict()
        saved = saved if saved is not None else _load_tensors(file)
        state |= {k: v for k, v in saved.items() if k in own and k not in compressed
                  and any(k.startswith(name + ".") for name in restored)}
    model.load_state_dict(state, strict=False)
    return model.eval(), meta


def _expand(path: Path, name: str, info: dict, nm: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense weight of a compressed N:M parameter, as the model stores it."""
    try:
        values, index = nm[f"{name}.values"], nm[f"{name}.index"]
    except KeyError as e:
        raise PlanError(f"{str(path / NM)!r} lacks {e}") from None
    if values.dim() != 2 or not values.is_floating_point():
        raise PlanError(f"compressed {name!r}: values are {values.dtype} {list(values.shape)}; expected a 2-D "
                        "floating-point tensor; re-save the checkpoint")
    try:
        w = nm_decompress(values, index, info["n"], info["m"], info["in_features"])
    except PlanError as e:
        raise PlanError(f"compressed {name!r}: {e}; re-save the checkpoint") from None
    return w.t() if info["transposed"] else w


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


def _from_pretrained(path: Path, compressed: set[str] = frozenset(), rebuilt=()):
    """The transformers model of a folder; `compressed` names weights stored elsewhere (N:M), whose
    placeholders (or absence, in older folders) load_pruned fills in afterwards; the weights of the
    `rebuilt` modules (module rewrites, shrunk ones included) are loaded after their rebuild."""
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
    if not (path / "model.safetensors").is_file():
        raise PlanError(f"checkpoint file {str(path / 'model.safetensors')!r} is missing")
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
