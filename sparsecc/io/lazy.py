"""A transformers model folder opened without reading its weights (sequential onloading).

    lazy = LazyModel(folder)            # the model built on the meta device: no weight is read
    block = lazy.materialise("model.layers.3")   # that block's tensors, memory-mapped from the shards
    ...
    lazy.release("model.layers.3")      # back on meta: its memory is free again

The weights are read with safetensors' `safe_open` from the file the folder's index names for
each tensor (`model.safetensors`, or the shards of `model.safetensors.index.json`), and assigned
to the module as they are (memory-mapped, copy-on-write: pruning writes only the pages it
changes), or, for a GPU `device`, copied to it as read. Buffers the files do not hold (rotary `inv_freq`) are made by the model's own
`_init_weights`, as `from_pretrained` makes them. Sizes come from the files' headers, so the
memory a run needs is known before any weight is read. A folder whose files name the weights
otherwise than the model does (transformers converts some checkpoints as it loads them: Mixtral's
per-expert linears into 3-D tensors) is refused by name (WholeModelError): load it whole.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..errors import PlanError, WholeModelError
from .checkpoint import _header, _model_files, model_class

#: what a WholeModelError of onloading tells the user to do instead (the command line, falling back, drops it)
WHOLE_MODEL = "load the model, call sparsify_ and save_pruned (sparsecc prune --no-onload)"


class LazyModel:
    """The model of a transformers folder on the meta device, materialised one part at a time on
    `device` (the CPU: memory-mapped; a GPU: read from the files straight to it)."""

    def __init__(self, path, device="cpu"):
        self.path = Path(path)
        self.device = torch.device(device)
        cls, config = model_class(self.path)
        self.files = _model_files(self.path)
        self.where: dict[str, Path] = {}      # tensor name -> its file
        self.nbytes_of: dict[str, int] = {}   # tensor name -> bytes in the file
        for f in self.files:
            try:
                header = _header(f)
            except (OSError, ValueError) as e:
                raise PlanError(f"{str(f)!r} is not a readable safetensors file: {e}") from None
            for name, info in header.items():
                if name != "__metadata__":
                    self.where[name] = f
                    self.nbytes_of[name] = info["data_offsets"][1] - info["data_offsets"][0]
        with torch.device("meta"):
            self.model = cls._from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)
        self.model.eval()
        own = self.model.state_dict()
        foreign = [k for k in self.where if k not in own]
        if foreign and any(k not in self.where for k in own):
            raise WholeModelError(f"{self.path}: its files store weights under names {cls.__name__} does not have "
                                  f"(e.g. {foreign[0]}; transformers converts such checkpoints as it loads them, as "
                                  f"Mixtral's experts), which sparsecc cannot read one block at a time: {WHOLE_MODEL}")

    def nbytes(self, prefix: str | None = None, outside: tuple[str, ...] = ()) -> int:
        """Bytes in the files of the tensors under module `prefix` (all: None), except those under `outside`."""
        return sum(n for k, n in self.nbytes_of.items()
                   if (prefix is None or k.startswith(prefix + ".")) and not any(k.startswith(o + ".") for o in outside))

    def materialise(self, prefix: str = "", outside: tuple[str, ...] = ()) -> nn.Module:
        """Read the tensors of module `prefix` ("": the whole model) from the folder, except those under
        the modules `outside` (decoder blocks, onloaded one at a time), into the model; returns the module."""
        module = self.model.get_submodule(prefix)
        lead = prefix + "." if prefix else ""
        skip = tuple(o[len(lead):] + "." for o in outside if o.startswith(lead))
        own = {k: t for k, t in module.state_dict(keep_vars=True).items() if not k.startswith(skip)}
        state, opened = {}, {}
        try:
            for key, meta in own.items():
                file = self.where.get(lead + key)
                if file is None:
                    continue  # tied to another tensor, or a buffer made below
                if file not in opened:
                    opened[file] = safe_open(str(file), framework="pt", device=str(self.device))
                t = opened[file].get_tensor(lead + key)
                if tuple(t.shape) != tuple(meta.shape):
                    raise PlanError(f"{str(file)!r}: {lead + key} is {list(t.shape)}, but the model of config.json "
                                    f"has {list(meta.shape)}; the folder's config does not describe its weights")
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise PlanError(f"{str(file)!r}: {lead + key} holds NaN or Inf; sparsecc cannot prune such weights")
                state[key] = t if t.dtype == meta.dtype else t.to(meta.dtype)
        finally:
            opened.clear()
        module.load_state_dict(state, strict=False, assign=True)
        if any(p.is_meta for p in module.parameters()):
            self.model.tie_weights()  # an lm_head tied to the embeddings is not in the files
        self._init_buffers(module)
        left = [n for n, t in (*module.named_parameters(), *module.named_buffers())
                if t.is_meta and not n.startswith(skip)]
        if left:
            raise PlanError(f"{self.path}: {lead + left[0]} is in neither the weight files nor the model's own "
                            "initialisation; the folder is incomplete")
        return module

    def _init_buffers(self, module: nn.Module) -> None:
        """Buffers that no file holds (non-persistent: rotary inv_freq), made as from_pretrained makes them."""
        for sub in module.modules():
            if any(b.is_meta for b in sub.buffers(recurse=False)) and not any(True for _ in sub.parameters(recurse=False)):
                sub.to_empty(device=self.device, recurse=False)
                self.model._init_weights(sub)

    def release(self, prefix: str = "", outside: tuple[str, ...] = ()) -> None:
        """Put module `prefix` ("": the whole model) back on the meta device, but the modules `outside`
        (its tensors are freed; tied parameters stay tied), and the modules made from the config alone
        (no parameter, no persistent buffer: rotary embeddings' inv_freq, a few numbers): an attention
        form with positions within the cache reads them while the blocks run."""
        lead = prefix + "." if prefix else ""
        skip = tuple(o[len(lead):] for o in outside if o.startswith(lead))
        for name, sub in self.model.get_submodule(prefix).named_modules():
            if not any(name == o or name.startswith(o + ".") for o in skip) and not _made_from_config(sub):
                sub.to_empty(device="meta", recurse=False)


def _made_from_config(module: nn.Module) -> bool:
    """Whether `module`'s own tensors are only non-persistent buffers (made by `_init_weights`, in no file)."""
    own = [n for n, b in module._buffers.items() if b is not None]
    return bool(own) and not any(p is not None for p in module._parameters.values()) \
        and all(n in module._non_persistent_buffers_set for n in own)

