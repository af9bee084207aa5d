"""A pruned checkpoint written block by block while its model is onloaded (`sparsecc.prune_folder`).

`BlockFiles` is the pipeline's block source (passes/blockwise.py): block k is read from the
source folder when its scope starts (`load`), and once pruned and run, written to the output
folder as the k-th of N shards and put back on the meta device (`done`); the parts outside the
blocks are the last shard (`finish`). A sweep that only observes the dense model before the one
that prunes (OWL's outlier ratios) reads each block and puts it back unwritten (`drop`): the
output holds nothing of it. Each part holds its modules' share of what `save_pruned` writes for
the whole model (`checkpoint.saved_state`: the state dict as the block's transforms left it —
rewritten modules' new tensors, shrunk shapes — tied weights under the name the source folder
has), and gets the same checks and the same sparsecc files (masks, quantization grids, compressed
weights), in per-part files that sparsecc.json's "files" lists (checkpoint format 3):

    out/model-00001-of-00005.safetensors ... model.safetensors.index.json
        sparsecc_masks-00001-of-00005.safetensors ...   (only the parts that have such tensors)

The folder loads with `load_pruned`, and (without compress) with plain `from_pretrained`.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from ..passes.memory import return_freed_memory
from .checkpoint import INDEX, MASKS, PACKED, QUANT, checked_part, saved_state
from .lazy import LazyModel

FORMAT_PARTS = 3  # checkpoint format of a folder whose sparsecc files are split by part


class BlockFiles:
    """Loads decoder blocks from `lazy`'s folder and writes them, pruned, into folder `tmp`."""

    def __init__(self, lazy: LazyModel, blocks: list[str], tmp: Path, compress: bool = False):
        self.lazy, self.blocks, self.compress = lazy, list(blocks), compress
        self.tmp = Path(tmp) if tmp is not None else None
        self.parts = len(self.blocks) + 1
        self.weight_map: dict[str, str] = {}
        self.files: dict[str, list[str]] = {MASKS: [], PACKED: [], QUANT: []}
        self.fields: dict[str, dict] = {"compressed": {}, "quantized": {}, "masks": {}}
        self.rows: list[dict] = []
        self.loaded: list[str] = []  # blocks materialised now (at most one: tests check it)
        self.released = False  # whether the parts outside the blocks are on meta (while blocks run)
        self.total = 0  # bytes of the model's tensors written

    def holds(self, param: str) -> bool:
        """Whether parameter `param` is a block's, read from the source folder (and not kept twice)."""
        return param.startswith(tuple(b + "." for b in self.blocks))

    def load(self, k: int, name: str) -> None:
        if k == 0 and not self.released:  # the probe is over: the embeddings and lm_head wait on disk
            self.lazy.release("", outside=tuple(self.blocks))
            self.released = True
        self.lazy.materialise(name)
        self.loaded.append(name)

    def rest(self) -> None:
        """Read the parts outside the blocks again (for a sweep's probe, the rest of the model's scope,
        and writing)."""
        if self.released:
            self.lazy.materialise("", outside=tuple(self.blocks))
            self.released = False

    def done(self, k: int, name: str, rows: list[dict]) -> None:
        """Write block k, pruned, as shard k; then drop it."""
        if self.tmp is not None:  # None: a rank that does not write (torch.distributed: rank 0 writes)
            self._write(k, rows, lambda key: key.startswith(name + "."))
        self.drop(k, name)

    def drop(self, k: int, name: str) -> None:
        """Put block k back on the meta device, unwritten (its memory is free again)."""
        self.lazy.release(name)
        self.loaded.remove(name)
        return_freed_memory()

    def finish(self, rows: list[dict]) -> dict:
        """Write the parts outside the blocks and the index; returns sparsecc.json's fields for the parts."""
        inside = tuple(b + "." for b in self.blocks)
        self.rest()
        self._write(self.parts - 1, rows, lambda key: not key.startswith(inside))
        (self.tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": self.total},
                                                  "weight_map": dict(sorted(self.weight_map.items()))}, indent=2))
        return {"format": FORMAT_PARTS, **self.fields, "files": {k: v for k, v in self.files.items() if v}}

    def _write(self, k: int, rows: list[dict], part) -> None:
        model = self.lazy.model
        params = {n: p for n, p in model.named_parameters(remove_duplicate=False) if part(n)}
        tensors, fields = checked_part(model, rows, params, self.compress)
        for key, table in fields.items():
            self.fields[key] |= table
        self.rows += rows
        state = saved_state(model, fields["compressed"])  # what save_pruned writes, the part's share of it
        aliases = _aliases(model, self.lazy.where)
        keys = [key for key in state if part(key) and key not in aliases]
        shard = _name("model.safetensors", k, self.parts)
        weights = {key: state[key].detach().contiguous().cpu() for key in keys}  # from a GPU: copied back
        save_file(weights, str(self.tmp / shard), {"format": "pt"})
        self.total += sum(t.numel() * t.element_size() for t in weights.values())
        self.weight_map |= {key: shard for key in keys}
        for kind, table in tensors.items():
            if table:
                self.files[kind].append(_name(kind, k, self.parts))
                save_file({k: v.cpu() for k, v in table.items()}, str(self.tmp / self.files[kind][-1]))


def _aliases(model, source) -> set[str]:
    """The state-dict names not to write of the tensors the model holds under several names (tied
    weights): save_pretrained writes each such tensor once, under the name the `source` folder has
    (a tensor none of whose names it has: under its first)."""
    names: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        names.setdefault(id(t), []).append(name)
    out = set()
    for group in (g for g in names.values() if len(g) > 1):
        kept = [n for n in group if n in source] or group[:1]
        out |= set(group) - set(kept)
    return out


def _name(file: str, k: int, n: int) -> str:
    """"model-00002-of-00005.safetensors" for part k (from 0) of n, as save_pretrained names shards."""
    stem = file.removesuffix(".safetensors")
    return f"{stem}-{k + 1:05d}-of-{n:05d}.safetensors"
