"""Pruned checkpoints: a model folder plus what sparsecc knows about it. Never pickle.

    out/
      config.json, model.safetensors, tokenizer files   `save_pretrained` (plain transformers loads it)
      sparsecc.json                 format, versions, recipe, per-layer report, calibration setup
      sparsecc_masks.safetensors    bool keep-mask of every pruned parameter (its own layout)
      sparsecc_nm.safetensors       with compress=True: N:M weights as kept values + packed positions
                                    (those weights are then left out of model.safetensors)
      plan/                         with plan=...: the Plan (decisions + statistics) to reproduce it

The folder is written to a temporary sibling and renamed into place, so an interrupted save
(Ctrl-C included) leaves no half-written output. `load_pruned` checks the format, versions,
shapes and that every weight respects its mask before returning the model.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .errors import PlanError
from .nm_format import compress as nm_compress
from .rewrites import is_rewrite_row, restore_rewrites
from .nm_format import decompress as nm_decompress
from .prune.masks import parse_pattern
from .recipes import dump_recipe

FORMAT = 1
META, MASKS, NM, PLAN = "sparsecc.json", "sparsecc_masks.safetensors", "sparsecc_nm.safetensors", "plan"


def save_pruned(model: nn.Module, path, report, *, recipe=None, tokenizer=None, plan=None,
                compress: bool = False, overwrite: bool = False) -> Path:
    """Save `model` (pruned by `sparsify_`, whose `report` says what was pruned) to folder `path`.

    `compress=True` stores N:M-pruned weights compressed. An existing `path` is refused unless
    `overwrite=True`, and is only replaced once the new folder is complete."""
    path = Path(path)
    check_output_dir(path, overwrite)
    params = dict(model.named_parameters(remove_duplicate=False))
    pruned = {}
    for row in report.rows:
        if is_rewrite_row(row):  # a module rewrite (CATS threshold, attention form): its row is the state
            continue
        if row.get("param") not in params:
            raise PlanError(f"report row {row.get('module')!r} names no parameter of this model; "
                            "pass the report sparsify_ returned for this model")
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

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        state = {k: v for k, v in model.state_dict().items() if k not in nm_meta}
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(tmp, state_dict=state)
        else:
            save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(masks, str(tmp / MASKS))
        if nm_tensors:
            save_file(nm_tensors, str(tmp / NM))
        if plan is not None:
            plan.save(tmp / PLAN)
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if path.exists():  # overwrite (checked above): swap only now that the new folder is complete
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone on success (renamed); removed on any failure
    return path


def check_output_dir(path, overwrite: bool) -> None:
    """Refuse an existing output (unless overwrite) before any work is done."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} already exists; choose another output folder or pass overwrite=True "
                              "(--overwrite on the command line)")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{str(path)!r} exists and is not a folder")


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
    return meta


def load_pruned(path, model: nn.Module | None = None):
    """Load a checkpoint written by `save_pruned` -> (model, meta).

    Without `model`, the transformers class named in config.json is built from the folder
    (`from_pretrained`, safetensors only, no remote code); with `model`, its parameters are
    loaded into it. Compressed N:M weights are expanded; every mask is checked."""
    path = Path(path)
    meta = read_meta(path)
    masks = _load_tensors(path / MASKS)
    nm = _load_tensors(path / NM) if meta.get("compressed") else {}
    if model is None:
        model = _from_pretrained(path)
    else:
        file = path / "model.safetensors"
        state = _load_tensors(file)
        missing = set(model.state_dict()) - set(state) - set(meta.get("compressed", {}))
        if missing:
            raise PlanError(f"{str(file)!r} lacks {sorted(missing)[:3]}: not a checkpoint of this model")
        model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, info in meta.get("compressed", {}).items():
            if name not in params:
                raise PlanError(f"compressed weight {name!r} is not a parameter of {type(model).__name__}")
            try:
                w = nm_decompress(nm[f"{name}.values"], nm[f"{name}.index"], info["n"], info["m"], info["in_features"])
            except KeyError as e:
                raise PlanError(f"{str(path / NM)!r} lacks {e}") from None
            w = w.t() if info["transposed"] else w
            if w.shape != params[name].shape:
                raise PlanError(f"compressed {name!r} is {list(w.shape)}, the model has {list(params[name].shape)}")
            params[name].copy_(w)
        for name, mask in masks.items():
            p = params.get(name)
            if p is None or p.shape != mask.shape:
                raise PlanError(f"mask {name!r} {list(mask.shape)} does not fit the model "
                                f"({'no such parameter' if p is None else list(p.shape)})")
            if bool((p.detach()[~mask.to(p.device)] != 0).any()):
                raise PlanError(f"{name!r} has nonzero weights where its mask prunes: the checkpoint was "
                                "modified after saving")
    restored = restore_rewrites(model, meta.get("rows", []))
    if restored:  # modules rebuilt from their rows (MoE experts) get their saved weights
        own = model.state_dict()
        model.load_state_dict({k: v for k, v in _load_tensors(path / "model.safetensors").items()
                               if k in own and any(k.startswith(name + ".") for name in restored)}, strict=False)
    return model.eval(), meta


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise PlanError(f"checkpoint file {str(file)!r} is missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise PlanError(f"{str(file)!r} is corrupt or truncated: {e}") from None


def _from_pretrained(path: Path):
    import transformers
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise PlanError(f"{str(path)!r} has no config.json: pass model= to load into your own module") from None
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
        return cls.from_pretrained(path, local_files_only=True, use_safetensors=True, trust_remote_code=False,
                                   dtype="auto")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise PlanError(f"cannot load the model weights in {str(path)!r}: {e}") from None
