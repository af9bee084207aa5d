"""The options of the sparsecc backend (torch.compile(..., options={...})), validated up front."""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field

from ..errors import RecipeError
from ..ops import MODES
from ..techniques.configs import technique_for
from ..techniques.targeting import normalize_recipe

OPTIONS = {
    "recipe": "data-free configs applied at compile time: {module name | 're:<regex>' | 'default': config}",
    "debug": "log the graph before and after the rewrite, what was rewritten and what each sparsecc op runs",
    "dump": "a folder: write each graph's code before/after the rewrite and a JSON of the rewrites and of "
            "the sparsecc ops (node, shapes, dtype, the kernel mode set, the kernel or reference it runs)",
    "inductor": "dict of Inductor config overrides passed to compile_fx",
    "kernels": "'auto' (Triton kernels on CUDA where timed faster, references elsewhere), 'triton' (kernels on any "
               "device; on CPU under TRITON_INTERPRET=1) or 'reference', set on every sparsecc op of the graph",
}


@dataclass
class BackendOptions:
    recipe: dict | None = None
    debug: bool = False
    dump: str | None = None
    inductor: dict = field(default_factory=dict)
    kernels: str | None = None

    @classmethod
    def parse(cls, options) -> "BackendOptions":
        """The options, checked: unknown keys (with the nearest known one), bad values, and recipe
        configs the backend cannot apply (each technique's `compile_error` says why)."""
        options = dict(options or {})
        for key in options:
            if key not in OPTIONS:
                near = difflib.get_close_matches(key, list(OPTIONS), n=1)
                hint = f"did you mean {near[0]!r}? " if near else ""
                raise RecipeError(f"unknown sparsecc backend option {key!r}; {hint}known options: "
                                  + "; ".join(f"{k}: {v}" for k, v in OPTIONS.items()))
        opts = cls(**options)
        if opts.recipe is not None:
            opts.recipe = normalize_recipe(opts.recipe)
            for key, cfg in opts.recipe.items():
                reason = None if cfg is None else technique_for(cfg).compile_error(cfg)
                if reason:
                    raise RecipeError(f"recipe[{key!r}]: {reason}; run sparsecc.sparsify_(model, recipe, batches) "
                                      "before compiling")
        if not isinstance(opts.debug, bool):
            raise RecipeError(f"option 'debug' must be True or False, got {opts.debug!r}")
        if opts.dump is not None and not isinstance(opts.dump, (str, os.PathLike)):
            raise RecipeError(f"option 'dump' must be a folder path, got {opts.dump!r}")
        if opts.kernels is not None and opts.kernels not in MODES:
            raise RecipeError(f"option 'kernels' must be one of {', '.join(MODES)}, got {opts.kernels!r}")
        if not isinstance(opts.inductor, dict):
            raise RecipeError(f"option 'inductor' must be a dict of Inductor config overrides, got {opts.inductor!r}")
        return opts
