"""Where block-sequential calibration keeps the hidden states between two decoder blocks.

BlockRunner holds, per calibration batch, the input of the block being calibrated and then its
output (the next block's input). At scale these dominate: Llama-7B with 128 windows of 2048
tokens holds 128 x 2048 x 4096 x 4 bytes = 4 GiB per copy. `Activations(mode)` keeps them

- "memory": as computed (the default: fastest, and what `sparsify_` does);
- "bf16" / "fp16": cast to that dtype, and back to the model's dtype when used (half the bytes of
  fp32; the statistics are then those of the rounded inputs, so masks may differ slightly);
- "disk": one safetensors file per batch in a temporary folder (`folder`, else the system's),
  read back when used: one batch in memory at a time, results identical to "memory".
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MODES = ("memory", "bf16", "fp16", "disk")
_CAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_activations(mode: str, folder=None) -> str:
    """`mode` if it is one of MODES (else ValueError naming them); `folder` only goes with "disk"."""
    if mode not in MODES:
        raise ValueError(f"activations={mode!r} is not one of {', '.join(MODES)}")
    if folder is not None and mode != "disk":
        raise ValueError(f"an offload folder ({folder!r}) is only used with activations='disk'")
    return mode


class Activations:
    """A list of per-batch hidden states (append, [b], len) kept in memory, in a lower precision,
    or on disk. `fresh()` starts the next block's list in the same way; `close()` frees everything
    (the files too)."""

    def __init__(self, mode: str = "memory", folder=None, _root: Path | None = None, _gen: int = 0):
        self.mode = check_activations(mode, folder)
        self.folder = folder
        self._root, self._gen = _root, _gen
        self._items: list = []  # tensors, or (path, dtype) for "disk"

    def fresh(self) -> "Activations":
        """An empty list kept the same way (on disk: in this list's temporary folder, new files; a
        list without one, like a Pipeline's setting, gives the new list a folder of its own)."""
        root = self._root if self._root is not None or self.mode != "disk" else self._make_root()
        return Activations(self.mode, self.folder, root, self._gen + 1)

    def append(self, hidden: torch.Tensor) -> None:
        if self.mode == "memory":
            self._items.append(hidden)
        elif self.mode in _CAST:
            self._items.append((hidden.to(_CAST[self.mode]), hidden.dtype))
        else:
            if self._root is None:
                self._root = self._make_root()
            path = self._root / f"{self._gen}-{len(self._items)}.safetensors"
            save_file({"h": hidden.detach().contiguous()}, str(path))
            self._items.append((path, hidden.device))

    def __getitem__(self, b: int) -> torch.Tensor:
        item = self._items[b]
        if self.mode == "memory":
            return item
        if self.mode in _CAST:
            return item[0].to(item[1])
        path, device = item
        return load_file(str(path), device=str(device))["h"]

    def __len__(self) -> int:
        return len(self._items)

    def drop(self) -> None:
        """Free this list (its files: the others of the folder stay)."""
        if self.mode == "disk":
            for path, _ in self._items:
                path.unlink(missing_ok=True)
        self._items = []

    def close(self) -> None:
        """Free this list and, on disk, the whole temporary folder."""
        self._items = []
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def _make_root(self) -> Path:
        if self.folder is not None:
            Path(self.folder).mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="sparsecc-activations-", dir=self.folder))
