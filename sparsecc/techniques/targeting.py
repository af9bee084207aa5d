"""Recipes: which module gets which config.

A recipe maps keys to a config or `None` (skip):
  - an exact module name ("lm_head"), which also covers the modules below it ("model.layers.0");
  - "re:<regex>", matched with `re.fullmatch` against module names;
  - "default", for every candidate module no other key matched.
Precedence: exact names, then regexes in recipe order, then "default". A key that matches no
candidate module is an error (with the nearest names as a hint), so typos never pass silently.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence

from .configs import SparsityConfig
from ..errors import RecipeError

DEFAULT = "default"


def normalize_recipe(recipe) -> dict[str, SparsityConfig | None]:
    """Accept a single config (applies to every candidate) or a mapping; validate its values."""
    if isinstance(recipe, SparsityConfig):
        return {DEFAULT: recipe}
    if not isinstance(recipe, Mapping):
        raise RecipeError(f"a recipe is a config or a dict of module name/'re:<regex>' -> config, got {type(recipe).__name__}")
    out = {}
    for key, cfg in recipe.items():
        if not isinstance(key, str):
            raise RecipeError(f"recipe keys are module names or 're:<regex>' strings, got {key!r}")
        if cfg is not None and not isinstance(cfg, SparsityConfig):
            raise RecipeError(f"recipe[{key!r}] must be a sparsecc config or None, got {type(cfg).__name__}")
        if key.startswith("re:"):
            try:
                re.compile(key[3:])
            except re.error as e:
                raise RecipeError(f"recipe key {key!r} is not a valid regex: {e}") from None
        out[key] = cfg
    return out


def key_matches(key: str, name: str) -> bool:
    """Whether recipe `key` (a module name, covering the modules below it, or "re:<regex>") targets `name`."""
    if key.startswith("re:"):
        return re.fullmatch(key[3:], name) is not None
    return name == key or name.startswith(key + ".")


def resolve(recipe, candidates: Mapping[str, Sequence[str]]) -> dict[str, SparsityConfig]:
    """Assign configs to module names.

    `candidates` maps a target kind (a config's TARGET, e.g. "linear") to the module names of
    that kind in the model. Returns {module name: config} for every targeted module.
    """
    recipe = normalize_recipe(recipe)
    assigned: dict[str, SparsityConfig | None] = {}
    exact = [k for k in recipe if k != DEFAULT and not k.startswith("re:")]
    regexes = [k for k in recipe if k.startswith("re:")]
    for key in exact + regexes:
        cfg = recipe[key]
        kinds = [cfg.TARGET] if cfg is not None else list(candidates)
        names = [n for kind in kinds for n in candidates.get(kind, ())]
        hits = _hits(key, names, what="/".join(kinds) or "any")
        for n in hits:
            assigned.setdefault(n, cfg)  # first (most specific) key wins
    if recipe.get(DEFAULT) is not None:
        cfg = recipe[DEFAULT]
        for n in candidates.get(cfg.TARGET, ()):
            assigned.setdefault(n, cfg)
    return {n: c for n, c in assigned.items() if c is not None}


def _hits(key: str, names: Sequence[str], what: str = "linear") -> list[str]:
    hits = [n for n in names if key_matches(key, n)]
    if not hits:
        near = difflib.get_close_matches(key[3:] if key.startswith("re:") else key, list(names), n=3, cutoff=0.5)
        hint = f"; nearest names: {near}" if near else (f"; examples: {list(names)[:3]}" if names else "")
        raise RecipeError(f"recipe key {key!r} matches no {what} module{hint}")
    return hits


def select(keys: Sequence[str], names: Sequence[str]) -> set[str]:
    """The names matched by any of `keys` (exact/prefix names or 're:<regex>'); unmatched keys raise."""
    return {n for key in keys for n in _hits(key, names)}
