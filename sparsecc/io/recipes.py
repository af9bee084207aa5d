"""Recipe files: YAML, JSON or TOML (or the same structure as a Python dict) -> a recipe.

A recipe maps targets (see `targeting.py`) to a config, or to nothing (skip):

    default: {method: sparsegpt, sparsity: 0.5}
    lm_head: null                              # TOML has no null: write "skip" (or false)
    "re:.*mlp\\..*": {method: wanda, pattern: "2:4"}

`method` names a registered config by its short name (`magnitude`, `wanda`, `sparsegpt`, `obs`,
…) or its class name (`WandaConfig`, which is what `dump_recipe` writes, as `type`); every other
key is a field of that config. Every error names the offending key and, for a typo, the nearest
valid word. Nothing in a recipe file is executed.
"""
from __future__ import annotations

import difflib
import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import techniques as _techniques  # noqa: F401  (registers the built-in techniques by name)
from ..techniques.configs import SparsityConfig, config_from_dict, known_configs
from ..errors import RecipeError
from ..techniques.targeting import normalize_recipe

SKIP = (None, False, "skip", "none", "None")
_SUFFIXES = {".yaml": "yaml", ".yml": "yaml", ".json": "json", ".toml": "toml"}


def method_names() -> dict[str, str]:
    """{short or class name: class name} for every registered config, e.g. "wanda" -> "WandaConfig"."""
    names = {}
    for cls_name in known_configs():
        names[cls_name] = cls_name
        names[cls_name.removesuffix("Config").lower()] = cls_name
    return names


def load_recipe(source) -> dict[str, SparsityConfig | None]:
    """A recipe from a file path (.yaml/.yml/.json/.toml), a dict of plain values, or a recipe
    that is already made of configs (returned validated). Raises RecipeError naming the key."""
    if isinstance(source, (str, os.PathLike)):
        return parse_recipe(read_recipe_file(source), origin=str(source))
    if isinstance(source, SparsityConfig):
        return normalize_recipe(source)
    return parse_recipe(source)


def read_recipe_file(path) -> Any:
    """The plain data in a recipe file, by its suffix; syntax errors name the file and line."""
    path = Path(path)
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise RecipeError(f"recipe file {str(path)!r}: unknown suffix {path.suffix!r}; use one of {sorted(_SUFFIXES)}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"recipe file {str(path)!r} cannot be read: {e}") from None
    try:
        if kind == "json":
            return json.loads(text)
        if kind == "toml":
            return tomllib.loads(text)
        import yaml
        return yaml.safe_load(text)  # safe_load: plain data only, never objects or code
    except Exception as e:  # each parser has its own error type; all mean the same to the user
        raise RecipeError(f"recipe file {str(path)!r} is not valid {kind.upper()}: {e}") from None


def parse_recipe(data: Any, origin: str = "recipe") -> dict[str, SparsityConfig | None]:
    """Plain data ({target: {method: ..., field: value} | skip}) -> {target: config | None}."""
    if isinstance(data, SparsityConfig):
        return normalize_recipe(data)
    if not isinstance(data, Mapping) or not data:
        raise RecipeError(f"{origin}: a recipe is a non-empty mapping of target -> config, "
                          f"e.g. {{'default': {{'method': 'wanda', 'sparsity': 0.5}}, 'lm_head': None}}; "
                          f"got {type(data).__name__}")
    out: dict[str, SparsityConfig | None] = {}
    for key, value in data.items():
        where = f"{origin}[{key!r}]"
        if not isinstance(key, str) or not key:
            raise RecipeError(f"{where}: targets are module names, 're:<regex>' or 'default'")
        out[key] = _config(value, where)
    try:
        return normalize_recipe(out)
    except RecipeError as e:
        raise RecipeError(f"{origin}: {e}") from None


def _config(value: Any, where: str) -> SparsityConfig | None:
    if isinstance(value, SparsityConfig):
        return value
    if isinstance(value, (str, bool)) or value is None:
        if value in SKIP:
            return None
        raise RecipeError(f"{where}: {value!r} is neither a config nor 'skip'; "
                          f"write {{method: {_nearest(str(value), method_names()) or 'wanda'}, sparsity: 0.5}} or null")
    if not isinstance(value, Mapping):
        raise RecipeError(f"{where}: expected a mapping with 'method' and the config's fields, got {type(value).__name__}")
    d = dict(value)
    if "method" in d and "type" in d:
        raise RecipeError(f"{where}: give 'method' or 'type', not both")
    method = d.pop("method", d.pop("type", None))
    if method is None:
        raise RecipeError(f"{where}: missing 'method' (one of {sorted(_short_names())})")
    names = method_names()
    if not isinstance(method, str) or method not in names:
        near = _nearest(str(method), names)
        hint = f"; did you mean {near!r}?" if near else f"; known: {sorted(_short_names())}"
        raise RecipeError(f"{where}: unknown method {method!r}{hint}")
    try:
        return config_from_dict({"type": names[method], **d})
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:  # a value of the wrong type reaching a config's validation
        raise RecipeError(f"{where}: {e}") from None


def dump_recipe(recipe) -> dict[str, Any]:
    """A recipe as plain JSON-able data that `load_recipe` reads back (configs as `to_dict`)."""
    return {k: (None if c is None else c.to_dict()) for k, c in normalize_recipe(recipe).items()}


def _short_names() -> list[str]:
    return [n for n in method_names() if not n.endswith("Config")]


def _nearest(word: str, choices) -> str | None:
    near = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    if not near:
        near = difflib.get_close_matches(word.lower(), list(choices), n=1, cutoff=0.5)
    return near[0] if near else None
