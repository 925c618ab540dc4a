"""Model families behind one boundary: the core asks `family_of(model)` and never names a family.

A family is a folder here whose package exposes `FAMILY` (a `base.Family`). It is registered below with
the prefix of the module its model classes come from, so recognising a model never imports LAVIS or
transformers for a model of another family. Adding a third family: add its folder, add one line to
`_FAMILIES`.
"""

from __future__ import annotations

import difflib
import importlib
from functools import cache

from torch import nn

from ..errors import AuroraConfigError
from .base import Family, FusionInputs, Preset

__all__ = ["FAMILY_NAMES", "Family", "FusionInputs", "Preset", "all_presets", "family_of", "get_family", "get_preset"]

# name -> (package with FAMILY, module prefix of the family's model classes)
_FAMILIES: dict[str, tuple[str, str]] = {
    "lavis": ("aurora_pet.families.lavis", "lavis."),
    "hf": ("aurora_pet.families.hf", "transformers."),
}
FAMILY_NAMES = tuple(_FAMILIES)


@cache
def get_family(name: str) -> Family:
    if name not in _FAMILIES:
        raise AuroraConfigError(f"unknown model family {name!r}; families: {', '.join(_FAMILIES)}")
    return importlib.import_module(_FAMILIES[name][0]).FAMILY


def family_of(model: nn.Module) -> Family | None:
    """The family whose classes `model` is built from (its class or a base class), or None."""
    modules = [cls.__module__ for cls in type(model).__mro__]
    for name, (_, prefix) in _FAMILIES.items():
        if any(module.startswith(prefix) for module in modules):
            return get_family(name)
    return None


def all_presets() -> dict[str, Preset]:
    """Every preset of every family, by full name ("<architecture>/<kind>")."""
    return {name: preset for family in _FAMILIES for name, preset in get_family(family).presets.items()}


def get_preset(name: str) -> Preset:
    """A preset by full name, with "did you mean" for a near miss."""
    presets = all_presets()
    if name not in presets:
        close = difflib.get_close_matches(name, presets, 3)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise AuroraConfigError(f"unknown preset {name!r}{hint}; presets: {', '.join(presets)}")
    return presets[name]
