"""A fine-tuning run's checkpoint folder, to resume it: never pickle, written all or nothing.

    <folder>/state.json           format, the run's settings and the model's fingerprint, the step
                                  reached, the losses so far, float16's loss scale
    <folder>/trained.safetensors  the trained tensors (weights, or LoRA factors; fp32 masters of a
                                  half-precision model's), "p<i>" in order
    <folder>/optimizer.safetensors  AdamW's state of each: "p<i>.exp_avg", "p<i>.exp_avg_sq", "p<i>.step"

A run resumes only from a folder made by the same run (settings, `steps` included since the
schedule depends on it, and the model's fingerprint equal); anything else is refused, naming the
difference. Batches are drawn from
the step number alone, so a resumed run gives the weights an uninterrupted one gives.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import FinetuneError
from ..io.folders import writing_folder

FORMAT = 1
STATE, TRAINED, OPTIM = "state.json", "trained.safetensors", "optimizer.safetensors"


def fingerprint(params: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes, dtypes and bytes of the model's tensors when the run starts."""
    h = hashlib.sha256()
    for name, t in sorted(params.items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save(folder: Path, run: dict, step: int, losses: list[float], params: list[torch.Tensor], opt,
         scaler: dict | None = None) -> None:
    """Write the run's state after `step` steps (replacing the folder's previous state): `params`
    the tensors AdamW updates (fp32 masters of a half-precision model), `scaler` float16's loss
    scale (precision.py)."""
    trained = {f"p{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}
    moments = {}
    for i, p in enumerate(params):
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):  # a tensor without a gradient yet has no state
            if key in st:
                moments[f"p{i}.{key}"] = torch.as_tensor(st[key]).detach().cpu().reshape(-1).contiguous() \
                    if key == "step" else st[key].detach().cpu().contiguous()
    state = {"format": FORMAT, "run": run, "step": step, "losses": losses, "scaler": scaler or {}}
    with writing_folder(folder) as tmp:
        save_file(trained, str(tmp / TRAINED))
        save_file(moments, str(tmp / OPTIM))
        (tmp / STATE).write_text(json.dumps(state, indent=1) + "\n")


def load(folder: Path, run: dict) -> dict | None:
    """The saved state of this run in `folder` ({"step", "losses", "trained", "moments"}), None
    when the folder holds no state yet; a state of another run is refused."""
    file = folder / STATE
    if not file.is_file():
        if folder.exists() and any(folder.iterdir()):
            raise FinetuneError(f"{str(folder)!r} is not empty and holds no fine-tuning state ({STATE}); give an "
                                "empty or new folder as checkpoint_dir")
        return None
    try:
        state = json.loads(file.read_text())
        trained, moments = load_file(str(folder / TRAINED)), load_file(str(folder / OPTIM))
    except (OSError, ValueError) as e:
        raise FinetuneError(f"{str(folder)!r}: unreadable fine-tuning state ({e}); delete the folder to start over") from None
    if state.get("format") != FORMAT:
        raise FinetuneError(f"{str(folder)!r} holds state format {state.get('format')}, this sparsecc reads {FORMAT}")
    saved = state.get("run", {})
    diff = sorted(k for k in set(saved) | set(run) if saved.get(k) != run.get(k))
    if diff:
        what = ", ".join(f"{k}: saved {saved.get(k)!r}, now {run.get(k)!r}" for k in diff[:3])
        raise FinetuneError(f"{str(folder)!r} holds another run's state ({what}); use a new checkpoint_dir, or the "
                            "same model and settings to resume")
    return {"step": state["step"], "losses": state["losses"], "trained": trained, "moments": moments,
            "scaler": state.get("scaler", {})}


def restore_optimizer(opt, params: list[torch.Tensor], moments: dict[str, torch.Tensor]) -> None:
    """Put AdamW's saved moments and step back for `params` (in the order they were saved)."""
    for i, p in enumerate(params):
        if f"p{i}.exp_avg" in moments:
            opt.state[p] = {"step": moments[f"p{i}.step"].reshape(()).clone().float(),
                            "exp_avg": moments[f"p{i}.exp_avg"].to(p.device, p.dtype),
                            "exp_avg_sq": moments[f"p{i}.exp_avg_sq"].to(p.device, p.dtype)}
