"""Layer dropping: remove whole decoder blocks (ShortGPT; Men et al. 2024, "ShortGPT: Layers in
Large Language Models are More Redundant Than You Expect").

    sparsecc.sparsify_(model, {"model.layers": LayerDropConfig(n=2)}, batches)

targets the container of the decoder blocks (the ModuleList `capture.find_blocks` finds them in;
"model.layers" in Llama, "model.decoder.layers" in OPT; any key covering it, "default" included).
The `n` blocks that matter least are removed:
  - score="bi": Block Influence, ShortGPT eq. (1): BI_i = 1 - E_{X,t}[cos(X_{i,t}, X_{i+1,t})],
    X_i the hidden state entering block i and X_{i+1} the one leaving it, averaged over the
    calibration tokens; a block that barely turns the hidden state is redundant;
  - score="loss": the increase of the calibration next-token loss when that block alone is skipped;
  - score="l0": a learned hard-concrete gate per block (L0 regularisation, Louizos et al. 2018, as
    Sheared-LLaMA, Xia et al. 2024, learns which layers to remove): each block's output becomes
    x + z_i (block(x) - x), the weights frozen, and log_alpha trained `steps` steps on the calibration
    batches to minimise the next-token loss plus a Lagrangian driving the expected number of blocks
    kept to L - n; the learned log_alpha is the score.
All are measured on the dense model (passes/analysis/block_influence.py). The remaining blocks are
renumbered: the container holds them as 0..L-n-1, every `layer_idx` attribute inside them (the
KV cache's layer index in transformers) and the config (`num_hidden_layers`, per-layer lists such
as `layer_types`) follow, so the KV cache, `generate`, `save_pretrained` and a plain
`from_pretrained` of the saved folder all work.

Module names after the container shift ("model.layers.5.mlp" becomes "model.layers.3.mlp" when two
blocks before it go), so `sparsify_` and `calibrate` drop blocks first, in a stage of their own
(`stage = -1`), and resolve the rest of the recipe on the shrunk model: its keys name modules
*after* the drop. The decision (the indices dropped, and every block's score) is what a Plan stores.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from torch import nn

from .configs import SparsityConfig, register_technique
from .l0 import check_gate_fields
from ..errors import PlanError, RecipeError
from .rewrites import ModuleRewrite

SCORES = ("bi", "loss", "l0")
#: config lists with one entry per decoder block, sliced with the blocks
PER_LAYER_FIELDS = ("layer_types", "no_rope_layers")
#: config flags under which a block computes differently at another index (GPT-2 scales attention by 1/(idx+1))
INDEX_DEPENDENT_FLAGS = ("scale_attn_by_inverse_layer_idx",)


@dataclass(frozen=True)
class LayerDropConfig(SparsityConfig):
    """Remove the `n` decoder blocks with the lowest Block Influence ("bi"), loss increase ("loss") or
    learned hard-concrete gate log_alpha ("l0").

    The other fields are only read with score="l0" (passes/analysis/block_influence.py): `steps`
    gate-training steps (one calibration batch each, cycling), Adam's `lr` on the gates' log_alpha and
    `lambda_lr` on the Lagrange multipliers, each gate's starting P(z != 0) `init_keep`, the share of
    the steps (`warmup`) over which the target number of blocks kept is annealed from init_keep * L to
    L - n, and the `seed` of the gates' noise (the scores are deterministic given it)."""

    TARGET = "blocks"
    n: int = 1
    score: str = "bi"
    steps: int = 100
    lr: float = 0.1
    lambda_lr: float = 0.5
    init_keep: float = 0.95
    warmup: float = 0.5
    seed: int = 0

    def validate(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise RecipeError(f"LayerDropConfig.n is the number of blocks to remove, an integer >= 1; got {self.n!r}")
        if self.score not in SCORES:
            near = difflib.get_close_matches(str(self.score), SCORES, n=1)
            raise RecipeError(f"LayerDropConfig.score must be one of {list(SCORES)}, got {self.score!r}"
                              + (f"; did you mean {near[0]!r}?" if near else ""))
        check_gate_fields(self)  # steps, lr, lambda_lr, init_keep, warmup, seed (read with score="l0")


@dataclass(frozen=True)
class BlockStack:
    """The container `name` of the decoder blocks, and their names when it was captured."""

    name: str
    blocks: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "blocks": list(self.blocks)}


@register_technique(LayerDropConfig)
class LayerDropTechnique(ModuleRewrite):
    requires = ("block_influence",)
    what = "stack of decoder blocks (a ModuleList of same-type blocks)"
    stage = -1    # before the rest of a recipe, which is resolved on the renumbered model
    order = -100  # restored first from a checkpoint: the other rows name modules after the drop

    def candidates(self, captured) -> dict[str, BlockStack]:
        parents = {b.rpartition(".")[0] for b in captured.blocks}
        if len(parents) != 1 or "" in parents:
            return {}
        name = parents.pop()
        container = captured.model.get_submodule(name)
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            return {}
        return {name: BlockStack(name, tuple(captured.blocks))}

    def spec_from_dict(self, data) -> BlockStack:
        return BlockStack(data["name"], tuple(data["blocks"]))

    def check(self, config, model, name, spec) -> None:
        container = model.get_submodule(name)
        count = len(container)
        if count != len(spec.blocks):
            raise PlanError(f"{name} holds {count} blocks; the plan was calibrated on {len(spec.blocks)}")
        if config.n >= count:
            raise RecipeError(f"{name}: LayerDropConfig(n={config.n}) would remove every one of its {count} blocks; "
                              f"n must be at most {count - 1}")
        for cfg in _configs(model, count):
            if getattr(cfg, "is_heterogeneous", False):
                raise RecipeError(f"{type(cfg).__name__} has per-layer overrides (per_layer_config), which "
                                  "LayerDropConfig cannot renumber")
            flag = next((f for f in INDEX_DEPENDENT_FLAGS if getattr(cfg, f, False)), None)
            if flag:
                raise RecipeError(f"{type(cfg).__name__}.{flag} is set: a block computes differently at another "
                                  "index, so blocks cannot be removed and renumbered")
        for i, block in enumerate(container):
            for sub, mod in block.named_modules(prefix=f"{name}.{i}"):
                idx = getattr(mod, "layer_idx", i)
                if isinstance(idx, int) and idx != i:
                    raise RecipeError(f"{sub}.layer_idx is {idx}, not its block's index {i}: LayerDropConfig "
                                      "cannot renumber it")

    def plan(self, config, model, name, spec, stats):
        """{drop: the indices of the n blocks with the lowest score, scores: every block's score}."""
        table = stats["block_influence"]
        scores = torch.tensor([float(table[b]) for b in spec.blocks], dtype=torch.float64)
        if not bool(torch.isfinite(scores).all()):
            raise PlanError(f"{name}: block scores are not finite ({scores.tolist()}): check the calibration batches")
        order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), i))  # lowest first, ties: earlier
        return {"drop": torch.tensor(sorted(order[:config.n]), dtype=torch.int64), "scores": scores}

    def check_decision(self, config, spec, decision):
        drop = decision.get("drop")
        count = len(spec.blocks)
        if (drop is None or drop.dim() != 1 or drop.dtype not in (torch.int32, torch.int64)
                or drop.numel() != config.n or len(set(drop.tolist())) != drop.numel()
                or not all(0 <= i < count for i in drop.tolist())):
            return f"needs 'drop', {config.n} distinct block indices in range({count}), got {drop!r}"
        if drop.numel() >= count:
            return f"would remove all {count} blocks"
        return None

    def apply(self, config, model, name, spec, decision, tx):
        problem = self.check_decision(config, spec, decision)
        if problem:
            raise PlanError(f"{name}: the layer-drop decision {problem}")
        drop = sorted(int(i) for i in decision["drop"])
        drop_blocks(model, name, drop, tx)
        scores = decision.get("scores")
        count = len(spec.blocks)
        return {"module": name, "param": None, "technique": "LayerDropConfig", "config": config.to_dict(),
                "shape": None, "sparsity": len(drop) / count, "blocks": count, "dropped": drop,
                "scores": None if scores is None else [float(s) for s in scores],
                "label": f"-{len(drop)}/{count} blocks", "error": None, "error_kind": None}

    def restore(self, model: nn.Module, rows: list[dict]) -> list[str]:
        """A loaded checkpoint: nothing to do where its config already said the reduced block count
        (from_pretrained built the shrunk model); blocks dropped where the model has them all."""
        todo = []
        for row in rows:
            name, count, drop = row.get("module"), row.get("blocks"), row.get("dropped")
            try:
                container = model.get_submodule(name)
            except AttributeError:
                raise PlanError(f"layer-drop row {name!r}: the model has no such module") from None
            if not (isinstance(count, int) and isinstance(drop, list) and all(type(i) is int for i in drop)
                    and len(set(drop)) == len(drop) and all(0 <= i < count for i in drop) and len(drop) < count):
                raise PlanError(f"layer-drop row {name!r}: bad 'blocks' {count!r} or 'dropped' {drop!r}")
            if len(container) == count - len(drop):
                continue
            if len(container) != count:
                raise PlanError(f"layer-drop row {name!r}: the model holds {len(container)} blocks, neither the "
                                f"{count} it was calibrated on nor the {count - len(drop)} kept")
            todo.append((name, drop))
        for name, drop in todo:
            drop_blocks(model, name, drop)
        return [name for name, _ in todo]


def _configs(model: nn.Module, count: int) -> list:
    """The distinct config objects of the model and its submodules that say `count` decoder layers
    (those describing the container; configs of other stacks keep their own count)."""
    found = {}
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and id(cfg) not in found and getattr(cfg, "num_hidden_layers", None) == count:
            found[id(cfg)] = cfg
    return list(found.values())


def drop_blocks(model: nn.Module, name: str, drop: list[int], tx=None) -> None:
    """Remove blocks `drop` (indices) from container `name` and renumber the rest: the container's
    keys, every `layer_idx` inside the kept blocks, the config's layer count and per-layer lists.
    Each change is recorded in `tx` (a Transaction) first, where given."""
    container = model.get_submodule(name)
    before, dropped = list(container._modules.items()), set(drop)
    kept = [m for i, (_, m) in enumerate(before) if i not in dropped]

    def put(children):
        container._modules.clear()
        container._modules.update(children)

    if tx is not None:
        tx.on_undo(lambda: put(before))
        tx.swapped.append(name)  # the sites below it are renamed: checks.verify leaves them to this technique
    put((str(j), m) for j, m in enumerate(kept))
    for j, block in enumerate(kept):
        for mod in block.modules():
            old = getattr(mod, "layer_idx", None)
            if isinstance(old, int) and old != j:
                (tx.set_attr if tx is not None else setattr)(mod, "layer_idx", j)
    for cfg in _configs(model, len(before)):
        updates = {"num_hidden_layers": len(kept)}
        for field in PER_LAYER_FIELDS:
            values = getattr(cfg, field, None)
            if isinstance(values, (list, tuple)) and len(values) == len(before):
                updates[field] = type(values)(v for i, v in enumerate(values) if i not in dropped)
        for field, value in updates.items():
            (tx.set_attr if tx is not None else setattr)(cfg, field, value)
