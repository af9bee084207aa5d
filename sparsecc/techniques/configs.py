"""Technique configs and the registry that maps each config type to its handler.

A config is a frozen dataclass that says *what* to do to a module (e.g. prune 50% by
magnitude); its registered `Technique` says *how*: which analysis results it needs
(`requires`), how to compute a decision for one weight from them (`plan`), and how to
apply that decision to the model (`apply`). Configs round-trip through JSON
(`to_dict` / `config_from_dict`), carrying their type name and a version number.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import RecipeError


@dataclass(frozen=True)
class SparsityConfig:
    """Base class of every technique config."""

    VERSION: ClassVar[int] = 1
    #: the kind of module the config targets; recipes resolve names among modules of this kind
    TARGET: ClassVar[str] = "linear"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # overridden by configs with constraints
        pass

    def to_dict(self) -> dict[str, Any]:
        d = {"type": type(self).__name__, "version": self.VERSION}
        d.update(dataclasses.asdict(self))
        return d


_CONFIG_TYPES: dict[str, type[SparsityConfig]] = {}
_TECHNIQUES: dict[type[SparsityConfig], "Technique"] = {}


class Technique:
    """How one config type is carried out. Subclasses are registered with `register_technique`.

    `plan` must not modify the model: it returns a *decision* (a dict of tensors) from which
    `apply` rewrites the module. Splitting the two lets `calibrate` store decisions in a Plan
    and `sparsify_` replay them without data.
    """

    #: analysis results needed, by artefact name (e.g. "input_stats", "hessian")
    requires: tuple[str, ...] = ()
    #: a recipe runs stage by stage, lowest first, each stage resolved on the model the ones before
    #: it left: a technique that renames modules (LayerDropConfig renumbers the blocks) runs before
    #: the rest (`stage = -1`)
    stage: int = 0

    def needs(self, config: SparsityConfig) -> tuple[str, ...]:
        """The analysis artefacts this config needs (`requires`, unless the config changes them)."""
        return self.requires

    def needs_data(self, config: SparsityConfig) -> bool:
        """Whether this config can only be carried out with calibration data."""
        return bool(self.needs(config))

    def compile_error(self, config: SparsityConfig) -> str | None:
        """Why `config` cannot be applied by the torch.compile backend from the weights alone
        (None: it can). The default refuses configs that need calibration data."""
        if self.needs_data(config):
            return f"{config} needs calibration data, which torch.compile cannot provide"
        return None

    def plan(self, config: SparsityConfig, site, weight: torch.Tensor, stats: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError  # abstract

    def touches(self, config: SparsityConfig, site, decision: dict[str, torch.Tensor]) -> list[str]:
        """Names of the parameters `apply` changes (saved first, so a failure can be undone)."""
        return [site.param]

    def apply(self, config: SparsityConfig, model, site, decision: dict[str, torch.Tensor], tx=None) -> None:
        """Default for weight techniques: copy an updated weight if given, then zero the pruned
        entries of the site's weight (viewed as [out, in], modified in place). The caller saved the
        `touches` parameters; other changes are recorded in `tx` (a Transaction) for their undo."""
        weight = site.weight(model)
        if "weight" in decision:
            weight.copy_(decision["weight"].to(weight.dtype))
        if "mask" in decision:
            weight.mul_(decision["mask"].to(weight.device))


def register_technique(config_type: type[SparsityConfig]):
    """Class decorator: register a `Technique` subclass as the handler of `config_type`."""

    def deco(cls: type[Technique]) -> type[Technique]:
        _CONFIG_TYPES[config_type.__name__] = config_type
        _TECHNIQUES[config_type] = cls()
        return cls

    return deco


def technique_for(config: SparsityConfig) -> Technique:
    try:
        return _TECHNIQUES[type(config)]
    except KeyError:
        raise RecipeError(f"{type(config).__name__} has no registered technique; "
                          "decorate its handler with @register_technique") from None


def config_from_dict(d: dict[str, Any]) -> SparsityConfig:
    """Inverse of `SparsityConfig.to_dict`; unknown types and fields get a suggestion."""
    d = dict(d)
    name = d.pop("type", None)
    if name not in _CONFIG_TYPES:
        near = difflib.get_close_matches(str(name), list(_CONFIG_TYPES), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else f"; known: {sorted(_CONFIG_TYPES)}"
        raise RecipeError(f"unknown config type {name!r}{hint}")
    cls = _CONFIG_TYPES[name]
    version = d.pop("version", cls.VERSION)
    if version > cls.VERSION:
        raise RecipeError(f"{name} version {version} is newer than this sparsecc supports ({cls.VERSION}); upgrade sparsecc")
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in d:
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; fields are {sorted(fields)}"
            raise RecipeError(f"{name} has no field {key!r}{hint}")
    return cls(**d)


def known_configs() -> dict[str, type[SparsityConfig]]:
    return dict(_CONFIG_TYPES)
